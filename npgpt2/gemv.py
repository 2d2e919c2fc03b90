"""float32 products of a few rows by a weight matrix, reading each weight once: decode's GEMV.

    matmul_rows(x (M, C), w (C, OC), bias (OC,) or None) -> (M, OC)      M <= MAX_ROWS

Used by kernels.matmul_forward and GPT2._head when M = B*T <= MAX_ROWS: batch-1 decoding
(M = 1) and the server's batched decoding (M = the sequences decoded together, one token
each). Memory, not arithmetic, is the limit there: every weight is read once per step and
used M times. OpenBLAS handles M = 1 with its GEMV but 2..8 rows with its GEMM, whose
packing and blocking are built for large M (measured slow), and either way it parks and
wakes its threads around each call. Here:

- w a transposed view of rows (OC, C) (the output head, wte.T): each of the OC rows is
  dotted with the M inputs (the row stays in L1 for the M dots), `_rows`. Measured at
  M = 1..8 on the 50257 x 768 head: 1.5-6x OpenBLAS.
- w (C, OC) C-contiguous (a block's weights, as GPT-2's conv1d stores them): the columns
  are cut into pieces of >= MIN_COLS; for a piece, each row's contiguous slice is read once
  and multiplied into the M outputs' local accumulator, `_cols` (one thread, 3072 x 768
  weights, loaded machine: 5.9 GB/s at M = 1 and 2.8 at M = 4, against OpenBLAS's 5.1 and
  2.1 in the same run; pieces of 64 columns read C short pieces 4*OC bytes apart: 0.4 GB/s).
- the pieces (or rows) are shared between this thread and gemv_pool's worker when
  threads.gemv_threads() finds a second core free; no BLAS threads to wake.

layers.matmul_forward (x @ w + b) is the plain reference; tests hold these equal.
"""
import numpy as np
from numba import njit

from . import threads

MAX_ROWS = 8
MIN_COLS = 256  # a column piece of a (C, OC) weight: >= 1 KiB contiguous per row (prefetch-friendly)
FAST = {"reassoc", "contract", "nsz"}  # sums in any order: SIMD lanes
_NO_BIAS = np.zeros(0, np.float32)


@njit(cache=True, nogil=True, fastmath=FAST, error_model="numpy")
def _cols(x, w, bias, out, j0, j1):
    """out[m, j0:j1] = x[m] @ w[:, j0:j1] (+ bias[j0:j1]); x (M, C), w (C, OC) rows, bias (OC,) or (0,).

    Each of the C rows' j1-j0 weights is read once (a contiguous piece) and multiplied into
    the M rows of a local accumulator: local, so LLVM knows it aliases neither w nor out and
    keeps the loop in SIMD registers (written into `out` directly it measured 4x slower).
    """
    M, C = x.shape
    n = j1 - j0
    acc = np.zeros((M, n), np.float32)
    for c in range(C):
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
