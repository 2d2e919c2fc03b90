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
the plain loop in _dot_rows: see `dot_instructions()`), so one core keeps up with its share
of the bandwidth and two cores share the rows (gemv_pool.py).

The plain NumPy reference of the same arithmetic is `quant.quantize_activations` and
`quant.int8_dot_reference`; tests hold these kernels equal to it (integers bit-exact).
"""
import re

import numba
import numpy as np
from numba import njit

QMAX = 127
_FAST = {"reassoc", "contract", "nsz"}


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


@njit(cache=True, nogil=True, fastmath=_FAST)
def _dot_rows(xq, xs, q, ws, bias, out, r0, r1):
    """out[n, r] for rows r0..r1-1 of q (see the module docstring); bias: (R,) or (0,) for none.

    Plain nested loops with flat indices: LLVM vectorises the int32 reduction (on AVX-512:
    vpmovsxbw + vpmaddwd on 32 int8 pairs per instruction). The integer sums are exact in any
    order; fastmath only lets the few float additions per row reassociate.
    """
    N, K = xq.shape
    NG = ws.shape[1]
    G = K // NG
    has_bias = bias.shape[0] > 0
    for r in range(r0, r1):
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


def quantize(x, G):
    """x: float (N, K) -> (xq int8 (N, K), xs float32 (N, K // G)) with quantize_rows."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, K = x.shape
    xq = np.empty((N, K), np.int8)
    xs = np.empty((N, K // G), np.float32)
    quantize_rows(x, G, xq, xs)
    return xq, xs


_NO_BIAS = np.zeros(0, np.float32)


def dot(xq, xs, q, ws, bias=None):
    """The whole product on this thread: (N, K) int8 x (R, K) int8 -> (N, R) float32."""
    out = np.empty((xq.shape[0], q.shape[0]), np.float32)
    _dot_rows(xq, xs, q, ws, _NO_BIAS if bias is None else bias, out, 0, q.shape[0])
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


def dot_instructions():
    """{instruction: count} of the integer multiply-add instructions LLVM chose for _dot_rows
    on this CPU, and the widest register ("zmm" AVX-512, "ymm" AVX2, "xmm" SSE): which kernel
    the machine actually runs (benchmarks/run.py prints it). Compiles the kernel if needed."""
    # a fresh, uncached compile of the same function (Numba cannot show cached code's asm)
    fn = njit(cache=False, nogil=True, fastmath=_FAST)(_dot_rows.py_func)
    i8, f32 = numba.types.int8[:, ::1], numba.types.float32[:, ::1]
    sig = (i8, f32, i8, f32, numba.types.float32[::1], f32, numba.types.int64, numba.types.int64)
    fn.compile(sig)
    asm = fn.inspect_asm(sig)
    found = {i: len(re.findall(r"\b%s\b" % i, asm)) for i in SIMD_INSTRUCTIONS}
    found = {i: n for i, n in found.items() if n}
    width = next((w for w in ("zmm", "ymm", "xmm") if re.search(r"%" + w + r"\d", asm)), "scalar")
    return {"instructions": found, "register": width}
