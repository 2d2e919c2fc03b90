"""Numba twins of quant.py's int8 matmul: they dequantise on the fly (or, decoding, quantise the activations too).

`matmul_forward(inp, weight, bias)` computes what `layers.matmul_forward` computes when
`weight` is a transposed `QuantizedWeight` (the plain way: dequantise all of it, then one
float32 matmul); tests hold the two equal to float32 rounding, and the int8-activation GEMV
equal to its own plain reference (quant.int8_dot_reference) and near the float product.

- A few rows (decode: one token per step; up to GEMV_MAX_ROWS), inside
  `quantised_activations()` (model_fast's forward enters it; everything else is exact in the
  activations, see float_activations), take `int8_matmul`: the
  activation rows are quantised to int8 as well (per row and weight group) and each weight
  row is dotted with them in integer arithmetic (int8_dot.py: VNNI's vpdpbusd where the CPU
  has it, with the weight's per-row sums from `weight_sums`; else vpmaddwd), the rows shared between this
  thread and gemv_pool.py's spinning worker while a core is free. Decode reads every weight
  once per token, so reading 1 byte instead of 4 per weight is the whole gain (memory
  bandwidth, not arithmetic, is the limit), and the second core doubles the bytes read.
  NPGPT2_INT8_KERNEL=dequant keeps the float activations instead: `_gemv`, each int8 row
  converted to float32 in registers and dotted with the inputs, one thread.
- A prompt of up to GEMV_PAR_MAX_ROWS rows takes the same kernel with the weight's rows
  split between the threads (`_gemv_par`), when threads.py finds a second core free.
- Many rows (a long prompt, eval) dequantise the weight into a float32 matrix
  (`QuantizedWeight.dequantize`, as the plain way does) and hand the product to BLAS: there
  each weight is reused by every row, so the GEMM's arithmetic dominates and BLAS does it best.
"""
import contextlib
import os
import threading
import weakref

import numpy as np
from numba import njit, prange

from . import gemv_pool, int8_dot, threads
from .quant import QuantizedWeight

# The float-activation GEMV (`_gemv`, NPGPT2_INT8_KERNEL=dequant) of up to GEMV_MAX_ROWS rows
# runs on one thread (the default int8 x int8 path shares rows with gemv_pool's worker, which
# spins between jobs, so it does not pay the wake-up measured here): a
# parallel launch costs ~0.4 ms under Numba's workqueue layer (threads.py's choice), and on
# this project's VM a sleeping thread takes up to ~1 ms to wake (the 50257 x 768 head: 2.0-2.6
# ms on one thread; on two, 1.1-1.4 ms at best but 2.4-3.3 ms median), more than a layer's
# whole GEMV (~0.1-0.3 ms from memory). Measured at 124M, 16-token prompt + 40 new, idle 2
# cores: 40-55 tok/s with a parallel GEMV, 83-87 tok/s serial (float32: ~40); a 16-token
# prompt: 84 ms serial, 97 ms split between threads (median of 9).
GEMV_MAX_ROWS = 16
# Longer prompts multiply each weight by more rows, so the arithmetic (int8 -> float32
# conversion and FMA) outgrows the launch: 17-32 rows split the weight's rows between the
# threads (32 tokens: 122 ms against 153 serial). Above, dequantise + BLAS: at 124M a 16-token
# prompt took 290 ms that way (the dequantised matrices are 4x the int8 bytes, written then
# read), but at 64 rows BLAS's GEMM is ahead again.
GEMV_PAR_MAX_ROWS = 32
# Which kernel takes the GEMV rows: "int8" (default: the activation rows quantised too and
# integer dot products, int8_dot.py, on up to two threads through gemv_pool.py) or
# "dequant" (the weights converted to float32 in registers, _gemv above: float activations,
# one thread). NPGPT2_INT8_KERNEL=dequant selects the latter (set before import).
KERNEL = os.environ.get("NPGPT2_INT8_KERNEL", "int8")
if KERNEL not in ("int8", "dequant"):
    KERNEL = "int8"
# How int8 weights multiply a few activation rows, per thread: None (outside any block: exact),
# "exact" (float_activations) or "quantised" (quantised_activations, decoding).
_MODE = threading.local()


@contextlib.contextmanager
def _activation_mode(mode, override):
    before = getattr(_MODE, "mode", None)
    if override or before is None:
        _MODE.mode = mode
    try:
        yield
    finally:
        _MODE.mode = before


def float_activations():
    """Within this block, int8 weights multiply the float32 activations as they are (the
    dequantising kernels), whatever the row count and whatever an enclosing block asked:
    training's forward, whose backward (matmul_backward through the dequantised weight) is
    that product's gradient; GPT2._head(fast=False); and a caller who wants decoding's
    products exact (its model_fast decode then leaves the activations unquantised). This is
    also what happens outside any block."""
    return _activation_mode("exact", True)


def quantised_activations():
    """Within this block, up to GEMV_MAX_ROWS rows (decoding) have their activations quantised
    too (int8_dot.py), unless an enclosing float_activations() asked for exact products: what
    model_fast's forward (the kernels' decoding and prefill) enters. Opt-in: every other
    product stays exact in the activations."""
    return _activation_mode("quantised", False)


def quantising():
    """Whether a few-row product here quantises its activations (see quantised_activations)."""
    return getattr(_MODE, "mode", None) == "quantised"


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


@njit(cache=True, parallel=True)
def _gemv_par(x, q, scale, out, chunks):
    """_gemv with the weight's rows in `chunks` slices, one thread each at a time."""
    R = q.shape[0]
    for c in prange(chunks):
        _gemv_rows(x, q, scale, out, c * R // chunks, (c + 1) * R // chunks)


def matmul_forward(inp, weight, bias):
    """inp: float32 (..., K), weight: QuantizedWeight (K, R) (a .T view), bias: (R,) or None
    -> out (..., R) float32."""
    if not isinstance(weight, QuantizedWeight) or not weight.transposed:
        raise TypeError("quant_kernels.matmul_forward: weight must be a transposed QuantizedWeight")
    R, K = weight.q.shape
    x = np.ascontiguousarray(inp.reshape(-1, K), dtype=np.float32)  # [N, K]
    N = x.shape[0]
    if N <= GEMV_MAX_ROWS and KERNEL == "int8" and quantising():
        out = int8_matmul(x, weight.q, weight.scale, bias)  # [N, K] -> [N, R], bias added
        return out.reshape(inp.shape[:-1] + (R,))
    if N <= GEMV_PAR_MAX_ROWS:
        out = np.empty((N, R), dtype=np.float32)  # [N, R]
        n = threads.numba_threads(N * R * K) if N > GEMV_MAX_ROWS else 1
        if n > 1:
            _gemv_par(x, weight.q, weight.scale, out, 4 * n)  # [N, K] -> [N, R]
        else:
            _gemv(x, weight.q, weight.scale, out)  # [N, K] -> [N, R]
    else:
        threads.blas_threads(2 * N * R * K)
        # quant.py's own dequantise (NumPy, on this thread: a Numba parallel loop here, next to
        # BLAS's threads in the GEMM that follows, made each call ~4x slower), then BLAS
        out = x @ weight.dequantize()  # [N, K] @ [K, R] -> [N, R]
    if bias is not None:
        out += bias
    return out.reshape(inp.shape[:-1] + (R,))


def int8_matmul(x, q, scale, bias=None):
    """x: float32 (N, K) C-contiguous, q: int8 (R, K), scale: float32 (R, K // G), bias (R,) or
    None -> (N, R) float32: x quantised per row and group (int8_dot.quantize), then the
    integer dot products, their rows shared with gemv_pool's worker while a core is free."""
    N, K = x.shape
    R, NG = scale.shape
    if not q.flags.c_contiguous:  # both kernels read rows at flat offsets (r * K)
        q = np.ascontiguousarray(q)
    out = np.empty((N, R), np.float32)
    b = int8_dot._NO_BIAS if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    n = threads.gemv_threads(N * R * K)
    if int8_dot.PATH == "vnni":
        xq, xs, xu = int8_dot.quantize(x, K // NG, offset=True)  # [N, K] int8, [N, NG] float32, [N, K] uint8
        wsum = weight_sums(q, K // NG)  # [R, NG] int32
        if n == 1:
            gemv_pool.note(gemv_pool.KIND_INT8_VNNI, 1)
            int8_dot._dot_rows_vnni(xu, xs, q, scale, wsum, b, out, 0, R, int8_dot.prefetch_rows(K))
            return out
        kind = gemv_pool.KIND_INT8_VNNI
        params = gemv_pool.job_params((xu, xs, q, scale, wsum, b, out), (N, K, R, NG, b.shape[0]))
    else:
        xq, xs = int8_dot.quantize(x, K // NG)  # [N, K] int8, [N, NG] float32
        if n == 1:
            gemv_pool.note(gemv_pool.KIND_INT8, 1)
            int8_dot._dot_rows(xq, xs, q, scale, b, out, 0, R, int8_dot.prefetch_rows(K))
            return out
        kind = gemv_pool.KIND_INT8
        params = gemv_pool.job_params((xq, xs, q, scale, b, out), (N, K, R, NG, b.shape[0]))
    # chunks of >= 64 rows (~50 KB of int8 at K = 768), up to 16 per thread: a late worker
    # holds the caller up by one chunk at most
    gemv_pool.run(kind, params, max(1, min(16 * n, R // 64)), n)
    return out


_WEIGHT_SUMS = {}  # id(q) -> int32 (R, NG): int8_dot.weight_sums, once per weight


def weight_sums(q, G):
    """The VNNI kernel's per-row correction for int8 weight q (R, K), groups of G: computed on
    a weight's first decode and kept while q lives (~0.4 % of its bytes at G = K = 768)."""
    key = (id(q), G)
    s = _WEIGHT_SUMS.get(key)
    if s is None:
        s = _WEIGHT_SUMS[key] = int8_dot.weight_sums(q, G)
        weakref.finalize(q, _WEIGHT_SUMS.pop, key, None)
    return s
