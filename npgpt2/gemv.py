"""float32 products of a few rows by a weight matrix, reading each weight once: decode's GEMV.

    matmul_rows(x (M, C), w (C, OC), bias (OC,) or None) -> (M, OC)      M <= MAX_ROWS

Used by kernels.matmul_forward and GPT2._head when M = B*T <= MAX_ROWS: batch-1 decoding
(M = 1) and the server's batched decoding (M = the sequences decoded together, one token
each). Memory, not arithmetic, is the limit there: every weight is read once per step and
used M times, so M rows should cost little more than one as long as the multiply-adds
(2 GFLOP a step at 124M, M = 8) keep up with memory: the kernels must feed the FMA units,
not wait on loads and stores of their own accumulators. OpenBLAS handles M = 1 with its
GEMV but 2..8 rows with its GEMM, whose packing and blocking are built for large M
(measured slow), and either way it parks and wakes its threads around each call. Here:

- w a transposed view of rows (OC, C) (the output head, wte.T): `_rows`, blocks of 8 weight
  rows; input rows two at a time against four weight rows at a time, 8 dot products in one
  loop over c (8 vector accumulators in registers; the block stays in L1 for the other
  pairs), while each pair's pass prefetches its share of a block further on.
- w (C, OC) C-contiguous (a block's weights, as GPT-2's conv1d stores them): `_cols`,
  panels of KC (32) weight rows x the piece's columns, cut into strips of STRIP (32 or 16)
  columns; each strip's sums for 4 input rows at a time stay in registers over the panel's
  rows (`_strip`, written in LLVM IR: LLVM would not keep them there), and each strip
  prefetches the strip AHEAD on. The columns are cut into pieces of >= MIN_COLS for the
  threads (pieces of 64 columns read C short pieces 4*OC bytes apart: 0.4 GB/s).
- the pieces (or rows) are shared between this thread and gemv_pool's worker when
  threads.gemv_threads() finds a second core free; no BLAS threads to wake.

A row's outputs have the same bits whatever M, its place among the rows and the split
between threads (each output is summed by the same loop): batched decoding gives each
sequence the logits it gets alone (tests/test_gemv.py, on the generic, AVX2 and AVX-512
paths). Measured (`_rows` and the previous `_cols`: one thread, CPU time, the kernels called directly
on the four block matrices x 12 layers and the head of a 124M step, Intel Xeon with AVX-512,
busy machine, 2026-12-06, alternating with the one-row-at-a-time loops before them): M = 1
36.8-40.4 ms and M = 8 53.6-60.6 ms (1.5x), against 43.4-53.4 and 105.3-110.7 ms; compiled
for AVX2 (NUMBA_CPU_NAME=haswell) 35.4 and 53.7 ms against 56.3 and 125.3. The register
strips of `_cols` (the block matrices only, one thread, wall, medians of 7 alternating,
same Xeon, 2026-12-06, a later session): M = 1 25.8 ms, M = 8 35.2 ms, against 28.1 and
60.1 ms for the 8-row passes before them (compiled for AVX2, NV = 2: 25.9 and 32.3 against
26.5 and 53.5). LLVM uses 256-bit vectors on Intel's AVX-512 cores (its prefer-vector-width) and on
AVX2 CPUs alike.

layers.matmul_forward (x @ w + b) is the plain reference; tests hold these equal.
"""
import numpy as np
from llvmlite import ir
from numba import errors, njit, types
from numba.extending import intrinsic

from . import cpu_target, jit, threads
from .cpu_target import emit_prefetch, prefetch, target_features

MAX_ROWS = 8
MIN_COLS = 256  # a column piece of a (C, OC) weight: >= 1 KiB contiguous per row (prefetch-friendly)
FAST = {"reassoc", "contract", "nsz"}  # sums in any order: SIMD lanes (_rows' dot products)
EXACT = {"contract"}  # fused multiply-adds only: _cols' sums keep the source's order
AHEAD = 2   # _rows: how many 8-row blocks ahead the pairs' passes prefetch
_NO_BIAS = np.zeros(0, np.float32)


def _wide_registers():
    """Whether Numba's target has 32 vector registers (AVX-512's ymm0-31), not AVX2's 16."""
    return {"+avx512f", "+avx512vl"} <= target_features()


VW = 8      # floats per vector in _strip (256 bits: what LLVM prefers on AVX2 and AVX-512 alike)
NV = 4 if _wide_registers() else 2  # vectors per strip row: RB*NV accumulators + NV weights fit the registers
STRIP = VW * NV  # _cols: columns per strip (32 with AVX-512's registers, 16 with AVX2's)
RB = 4      # _cols: input rows per strip pass
KC = 32      # _cols: weight rows per panel (32 x a piece's columns: in L2 while the strips use them)
AHEAD = 4   # _cols: the strip of a panel's rows that each strip prefetches: 4 strips on


def _strip_kernel(R):
    """An intrinsic for R input rows (1..RB): acc[m0+r, a0:a0+STRIP] += x[m0+r, c] * w[c, j:j+STRIP],
    c = c0 .. c1-1 in order (c1 > c0), each column's sum one chain of fused multiply-adds;
    and a prefetch of w.flat[c * OC + j + ahead] for each c.

        strip(x (M, C), w (C, OC), acc (M, n), m0, c0, c1, j, a0, ahead)   all C-contiguous, in bounds

    Written in LLVM IR because LLVM does not keep an R x STRIP block of sums in registers
    across the c loop when it is written as Numba loops (it loads and stores a local array's
    entries every step, or leaves the scalars unvectorised): here the R*NV accumulators are
    phi values of the loop, each step loads NV weight vectors and R broadcast x values and
    does R*NV multiply-adds (contract: LLVM fuses them where the CPU has FMA, as Numba's
    fastmath contract does), and asks for the strip `ahead` elements on (llvm.prefetch into
    L2: a strip to come of the panel's KC rows, which the hardware prefetcher cannot follow at
    once). Unchecked loads: _cols keeps every index in bounds (a prefetch never faults)."""
    @intrinsic
    def strip(typingctx, x, w, acc, m0, c0, c1, j, a0, ahead):
        if any(getattr(a, "layout", None) != "C" or getattr(a, "dtype", None) != types.float32 for a in (x, w, acc)):
            raise errors.TypingError("gemv._strip: x, w and acc must be C-contiguous float32 arrays")

        def codegen(context, builder, sig, args):
            xa, wa, aa = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3]))
            m0, c0, c1, j, a0, ahead = args[3:]
            i32, i64 = ir.IntType(32), ir.IntType(64)
            vt = ir.VectorType(ir.FloatType(), VW)
            fmf = ("contract",)

            def at(arr, idx):  # &arr.data[idx] as a vector pointer
                return builder.bitcast(builder.gep(arr.data, [idx]), vt.as_pointer())

            def offset(base, k):
                return builder.add(base, ir.Constant(i64, k))

            def row(arr, r):  # first element of row m0 + r of a C-contiguous 2-D array
                return builder.mul(offset(m0, r), builder.extract_value(arr.shape, 1))
            arow = [builder.add(row(aa, r), a0) for r in range(R)]
            xrow = [row(xa, r) for r in range(R)]
            start = [[builder.load(at(aa, offset(arow[r], v * VW)), align=4) for v in range(NV)] for r in range(R)]
            entry = builder.block
            loop, done = builder.append_basic_block("strip.c"), builder.append_basic_block("strip.end")
            builder.branch(loop)
            builder.position_at_end(loop)
            c = builder.phi(i64)
            sums = [[builder.phi(vt) for _ in range(NV)] for _ in range(R)]
            wbase = builder.add(builder.mul(c, builder.extract_value(wa.shape, 1)), j)
            wv = [builder.load(at(wa, offset(wbase, v * VW)), align=4) for v in range(NV)]
            for k in range(0, STRIP, 16):  # 16 floats: one 64-byte line
                emit_prefetch(builder, builder.gep(wa.data, [offset(builder.add(wbase, ahead), k)]))
            new = []
            undef, lane0 = ir.Constant(vt, ir.Undefined), ir.Constant(i32, 0)
            to_all = ir.Constant(ir.VectorType(i32, VW), [0] * VW)  # shuffle mask: lane 0 everywhere
            for r in range(R):
                xv = builder.load(builder.gep(xa.data, [builder.add(xrow[r], c)]))
                bx = builder.shuffle_vector(builder.insert_element(undef, xv, lane0), undef, to_all)  # x broadcast
                new.append([builder.fadd(sums[r][v], builder.fmul(bx, wv[v], flags=fmf), flags=fmf) for v in range(NV)])
            step = builder.add(c, ir.Constant(i64, 1))
            c.add_incoming(c0, entry)
            c.add_incoming(step, loop)
            for r in range(R):
                for v in range(NV):
                    sums[r][v].add_incoming(start[r][v], entry)
                    sums[r][v].add_incoming(new[r][v], loop)
            builder.cbranch(builder.icmp_signed("<", step, c1), loop, done)
            builder.position_at_end(done)
            for r in range(R):
                for v in range(NV):
                    builder.store(new[r][v], at(aa, offset(arow[r], v * VW)), align=4)
            return context.get_dummy_value()
        return types.none(x, w, acc, m0, c0, c1, j, a0, ahead), codegen
    return strip


_strip1, _strip2, _strip3, _strip4 = (_strip_kernel(R) for R in range(1, RB + 1))


@njit(cache=True, nogil=True, fastmath=EXACT, error_model="numpy")
def _cols(x, w, bias, out, j0, j1):
    """out[m, j0:j1] = x[m] @ w[:, j0:j1] (+ bias[j0:j1]); x (M, C), w (C, OC) rows, bias (OC,) or (0,).

    The weight is read in panels of KC rows x the piece's columns (in L2 while used); each
    panel in strips of STRIP columns, and each strip's KC rows summed into RB (4) input
    rows' accumulators held in registers (_strip): per step NV weight vectors and 4
    broadcast x values feed 4*NV multiply-adds, so an 8-row step does the arithmetic of
    eight rows with two reads of the strip from L1, not eight loads and stores of
    accumulators. Every output column is one chain of fused multiply-adds over c = 0..C-1
    in order, into a local accumulator (M, j1-j0), whatever M, the rows' grouping (4, 3, 2,
    1 at a time), the strip or the split of columns between threads: a row's result has the
    same bits alone or in a batch. Columns past the last whole strip (only in models whose
    widths are not multiples of STRIP) take the same chain one column at a time.
    """
    M, C = x.shape
    n = j1 - j0
    whole = n - n % STRIP
    acc = np.zeros((M, n), np.float32)  # local: LLVM knows it aliases neither w nor out
    rest = M % RB
    OC = w.shape[1]
    for c0 in range(0, C, KC):
        c1 = min(c0 + KC, C)
        for t in range(0, whole, STRIP):
            # the strip AHEAD on in this piece's order: further along these rows, or at the
            # start of the next panel's (a piece may be only 9 strips wide: a thread's share)
            nxt = t + AHEAD * STRIP
            ahead = nxt - t if nxt < whole else KC * OC + nxt - whole - t
            for m in range(0, M - rest, RB):
                _strip4(x, w, acc, m, c0, c1, j0 + t, t, ahead)
            if rest == 3:
                _strip3(x, w, acc, M - 3, c0, c1, j0 + t, t, ahead)
            elif rest == 2:
                _strip2(x, w, acc, M - 2, c0, c1, j0 + t, t, ahead)
            elif rest == 1:
                _strip1(x, w, acc, M - 1, c0, c1, j0 + t, t, ahead)
    if whole < n:
        for c in range(C):
            for m in range(M):
                xv = x[m, c]
                for t in range(whole, n):
                    acc[m, t] += xv * w[c, j0 + t]
    for m in range(M):
        for t in range(n):
            out[m, j0 + t] = acc[m, t] + (bias[j0 + t] if bias.shape[0] > 0 else np.float32(0.0))


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows(x, w, bias, out, r0, r1):
    """out[m, r] = x[m] . w[r] (+ bias[r]) for r in r0..r1-1; x (M, C), w (OC, C) rows, C-contiguous.

    Blocks of eight weight rows (one sequential read of 8*C floats, then in L1). Input rows
    two at a time, each pair against four weight rows at a time: 8 sums in one loop over c,
    which LLVM vectorises as 8 (x2) vector accumulators in registers, 6 loads per 8
    multiply-adds. An odd last input row goes against all eight: again 8 sums in one loop,
    which LLVM vectorises the same way, so every output's sum has the same order and its
    bits do not depend on M, its place in the batch or the split between threads
    (tests/test_gemv.py; pairing that row with itself gave the same bits but cost 15% more
    at M = 1). The last block of a range slides back to end at r1 (recomputing a few rows;
    only rows r0..r1-1 are written). While the pairs work on a block from L1, each asks for
    its share of the block AHEAD blocks on (into L2): the hardware prefetcher alone runs
    too little ahead, and memory then waits for the arithmetic (20% of the head at M = 8).
    """
    M, C = x.shape
    OC = w.shape[0]
    if OC < 8:  # too few rows for a block (tiny test models only)
        for r in range(r0, r1):
            for m in range(M):
                s = np.float32(0.0)
                for c in range(C):
                    s += x[m, c] * w[r, c]
                out[m, r] = s + (bias[r] if bias.shape[0] > 0 else np.float32(0.0))
        return
    flat = w.reshape(-1)
    passes = 2 * (M // 2)  # pair passes per block (two halves each)
    share = ((8 * C + 15) // 16 + passes - 1) // max(1, passes) * 16  # floats each pass prefetches
    for r in range(r0, r1, 8):
        rb = max(0, min(r, r1 - 8))  # the block's first row
        ahead = (rb + 8 * AHEAD) * C  # where the block AHEAD blocks on starts in `flat`
        k = 0
        for h in range(rb, rb + 8, 4):
            for m in range(0, M - 1, 2):
                for p in range(ahead + k * share, min(ahead + (k + 1) * share, ahead + 8 * C, flat.shape[0]), 16):
                    prefetch(flat, p)
                k += 1
                s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = np.float32(0.0)
                for c in range(C):
                    xa, xb = x[m, c], x[m + 1, c]
                    v0, v1, v2, v3 = w[h, c], w[h + 1, c], w[h + 2, c], w[h + 3, c]
                    s00 += xa * v0
                    s01 += xb * v0
                    s10 += xa * v1
                    s11 += xb * v1
                    s20 += xa * v2
                    s21 += xb * v2
                    s30 += xa * v3
                    s31 += xb * v3
                _put(out, bias, m, h, r0, r1, (s00, s10, s20, s30))
                _put(out, bias, m + 1, h, r0, r1, (s01, s11, s21, s31))
        if M % 2:
            m = M - 1
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
            for c in range(C):
                xa = x[m, c]
                s0 += xa * w[rb, c]
                s1 += xa * w[rb + 1, c]
                s2 += xa * w[rb + 2, c]
                s3 += xa * w[rb + 3, c]
                s4 += xa * w[rb + 4, c]
                s5 += xa * w[rb + 5, c]
                s6 += xa * w[rb + 6, c]
                s7 += xa * w[rb + 7, c]
            _put(out, bias, m, rb, r0, r1, (s0, s1, s2, s3, s4, s5, s6, s7))


@njit(inline="always")
def _put(out, bias, m, rb, r0, r1, sums):
    """out[m, rb + k] = sums[k] (+ bias) for the rows rb + k inside r0..r1-1."""
    for k in range(len(sums)):
        if r0 <= rb + k < r1:
            out[m, rb + k] = sums[k] + (bias[rb + k] if bias.shape[0] > 0 else np.float32(0.0))


def chunks(units, threads):
    """How many pieces to cut `units` (column pieces or rows) into: one per thread is enough
    when both run, but a few more let the caller finish alone if the worker is late; a
    multiple of `threads` when there are enough units, so that both threads get the same
    share (a 768-column weight is 3 pieces of 256: 2 equal chunks, not 2 + 1)."""
    if threads == 1:
        return 1
    n = max(1, min(units, 8 * threads))
    return n - n % threads if n >= threads else n


_gemv_pool = None


def _pool():
    """gemv_pool, imported on first use (it imports this module's kernels and kernels'
    decode attention; both call here)."""
    global _gemv_pool
    if _gemv_pool is None:
        from . import gemv_pool
        _gemv_pool = gemv_pool
    return _gemv_pool


def matmul_rows(x, w, bias=None, out=None):
    """x: float32 (M, C), w: float32 (C, OC) C-contiguous or the .T of a C-contiguous (OC, C),
    bias: (OC,) or None -> out (M, OC) float32 (x @ w + bias)."""
    gemv_pool = _pool()
    x = np.ascontiguousarray(x, dtype=np.float32)
    M, C = x.shape
    OC = w.shape[1]
    if out is None:
        out = np.empty((M, OC), np.float32)
    b = _NO_BIAS if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    n = threads.gemv_threads(M * C * OC)
    if w.flags.c_contiguous:  # (C, OC): a block's weights; columns split into pieces
        kind, base, units, kernel = gemv_pool.KIND_F32_COLS, w, max(1, OC // MIN_COLS), _cols
    elif w.T.flags.c_contiguous:  # (OC, C) rows seen through .T: the head
        kind, base, units, kernel = gemv_pool.KIND_F32_ROWS, w.T, OC, _rows
    else:
        raise ValueError("gemv.matmul_rows: w must be C-contiguous or the .T of a C-contiguous array")
    if n == 1:  # no job machinery: the kernel on this thread
        gemv_pool.note(kind, 1)
        kernel(x, base, b, out, 0, OC)
        return out
    params = gemv_pool.job_params((x, base, b, out), (M, C, OC, b.shape[0]))
    gemv_pool.run(kind, params, chunks(units, n), n)
    return out


jit.drop_stale_cache(_rows, (cpu_target.__file__,))  # its prefetch intrinsic's code is compiled in
