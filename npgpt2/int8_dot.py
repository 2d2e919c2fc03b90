"""Integer dot products for 8-bit decoding: the activation rows are quantised too.

quant.py stores a weight as int8 rows q (R, K) with float32 scales ws (R, K // G). For a few
rows of activations x (N, K) (decoding: one token per sequence), this module quantises x the
same way, one scale per row and weight group:

    xs[n, g] = max |x[n, group g]| / 127          xq[n, k] = rint(x[n, k] / xs[n, k // G])

and computes out[n, r] = sum_g float32(sum_{k in g} xq[n, k] * q[r, k]) * ws[r, g] * xs[n, g]
(+ bias[r]): the inner sums are exact int32 arithmetic (|sum| <= K * 127 * 127 < 2**31 for
K < 133 000), only the G-sized partial sums are converted to float. This is what ggml's
q8_0 x q8_0 dot product does (its blocks are 32 wide; here a block is the weight's group,
the whole row by default).

Why: decoding reads every weight once per token, so the kernel must keep up with memory.
Converting each int8 weight to float32 and multiplying (quant_kernels._gemv_rows) takes
three instructions per 16 weights; the int8 x int8 -> int32 form takes about three per 32
(sign-extend to int16, `vpmaddwd` multiply-and-add-pairs, add; LLVM picks them itself from
the plain loop in _dot_rows: see `dot_instructions()`), and one per 32 with VNNI's
`vpdpbusd` (_dot_rows_vnni, where the CPU has it: below), so one core keeps up with its
share of the bandwidth and two cores share the rows (gemv_pool.py). On an Intel Xeon
(emeraldrapids, busy machine) a 768 x 2304 weight in cache took 0.179 ms with _dot_rows and
0.066 ms with _dot_rows_vnni, and int8 decoding (124M, one thread) 2.47 s against 1.84 s.

The plain NumPy reference of the same arithmetic is `quant.quantize_activations` and
`quant.int8_dot_reference`; tests hold these kernels equal to it (integers bit-exact).
"""
import os
import re

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import cpu_target, jit
from .cpu_target import prefetch, target_features

QMAX = 127
_FAST = {"reassoc", "contract", "nsz"}
# On one thread the kernels ask for the weight row this many bytes on (rounded up to whole
# rows) into L2 while they work on the current one: one core streamed (R, 768) int8 matrices
# at 8-10 GB/s without, 10-16 GB/s with 4 KB ahead (Intel Xeon, 2026-12-06: the hardware
# prefetcher alone runs too little ahead of a kernel this quick). With both cores reading
# (gemv_pool) it gained nothing from memory and lost up to a third where the weights were
# in L3, so the pool's chunks run without (ahead = 0).
PREFETCH_BYTES = 4096


def prefetch_rows(K):
    """The kernels' `ahead` for one thread over rows of K bytes: PREFETCH_BYTES in whole rows."""
    return -(-PREFETCH_BYTES // K)


@njit(cache=True, nogil=True)
def quantize_rows(x, G, xq, xs):
    """x: float32 (N, K), G divides K -> xq int8 (N, K), xs float32 (N, K // G), in place.

    Not fastmath: the division and the rounding (half to even, as np.rint) must match the
    NumPy reference bit for bit.
    """
    N, K = x.shape
    for n in range(N):
        for g in range(K // G):
            m = np.float32(0.0)
            for k in range(g * G, (g + 1) * G):
                a = abs(x[n, k])
                if a > m:
                    m = a
            s = m / np.float32(QMAX)
            xs[n, g] = s
            if s == 0:  # an all-zero block: q = 0 (and scale 0, so it adds nothing)
                for k in range(g * G, (g + 1) * G):
                    xq[n, k] = 0
                continue
            for k in range(g * G, (g + 1) * G):
                v = np.rint(x[n, k] / s)
                xq[n, k] = np.int8(min(max(v, -QMAX), QMAX))


@njit(cache=True, nogil=True, inline="always")
def _prefetch_row(flat, r, ahead, K, r1):
    """With ahead > 0, ask for row r + ahead of the (R, K) matrix whose flat view is `flat` into
    L2 (every cache line of it, the last byte's too: a row need not start on a line), if it is
    before r1, the end of this call's rows."""
    if ahead > 0 and r + ahead < r1:
        p = (r + ahead) * K
        for k in range(0, K + 63, 64):
            prefetch(flat, p + min(k, K - 1))


@njit(cache=True, nogil=True, fastmath=_FAST)
def _dot_rows(xq, xs, q, ws, bias, out, r0, r1, ahead):
    """out[n, r] for rows r0..r1-1 of q (see the module docstring); bias: (R,) or (0,) for none;
    ahead: prefetch_rows(K) on one thread, else 0 (see PREFETCH_BYTES).

    Plain nested loops with flat indices: LLVM vectorises the int32 reduction (on AVX-512:
    vpmovsxbw + vpmaddwd on 32 int8 pairs per instruction). The integer sums are exact in any
    order; fastmath only lets the few float additions per row reassociate.
    """
    N, K = xq.shape
    NG = ws.shape[1]
    G = K // NG
    has_bias = bias.shape[0] > 0
    flat = q.reshape(-1)
    for r in range(r0, r1):
        _prefetch_row(flat, r, ahead, K, r1)
        for n in range(N):
            acc = np.float32(0.0)
            for g in range(NG):
                s = 0
                for k in range(G):
                    s += xq[n, g * G + k] * q[r, g * G + k]
                # s is exact in int32 (see the module docstring): saying so (np.int32) lets
                # LLVM sum in int32 lanes and pair the products (vpmaddwd); left int64, it
                # widens every product to 64 bits and runs at half the speed
                acc += np.float32(np.int32(s)) * (ws[r, g] * xs[n, g])
            if has_bias:
                acc += bias[r]
            out[n, r] = acc


# ---------------------------------------------------------------- VNNI: u8 x s8 -> s32
# AVX-512 VNNI and AVX-VNNI's `vpdpbusd` multiplies 32 unsigned bytes by 32 signed bytes and
# adds each four products into an int32 lane: one instruction per 32 weights (the plain loop
# above takes three: sign-extend, vpmaddwd, add). Its first operand is unsigned, so the
# activations go in offset by 128 (xu = xq + 128, in 1..255: the byte with its top bit
# flipped) and the surplus 128 * sum_k q[r, k] of each row and group, computed once per
# weight (`weight_sums`), is taken off again. Both sums are exact int32 (|sum| <= K * 255 *
# 127 < 2**31 for K < 66 000). LLVM does not form vpdpbusd from a plain loop's
# zext * sext (as of LLVM 22), so `_dot_u8s8` writes the loop in LLVM IR.
def target_has_vnni():
    """Whether Numba's target can run vpdpbusd on 256-bit registers (AVX-VNNI, or AVX-512 VNNI
    with VL): the condition under which _dot_u8s8 emits it."""
    f = target_features()
    return "+avxvnni" in f or {"+avx512vnni", "+avx512vl"} <= f


VNNI = target_has_vnni()
# which kernel int8_matmul runs: "vnni" (vpdpbusd, _dot_rows_vnni) where the target has it,
# else "madd" (_dot_rows: LLVM's own vpmaddwd / pmaddwd); NPGPT2_INT8_DOT=madd forces the latter
PATH = "vnni" if VNNI and os.environ.get("NPGPT2_INT8_DOT", "") != "madd" else "madd"


def _emit_dot(context, builder, pa, pb, n32):
    """IR: sum over 32 * n32 bytes of int32(pa[i] as u8) * int32(pb[i] as s8) -> i32.

    Four accumulators (vpdpbusd's latency is ~4 cycles, two issue per cycle), then single
    32-byte steps for the rest. Without VNNI in the target (a kernel compiled but never run,
    or the tests' generic CPU), the same sum in plain vector IR, which any target lowers.
    """
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    v8, b32 = ir.VectorType(i32, 8), ir.VectorType(i8, 32)
    vnni = target_has_vnni()
    mod = builder.module
    if vnni:
        fn = mod.declare_intrinsic("llvm.x86.avx512.vpdpbusd.256", fnty=ir.FunctionType(v8, [v8, v8, v8]))

    def step(acc, off):
        a = builder.load(builder.bitcast(builder.gep(pa, [off]), b32.as_pointer()), align=1)
        b = builder.load(builder.bitcast(builder.gep(pb, [off]), b32.as_pointer()), align=1)
        if vnni:
            return builder.call(fn, [acc, builder.bitcast(a, v8), builder.bitcast(b, v8)])
        prod = builder.mul(builder.zext(a, ir.VectorType(i32, 32)), builder.sext(b, ir.VectorType(i32, 32)))
        for j in range(4):  # fold 32 products into 8 lanes, as vpdpbusd does
            part = builder.shuffle_vector(prod, prod, ir.Constant(ir.VectorType(i32, 8), list(range(8 * j, 8 * j + 8))))
            acc = builder.add(acc, part)
        return acc

    zero = ir.Constant(v8, None)
    accs = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]
    nmain = builder.ashr(n32, ir.Constant(i64, 2))
    with cgutils.for_range(builder, nmain) as loop:
        base = builder.mul(loop.index, ir.Constant(i64, 128))
        for j, acc in enumerate(accs):
            off = builder.add(base, ir.Constant(i64, 32 * j))
            builder.store(step(builder.load(acc), off), acc)
    total = builder.load(accs[0])
    for acc in accs[1:]:
        total = builder.add(total, builder.load(acc))
    builder.store(total, accs[0])
    with cgutils.for_range_slice(builder, builder.mul(nmain, ir.Constant(i64, 4)), n32,
                                  ir.Constant(i64, 1)) as (k, _):
        builder.store(step(builder.load(accs[0]), builder.mul(k, ir.Constant(i64, 32))), accs[0])
    red = mod.declare_intrinsic("llvm.vector.reduce.add.v8i32", fnty=ir.FunctionType(i32, [v8]))
    return builder.call(red, [builder.load(accs[0])])


@intrinsic
def _dot_u8s8(typingctx, a, a0, b, b0, n32):
    """sum_{i < 32 * n32} int32(a.flat[a0 + i]) * int32(b.flat[b0 + i]) as int32; a: uint8,
    b: int8, both C-contiguous (flat offsets a0, b0)."""
    def codegen(context, builder, sig, args):
        pa = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [args[1]])
        pb = builder.gep(context.make_array(sig.args[2])(context, builder, args[2]).data, [args[3]])
        return _emit_dot(context, builder, pa, pb, args[4])
    return types.int32(a, types.int64, b, types.int64, types.int64), codegen


@njit(cache=True, nogil=True, fastmath=_FAST)
def _dot_rows_vnni(xu, xs, q, ws, wsum, bias, out, r0, r1, ahead):
    """_dot_rows with the activations offset (xu = xq + 128, uint8) and vpdpbusd: out[n, r]
    for rows r0..r1-1, the same numbers (the integer sums are equal, see above); wsum: int32
    (R, NG), weight_sums(q, G); ahead as in _dot_rows. xu and q C-contiguous."""
    N, K = xu.shape
    NG = ws.shape[1]
    G = K // NG
    n32 = G // 32
    has_bias = bias.shape[0] > 0
    flat = q.reshape(-1)
    for r in range(r0, r1):
        _prefetch_row(flat, r, ahead, K, r1)
        for n in range(N):
            acc = np.float32(0.0)
            for g in range(NG):
                s = np.int32(_dot_u8s8(xu, n * K + g * G, q, r * K + g * G, n32))
                for k in range(g * G + 32 * n32, (g + 1) * G):  # the last G % 32 bytes
                    s += np.int32(xu[n, k]) * np.int32(q[r, k])
                s -= np.int32(128) * wsum[r, g]
                acc += np.float32(s) * (ws[r, g] * xs[n, g])
            if has_bias:
                acc += bias[r]
            out[n, r] = acc


@njit(cache=True, nogil=True)
def quantize_rows_offset(x, G, xq, xs, xu):
    """quantize_rows, and xu = xq + 128 as uint8 (the byte with its top bit flipped)."""
    quantize_rows(x, G, xq, xs)
    for n in range(xq.shape[0]):
        for k in range(xq.shape[1]):
            xu[n, k] = np.uint8(np.int32(xq[n, k]) + 128)


def weight_sums(q, G):
    """q: int8 (R, K) -> int32 (R, K // G): each row's sum per group of G (the VNNI offset's
    correction)."""
    R, K = q.shape
    return q.reshape(R, K // G, G).sum(axis=2, dtype=np.int32)


def dot_vnni(xq, xs, q, ws, bias=None):
    """dot() through _dot_rows_vnni (any target: without VNNI its IR is plain vector code)."""
    xu = (xq.view(np.uint8) ^ np.uint8(0x80)).reshape(xq.shape)
    out = np.empty((xq.shape[0], q.shape[0]), np.float32)
    _dot_rows_vnni(xu, xs, np.ascontiguousarray(q), ws, weight_sums(q, q.shape[1] // ws.shape[1]),
                   _NO_BIAS if bias is None else bias, out, 0, q.shape[0], prefetch_rows(q.shape[1]))
    return out


def quantize(x, G, offset=False):
    """x: float (N, K) -> (xq int8 (N, K), xs float32 (N, K // G)) with quantize_rows; with
    offset, also xu = xq + 128 uint8 (N, K) (_dot_rows_vnni's activations)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, K = x.shape
    xq = np.empty((N, K), np.int8)
    xs = np.empty((N, K // G), np.float32)
    if not offset:
        quantize_rows(x, G, xq, xs)
        return xq, xs
    xu = np.empty((N, K), np.uint8)
    quantize_rows_offset(x, G, xq, xs, xu)
    return xq, xs, xu


_NO_BIAS = np.zeros(0, np.float32)


def dot(xq, xs, q, ws, bias=None):
    """The whole product on this thread: (N, K) int8 x (R, K) int8 -> (N, R) float32."""
    out = np.empty((xq.shape[0], q.shape[0]), np.float32)
    _dot_rows(xq, xs, q, ws, _NO_BIAS if bias is None else bias, out, 0, q.shape[0], prefetch_rows(q.shape[1]))
    return out


ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")


def cpu_info(path="/proc/cpuinfo"):
    """{"model": the CPU's name, "flags": the ISA features among ISA_FLAGS it has} (Linux;
    elsewhere the model is platform.processor() and the flags are unknown: [])."""
    import platform
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open(path) as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key == "model name" and model in (platform.processor(), platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif key == "flags":
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in ISA_FLAGS if f in have]
                    break
    except OSError:
        pass
    return {"model": model, "flags": flags}


SIMD_INSTRUCTIONS = ("vpdpbusd", "vpdpwssd", "vpmaddwd", "vpmaddubsw", "pmaddwd")


def dot_instructions(path=None):
    """{instruction: count} of the integer multiply-add instructions LLVM chose for the kernel
    of `path` ("vnni": _dot_rows_vnni, "madd": _dot_rows; default PATH, the one int8_matmul
    runs) on this CPU, the widest register ("zmm" AVX-512, "ymm" AVX2, "xmm" SSE), and the
    path: which kernel the machine actually runs (benchmarks/run.py prints it)."""
    path = path or PATH
    # a fresh, uncached compile of the same function (Numba cannot show cached code's asm)
    py = (_dot_rows_vnni if path == "vnni" else _dot_rows).py_func
    fn = njit(cache=False, nogil=True, fastmath=_FAST)(py)
    i8, f32 = numba.types.int8[:, ::1], numba.types.float32[:, ::1]
    args = (i8, f32, i8, f32, numba.types.float32[::1], f32, numba.types.int64, numba.types.int64, numba.types.int64)
    if path == "vnni":
        args = (numba.types.uint8[:, ::1], f32, i8, f32, numba.types.int32[:, ::1]) + args[4:]
    fn.compile(args)
    asm = fn.inspect_asm(args)
    found = {i: len(re.findall(r"\b%s\b" % i, asm)) for i in SIMD_INSTRUCTIONS}
    found = {i: n for i, n in found.items() if n}
    width = next((w for w in ("zmm", "ymm", "xmm") if re.search(r"%" + w + r"\d", asm)), "scalar")
    return {"path": path, "instructions": found, "register": width}


jit.drop_stale_cache(_dot_rows, (cpu_target.__file__,))  # its prefetch intrinsic's code is compiled in
