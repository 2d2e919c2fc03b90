"""float32 products of a few rows by a weight matrix, reading each weight once: decode's GEMV.

    matmul_rows(x (M, C), w (C, OC), bias (OC,) or None) -> (M, OC)      M <= MAX_ROWS

Used by kernels.matmul_forward and GPT2._head when M = B*T <= MAX_ROWS: batch-1 decoding
(M = 1) and the server's batched decoding (M = the sequences decoded together, one token
each). Memory, not arithmetic, is the limit there: every weight is read once per step and
used M times. OpenBLAS handles M = 1 with its GEMV but 2..8 rows with its GEMM, whose
packing and blocking are built for large M (measured slow), and either way it parks and
wakes its threads around each call. Here:

- w a transposed view of rows (OC, C) (the output head, wte.T): each of the OC rows is
  dotted with the M inputs (the row stays in L1 for the M dots), `_rows`; the rows are
  shared between this thread and gemv_pool's worker when threads.gemv_threads() finds a
  second core free. Measured at M = 1..8 on the 50257 x 768 head: 1.5-6x OpenBLAS.
- w (C, OC) C-contiguous (a block's weights, stored as GPT-2's conv1d has them): BLAS.
  A (C, OC) layout gives a dot product no contiguous row to read: tiles of columns read C
  short pieces 4*OC bytes apart (a TLB miss each, 0.4 GB/s measured), whole-row updates
  of M outputs were 1.4 GB/s against OpenBLAS's GEMV at 7.4 (one thread, same run). A
  transposed copy would read as the head does, at twice the weights' memory.

layers.matmul_forward (x @ w + b) is the plain reference; tests hold these equal.
"""
import numpy as np
from numba import njit

from . import threads

MAX_ROWS = 8
FAST = {"reassoc", "contract", "nsz"}  # sums in any order: SIMD lanes
_NO_BIAS = np.zeros(0, np.float32)


@njit(cache=True, nogil=True, fastmath=FAST)
def _rows(x, w, bias, out, r0, r1):
    """out[m, r] = x[m] . w[r] (+ bias[r]) for r in r0..r1-1; x (M, C), w (OC, C) rows."""
    M, C = x.shape
    for r in range(r0, r1):
        for m in range(M):
            acc = np.float32(0.0)
            for c in range(C):
                acc += x[m, c] * w[r, c]
            out[m, r] = acc + (bias[r] if bias.shape[0] > 0 else np.float32(0.0))


def chunks(units, threads):
    """How many pieces to cut `units` (tiles or rows) into: one per thread is enough when
    both run, but a few more let the caller finish alone if the worker is late."""
    return max(1, min(units, 1 if threads == 1 else 8 * threads))


def matmul_rows(x, w, bias=None, out=None):
    """x: float32 (M, C), w: float32 (C, OC) C-contiguous or the .T of a C-contiguous (OC, C),
    bias: (OC,) or None -> out (M, OC) float32 (x @ w + bias)."""
    from . import gemv_pool  # gemv_pool imports this module's kernels
    x = np.ascontiguousarray(x, dtype=np.float32)
    M, C = x.shape
    OC = w.shape[1]
    if out is None:
        out = np.empty((M, OC), np.float32)
    if not w.T.flags.c_contiguous:  # w (C, OC) rows of inputs: BLAS (see the module docstring)
        threads.blas_threads(2 * M * C * OC)
        np.matmul(x, w, out=out)
        if bias is not None:
            out += bias
        return out
    b = _NO_BIAS if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    n = threads.gemv_threads(M * C * OC)
    if n == 1:  # no job machinery: the kernel on this thread
        gemv_pool.note(gemv_pool.KIND_F32_ROWS, 1)
        _rows(x, w.T, b, out, 0, OC)
        return out
    params = np.array([x.ctypes.data, w.T.ctypes.data, b.ctypes.data, out.ctypes.data,
                       M, C, OC, b.shape[0]], np.int64)
    gemv_pool.run(gemv_pool.KIND_F32_ROWS, params, chunks(OC, n), n)
    return out
