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
  passes of 8 weight rows over tiles of 512 columns, two input rows per pass, into a local
  accumulator (loaded and stored once per 8 multiply-adds per row). The columns are cut
  into pieces of >= MIN_COLS for the threads (pieces of 64 columns read C short pieces
  4*OC bytes apart: 0.4 GB/s).
- the pieces (or rows) are shared between this thread and gemv_pool's worker when
  threads.gemv_threads() finds a second core free; no BLAS threads to wake.

A row's outputs have the same bits whatever M, its place among the rows and the split
between threads (each output is summed by the same loop): batched decoding gives each
sequence the logits it gets alone (tests/test_gemv.py, on the generic, AVX2 and AVX-512
paths). Measured (one thread, CPU time, the kernels called directly on the four block
matrices x 12 layers and the head of a 124M step, Intel Xeon with AVX-512, busy machine,
2026-12-06, alternating with the previous one-row-at-a-time loops): M = 1 36.8-40.4 ms and
M = 8 53.6-60.6 ms (1.5x), against 43.4-53.4 and 105.3-110.7 ms (2.1-2.4x); compiled for
AVX2 (NUMBA_CPU_NAME=haswell) 35.4 and 53.7 ms against 56.3 and 125.3. LLVM uses
256-bit vectors on Intel's AVX-512 cores (its prefer-vector-width) and on AVX2 CPUs alike;
it did not keep an 8-row x 16-column block of accumulators in registers across the c loop
when written as loops over a small local array, hence the 8-row passes.

layers.matmul_forward (x @ w + b) is the plain reference; tests hold these equal.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import threads

MAX_ROWS = 8
MIN_COLS = 256  # a column piece of a (C, OC) weight: >= 1 KiB contiguous per row (prefetch-friendly)
KC = 8      # _cols: weight rows per pass (8 products per accumulator load and store)
TILE = 512  # _cols: columns per piece of a pass (8 x 2 KiB of weights, in L1 while the rows use them)
FAST = {"reassoc", "contract", "nsz"}  # sums in any order: SIMD lanes (_rows' dot products)
EXACT = {"contract"}  # fused multiply-adds only: _cols' sums keep the source's order
AHEAD = 2   # _rows: how many 8-row blocks ahead the pairs' passes prefetch
_NO_BIAS = np.zeros(0, np.float32)


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Ask for arr[idx]'s cache line (1-D arr) into L2 without waiting: LLVM's llvm.prefetch
    (x86 prefetcht1, ARM prfm; nothing where the CPU has none). Never faults."""
    def codegen(context, builder, sig, args):
        ptr = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [args[1]])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        # read (0), locality 2 (L2: the block is used a few passes later), data cache (1)
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(arr, idx), codegen


@njit(cache=True, nogil=True, fastmath=EXACT, error_model="numpy")
def _cols(x, w, bias, out, j0, j1):
    """out[m, j0:j1] = x[m] @ w[:, j0:j1] (+ bias[j0:j1]); x (M, C), w (C, OC) rows, bias (OC,) or (0,).

    The weight is read in passes of KC (8) rows: for each TILE of columns of those rows,
    every input row (two at a time) adds its 8 products into a local accumulator (M, j1-j0),
    in one chain of fused multiply-adds from the accumulator.
    So an accumulator entry is loaded and stored once per 8 multiply-adds (16 for a pair of
    rows), each weight value is loaded once per pair of rows from L1 (the 8 x TILE piece
    stays there while the M rows use it) and once from memory, and the 8 row pieces are 8
    sequential streams the prefetcher follows. One accumulator entry per output column:
    every column's sum is computed in the same order whatever M, the columns' split
    between threads or the pairing of rows (no reassociation needed: the j loop is
    elementwise), so a row's result has the same bits alone or in a batch.
    (LLVM does not keep an M x 16-column block in registers across the c loop here; the
    8-row passes get the same effect from L1: 3-4x the old one-row-at-a-time loop at M = 8.)
    """
    M, C = x.shape
    n = j1 - j0
    acc = np.zeros((M, n), np.float32)  # local: LLVM knows it aliases neither w nor out
    ck = C - C % KC
    for c in range(0, ck, KC):
        for t0 in range(0, n, TILE):
            t1 = min(t0 + TILE, n)
            p0, p1 = j0 + t0, j0 + t1  # this tile's columns of w
            w0, w1, w2, w3 = w[c, p0:p1], w[c + 1, p0:p1], w[c + 2, p0:p1], w[c + 3, p0:p1]
            w4, w5, w6, w7 = w[c + 4, p0:p1], w[c + 5, p0:p1], w[c + 6, p0:p1], w[c + 7, p0:p1]
            for m in range(0, M, 2):
                a = acc[m, t0:t1]
                x0, x1, x2, x3 = x[m, c], x[m, c + 1], x[m, c + 2], x[m, c + 3]
                x4, x5, x6, x7 = x[m, c + 4], x[m, c + 5], x[m, c + 6], x[m, c + 7]
                if m + 1 < M:  # a pair: each weight loaded once for two rows
                    b = acc[m + 1, t0:t1]
                    y0, y1, y2, y3 = x[m + 1, c], x[m + 1, c + 1], x[m + 1, c + 2], x[m + 1, c + 3]
                    y4, y5, y6, y7 = x[m + 1, c + 4], x[m + 1, c + 5], x[m + 1, c + 6], x[m + 1, c + 7]
                    for j in range(t1 - t0):
                        v0, v1, v2, v3, v4, v5, v6, v7 = w0[j], w1[j], w2[j], w3[j], w4[j], w5[j], w6[j], w7[j]
                        a[j] = a[j] + x0 * v0 + x1 * v1 + x2 * v2 + x3 * v3 + x4 * v4 + x5 * v5 + x6 * v6 + x7 * v7
                        b[j] = b[j] + y0 * v0 + y1 * v1 + y2 * v2 + y3 * v3 + y4 * v4 + y5 * v5 + y6 * v6 + y7 * v7
                else:
                    for j in range(t1 - t0):
                        v0, v1, v2, v3, v4, v5, v6, v7 = w0[j], w1[j], w2[j], w3[j], w4[j], w5[j], w6[j], w7[j]
                        a[j] = a[j] + x0 * v0 + x1 * v1 + x2 * v2 + x3 * v3 + x4 * v4 + x5 * v5 + x6 * v6 + x7 * v7
    for c in range(ck, C):  # the last C % KC rows, one at a time
        wr = w[c, j0:j1]
        for m in range(M):
            xv = x[m, c]
            a = acc[m]
            for j in range(n):
                a[j] += xv * wr[j]
    for m in range(M):
        for j in range(n):
            out[m, j0 + j] = acc[m, j] + (bias[j0 + j] if bias.shape[0] > 0 else np.float32(0.0))


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
                    _prefetch(flat, p)
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
    """gemv_pool, imported on first use (it imports this module's kernels)."""
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
    params = np.array([x.ctypes.data, base.ctypes.data, b.ctypes.data, out.ctypes.data,
                       M, C, OC, b.shape[0]], np.int64)
    gemv_pool.run(kind, params, chunks(units, n), n)
    return out
