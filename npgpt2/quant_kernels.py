"""Numba twins of quant.py's int8 matmul: they dequantise on the fly.

`matmul_forward(inp, weight, bias)` computes what `layers.matmul_forward` computes when
`weight` is a transposed `QuantizedWeight` (the plain way: dequantise all of it, then one
float32 matmul); tests hold the two equal to float32 rounding.

- A few rows (decode: one token per step) take `_gemv`: each int8 row of the weight is read
  once, converted to float32 in registers and dotted with the inputs; the scale multiplies
  each group's sum. Decode reads every weight once per token, so reading 1 byte instead of
  4 per weight is the whole gain (memory bandwidth, not arithmetic, is the limit).
- Many rows (a prompt, eval) dequantise the weight into a float32 scratch matrix (`_dequant`,
  bit-identical to quant.QuantizedWeight.rows) and hand the product to BLAS: there each
  weight is reused by every row, so the GEMM's arithmetic dominates and BLAS does it best.
"""
import numpy as np
from numba import njit, prange

from .quant import QuantizedWeight

# below this many weights dequantising runs on one thread (thread start-up would cost more).
# The GEMV always runs on one thread: a parallel launch costs ~0.2 ms under Numba's
# workqueue layer (threads.py's choice), more than a layer's whole GEMV (~0.12 ms for
# 768 x 3072 int8 from memory). Measured at 124M, 16-token prompt + 40 new, idle 2 cores:
# 40-55 tok/s with a prange GEMV above 2**18 weights, 83-87 tok/s serial (float32: ~40).
PARALLEL_MIN = 1 << 18
# up to this many input rows the GEMV kernel; above, dequantise + BLAS GEMM
GEMV_MAX_ROWS = 8
# the dot products may be summed in any order (SIMD lanes), so LLVM can vectorise them
FAST = {"reassoc", "contract", "nsz"}


@njit(cache=True, fastmath=FAST)
def _gemv_rows(x, q, scale, out, r0, r1):
    """out[n, r] = sum_g scale[r, g] * sum_{k in group g} x[n, k] * q[r, k], rows r0..r1-1.

    Written as plain nested loops with flat indices: LLVM vectorises this form (int8 ->
    float32 conversion and FMA, 16 lanes); an inlined helper or a range(g*G, (g+1)*G)
    measured 10-20x slower.
    """
    N, K = x.shape
    NG = scale.shape[1]
    G = K // NG
    for r in range(r0, r1):
        for n in range(N):
            acc = np.float32(0.0)
            for g in range(NG):
                s = np.float32(0.0)
                for k in range(G):
                    s += x[n, g * G + k] * np.float32(q[r, g * G + k])
                acc += s * scale[r, g]
            out[n, r] = acc


@njit(cache=True)
def _gemv(x, q, scale, out):
    _gemv_rows(x, q, scale, out, 0, q.shape[0])


@njit(cache=True, inline="always")
def _dequant_row(q, scale, out, r):
    K = q.shape[1]
    NG = scale.shape[1]
    G = K // NG
    for g in range(NG):
        s = scale[r, g]
        for k in range(g * G, (g + 1) * G):
            out[r, k] = np.float32(q[r, k]) * s


@njit(cache=True, parallel=True)
def _dequant_par(q, scale, out):
    for r in prange(q.shape[0]):
        _dequant_row(q, scale, out, r)


@njit(cache=True)
def _dequant(q, scale, out):
    for r in range(q.shape[0]):
        _dequant_row(q, scale, out, r)


def dequantize(weight):
    """The float32 (R, K) rows of a QuantizedWeight (== weight.rows(slice(None)), bit for bit)."""
    out = np.empty(weight.q.shape, dtype=np.float32)
    (_dequant_par if weight.q.size >= PARALLEL_MIN else _dequant)(weight.q, weight.scale, out)
    return out


def matmul_forward(inp, weight, bias):
    """inp: float32 (..., K), weight: QuantizedWeight (K, R) (a .T view), bias: (R,) or None
    -> out (..., R) float32."""
    if not isinstance(weight, QuantizedWeight) or not weight.transposed:
        raise TypeError("quant_kernels.matmul_forward: weight must be a transposed QuantizedWeight")
    R, K = weight.q.shape
    x = np.ascontiguousarray(inp.reshape(-1, K), dtype=np.float32)  # [N, K]
    if x.shape[0] <= GEMV_MAX_ROWS:
        out = np.empty((x.shape[0], R), dtype=np.float32)  # [N, R]
        _gemv(x, weight.q, weight.scale, out)  # one thread: see PARALLEL_MIN
    else:
        out = x @ dequantize(weight).T  # [N, K] @ [K, R] -> [N, R], BLAS
    if bias is not None:
        out += bias
    return out.reshape(inp.shape[:-1] + (R,))
