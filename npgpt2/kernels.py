"""Fast twins of the hot loops in layers.py: same names, same arguments, same results.

Each public function here computes what its namesake in `layers.py` computes (tests keep
them equal to tight tolerances in float32 and float64); `NPGPT2_PLAIN=1` makes the model
use `layers.py` instead. Functions without a twin here are the plain ones, re-exported.

How the speed is won (each choice was measured against the plain twin, see benchmarks/):
- Numba loops fuse the elementwise passes NumPy would make one temporary at a time
  (layernorm, the softmax bookkeeping, cross-entropy, AdamW, embedding scatter-add).
- Transcendentals stay with NumPy: its float32 `exp`/`tanh` are SIMD, a scalar `tanh`
  from a Numba loop is ~10x slower. So a kernel prepares an argument in one Numba pass,
  lets NumPy apply `np.exp`/`np.tanh` in place, and finishes in a second Numba pass.
- GEMMs stay on BLAS (`np.matmul`). Causal attention runs per block of queries: the
  scores of a block against the keys it may see (never the masked future), so the
  (T, T) matrix is half computed, and at inference never materialised at all.
- `parallel=True` only where two threads measurably beat one; small inputs take the
  serial twin of each loop (thread start-up would cost more than the loop).
- Sums accumulate in float64 with eight partial sums: no loss in float32 and no long
  dependency chain (fastmath stays off, so LLVM may not reorder a single sum itself).

All kernels are compiled with `cache=True`: a second process loads the machine code from
`__pycache__` instead of recompiling.
"""
import math
import os

# Numba's OpenMP workers spin for a while after each parallel loop (libgomp's default);
# on a 2-core machine that spinning takes the core BLAS's second thread needs next, and
# on a busy machine it multiplies the time (measured: forward 6.5 s instead of 3.7 s).
# Only takes effect if libgomp is not loaded yet; a user's own setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from . import quant_kernels  # noqa: E402
from .layers import *  # noqa: F401,F403  (the functions without a fast twin)
from .layers import GELU_SCALE, merge_heads, softmax, split_heads  # noqa: F401
from .quant import QuantizedWeight  # noqa: E402

# below this many elements a loop runs on one thread: starting the second thread costs
# little on an idle machine, but on a busy one it waits for a core (milliseconds)
PARALLEL_MIN = 1 << 20
# queries per block in causal attention (256 measured best at 2 threads: 128 makes BLAS calls
# too small to share between the threads, 512 computes more of the masked triangle)
QBLOCK = 256


# ================================================================ helpers
@njit(cache=True, inline="always")
def _sum(a):
    """float64 sum of a 1-D array, eight partial sums (vectorisable without fastmath)."""
    n = a.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    i = 0
    while i + 8 <= n:
        s0 += a[i]
        s1 += a[i + 1]
        s2 += a[i + 2]
        s3 += a[i + 3]
        s4 += a[i + 4]
        s5 += a[i + 5]
        s6 += a[i + 6]
        s7 += a[i + 7]
        i += 8
    while i < n:
        s0 += a[i]
        i += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, inline="always")
def _dot(a, b):
    """float64 dot product of two 1-D arrays, eight partial sums."""
    n = a.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    i = 0
    while i + 8 <= n:
        s0 += a[i] * np.float64(b[i])
        s1 += a[i + 1] * np.float64(b[i + 1])
        s2 += a[i + 2] * np.float64(b[i + 2])
        s3 += a[i + 3] * np.float64(b[i + 3])
        s4 += a[i + 4] * np.float64(b[i + 4])
        s5 += a[i + 5] * np.float64(b[i + 5])
        s6 += a[i + 6] * np.float64(b[i + 6])
        s7 += a[i + 7] * np.float64(b[i + 7])
        i += 8
    while i < n:
        s0 += a[i] * np.float64(b[i])
        i += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


def _rows(x):
    """(..., C) -> a C-contiguous (N, C) view (or copy)."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


# ================================================================ layernorm
@njit(cache=True, inline="always")
def _ln_row(x, w, b, eps, out, mean, rstd, i):
    C = x.shape[1]
    row = x[i]
    m = _sum(row) / C
    v0 = v1 = v2 = v3 = 0.0
    j = 0
    while j + 4 <= C:
        d0 = row[j] - m
        d1 = row[j + 1] - m
        d2 = row[j + 2] - m
        d3 = row[j + 3] - m
        v0 += d0 * d0
        v1 += d1 * d1
        v2 += d2 * d2
        v3 += d3 * d3
        j += 4
    while j < C:
        d0 = row[j] - m
        v0 += d0 * d0
        j += 1
    r = 1.0 / math.sqrt(((v0 + v1) + (v2 + v3)) / C + eps)
    o = out[i]
    for j in range(C):
        o[j] = (row[j] - m) * r * w[j] + b[j]
    mean[i] = m
    rstd[i] = r


@njit(cache=True, parallel=True)
def _ln_fwd_par(x, w, b, eps, out, mean, rstd):
    for i in prange(x.shape[0]):
        _ln_row(x, w, b, eps, out, mean, rstd, i)


@njit(cache=True)
def _ln_fwd(x, w, b, eps, out, mean, rstd):
    for i in range(x.shape[0]):
        _ln_row(x, w, b, eps, out, mean, rstd, i)


def layernorm_forward(inp, weight, bias, eps=1e-5):
    """inp: (..., C), weight/bias: (C,) -> out (..., C), mean (...), rstd (...)."""
    x = _rows(inp)
    out = np.empty_like(x)
    mean = np.empty(x.shape[0], x.dtype)
    rstd = np.empty(x.shape[0], x.dtype)
    (_ln_fwd_par if x.size >= PARALLEL_MIN else _ln_fwd)(x, weight, bias, eps, out, mean, rstd)
    lead = inp.shape[:-1]
    return out.reshape(inp.shape), mean.reshape(lead), rstd.reshape(lead)


# rows per chunk of the layernorm backward: each chunk keeps its own dweight/dbias partial,
# summed in chunk order afterwards, so the result does not depend on the thread count
LN_CHUNK = 64


@njit(cache=True, inline="always")
def _ln_bwd_chunk(dout, x, w, mean, rstd, dinp, dw_part, db_part, c):
    N, C = x.shape
    dw = dw_part[c]
    db = db_part[c]
    norm = np.empty(C, np.float64)
    dnorm = np.empty(C, np.float64)
    for i in range(c * LN_CHUNK, min(N, (c + 1) * LN_CHUNK)):
        m = np.float64(mean[i])
        r = np.float64(rstd[i])
        for j in range(C):
            norm[j] = (x[i, j] - m) * r
            dnorm[j] = dout[i, j] * np.float64(w[j])
            db[j] += dout[i, j]
            dw[j] += dout[i, j] * norm[j]
        a = _sum(dnorm) / C
        bb = _dot(dnorm, norm) / C
        for j in range(C):
            dinp[i, j] = (dnorm[j] - a - norm[j] * bb) * r


@njit(cache=True)
def _ln_bwd(dout, x, w, mean, rstd, dinp, dw_part, db_part):
    for c in range(dw_part.shape[0]):
        _ln_bwd_chunk(dout, x, w, mean, rstd, dinp, dw_part, db_part, c)


@njit(cache=True, parallel=True)
def _ln_bwd_par(dout, x, w, mean, rstd, dinp, dw_part, db_part):
    for c in prange(dw_part.shape[0]):
        _ln_bwd_chunk(dout, x, w, mean, rstd, dinp, dw_part, db_part, c)


def layernorm_backward(dout, inp, weight, mean, rstd):
    """-> dinp (..., C), dweight (C,), dbias (C,)."""
    x, d = _rows(inp), _rows(dout)
    N, C = x.shape
    nchunks = -(-N // LN_CHUNK)
    dw_part = np.zeros((nchunks, C))
    db_part = np.zeros((nchunks, C))
    dinp = np.empty_like(x)
    (_ln_bwd_par if x.size >= PARALLEL_MIN else _ln_bwd)(
        d, x, weight, mean.reshape(-1), rstd.reshape(-1), dinp, dw_part, db_part)
    dt = x.dtype
    return dinp.reshape(inp.shape), dw_part.sum(axis=0).astype(dt), db_part.sum(axis=0).astype(dt)


# ================================================================ linear
def matmul_forward(inp, weight, bias):
    """inp: (..., C), weight: (C, OC), bias: (OC,) -> out (..., OC).

    One GEMM over all rows (NumPy would make one per batch entry) and the bias added in
    place (one temporary fewer). An int8 weight (quant.QuantizedWeight) goes to its
    dequantising twin in quant_kernels.py.
    """
    if isinstance(weight, QuantizedWeight):
        return quant_kernels.matmul_forward(inp, weight, bias)
    C, OC = weight.shape
    out = inp.reshape(-1, C) @ weight
    out += bias
    return out.reshape(inp.shape[:-1] + (OC,))


def matmul_backward(dout, inp, weight):
    """-> dinp (..., C), dweight (C, OC), dbias (OC,); every product one GEMM over all rows."""
    C, OC = weight.shape
    d = dout.reshape(-1, OC)
    dinp = (d @ weight.T).reshape(inp.shape)
    dweight = inp.reshape(-1, C).T @ d
    return dinp, dweight, d.sum(axis=0)


# ================================================================ GELU
# tanh form: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
@njit(cache=True, parallel=True)
def _gelu_arg_par(x, u):
    for i in prange(x.shape[0]):
        v = x[i]
        u[i] = GELU_SCALE * (v + 0.044715 * v * v * v)


@njit(cache=True)
def _gelu_arg(x, u):
    for i in range(x.shape[0]):
        v = x[i]
        u[i] = GELU_SCALE * (v + 0.044715 * v * v * v)


@njit(cache=True, parallel=True)
def _gelu_fwd_finish_par(x, t):
    for i in prange(x.shape[0]):
        t[i] = 0.5 * x[i] * (1.0 + t[i])


@njit(cache=True)
def _gelu_fwd_finish(x, t):
    for i in range(x.shape[0]):
        t[i] = 0.5 * x[i] * (1.0 + t[i])


@njit(cache=True, parallel=True)
def _gelu_bwd_finish_par(dout, x, t):
    for i in prange(x.shape[0]):
        v = x[i]
        th = t[i]
        dt = (1.0 - th * th) * GELU_SCALE * (1.0 + 3 * 0.044715 * v * v)
        t[i] = dout[i] * (0.5 * (1.0 + th) + 0.5 * v * dt)


@njit(cache=True)
def _gelu_bwd_finish(dout, x, t):
    for i in range(x.shape[0]):
        v = x[i]
        th = t[i]
        dt = (1.0 - th * th) * GELU_SCALE * (1.0 + 3 * 0.044715 * v * v)
        t[i] = dout[i] * (0.5 * (1.0 + th) + 0.5 * v * dt)


def _flat(x):
    return np.ascontiguousarray(x).reshape(-1)


def gelu_forward(inp):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); inp: any shape."""
    x = _flat(inp)
    t = np.empty_like(x)
    par = x.size >= PARALLEL_MIN
    (_gelu_arg_par if par else _gelu_arg)(x, t)
    np.tanh(t, out=t)
    (_gelu_fwd_finish_par if par else _gelu_fwd_finish)(x, t)
    return t.reshape(inp.shape)


def gelu_backward(dout, inp):
    """-> dinp, same shape as inp."""
    x, d = _flat(inp), _flat(dout)
    t = np.empty_like(x)
    par = x.size >= PARALLEL_MIN
    (_gelu_arg_par if par else _gelu_arg)(x, t)
    np.tanh(t, out=t)
    (_gelu_bwd_finish_par if par else _gelu_bwd_finish)(d, x, t)
    return t.reshape(inp.shape)


# ================================================================ attention
def _split_qkv(qkv, NH):
    """(B, T, 3C) -> q, k, v each a C-contiguous (B, NH, T, hs), q already times 1/sqrt(hs).

    Scaling q (T*C numbers) instead of the scores (T*T) saves work; it rounds differently
    from the plain (q @ k.T) * scale only in the last bit.
    """
    B, T, C3 = qkv.shape
    hs = C3 // 3 // NH
    qkv = np.ascontiguousarray(qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4))
    q = qkv[0]
    q *= 1.0 / math.sqrt(hs)
    return q, qkv[1], qkv[2]


@njit(cache=True, inline="always")
def _max(a, n):
    """max of a[:n] (n >= 1), eight partial maxima."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = a[0]
    i = 0
    while i + 8 <= n:
        m0 = max(m0, a[i])
        m1 = max(m1, a[i + 1])
        m2 = max(m2, a[i + 2])
        m3 = max(m3, a[i + 3])
        m4 = max(m4, a[i + 4])
        m5 = max(m5, a[i + 5])
        m6 = max(m6, a[i + 6])
        m7 = max(m7, a[i + 7])
        i += 8
    while i < n:
        m0 = max(m0, a[i])
        i += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


# The blockwise softmax works on rows r0..r1-1 of a C-contiguous (BH, R, *) array (batch
# and heads flattened), columns 0..L-1, where row r may see columns 0..first + (r - r0):
# the full att of training (the rows of one query block) or a prompt's scores buffer
# (keys including the cache). Each head is one unit of work for the parallel drivers.
@njit(cache=True, inline="always")
def _shift_head(s, bh, r0, r1, L, first):
    """Subtract the max over the visible part; -inf on the masked part (so that np.exp
    gives exactly 0 there, as in the plain softmax)."""
    for r in range(r0, r1):
        row = s[bh, r]
        lim = min(L, first + (r - r0) + 1)
        m = _max(row, lim)
        for j in range(lim):
            row[j] = row[j] - m
        for j in range(lim, L):
            row[j] = -np.inf


@njit(cache=True)
def _causal_shift(s, r0, r1, L, first):
    for bh in range(s.shape[0]):
        _shift_head(s, bh, r0, r1, L, first)


@njit(cache=True, parallel=True)
def _causal_shift_par(s, r0, r1, L, first):
    for bh in prange(s.shape[0]):
        _shift_head(s, bh, r0, r1, L, first)


@njit(cache=True, inline="always")
def _normalize_head(s, bh, r0, r1, L):
    """Divide each row's exponentials by their sum."""
    for r in range(r0, r1):
        row = s[bh, r]
        inv = s.dtype.type(1.0 / _sum(row[:L]))
        for j in range(L):
            row[j] = row[j] * inv


@njit(cache=True)
def _normalize_rows(s, r0, r1, L):
    for bh in range(s.shape[0]):
        _normalize_head(s, bh, r0, r1, L)


@njit(cache=True, parallel=True)
def _normalize_rows_par(s, r0, r1, L):
    for bh in prange(s.shape[0]):
        _normalize_head(s, bh, r0, r1, L)


def _causal_softmax_(s, r0, r1, L, first):
    """softmax in place on s[:, :, r0:r1, :L] (s: (B, NH, R, *) C-contiguous), row r
    seeing columns 0..first + r - r0."""
    flat = s.reshape(-1, s.shape[2], s.shape[3])
    par = flat.shape[0] * (r1 - r0) * L >= PARALLEL_MIN
    (_causal_shift_par if par else _causal_shift)(flat, r0, r1, L, first)
    block = s[:, :, r0:r1, :L]
    np.exp(block, out=block)
    (_normalize_rows_par if par else _normalize_rows)(flat, r0, r1, L)


def attention_forward(qkv, NH):
    """Causal multi-head self-attention.

    qkv: (B, T, 3C) -> out (B, T, C), att (B, NH, T, T) the softmax probabilities.
    Query blocks only meet the keys they may see: scores above the diagonal block are
    never computed and att stays 0 there.
    """
    B, T, C3 = qkv.shape
    q, k, v = _split_qkv(qkv, NH)
    att = np.zeros((B, NH, T, T), dtype=qkv.dtype)
    y = np.empty_like(q)
    for i0 in range(0, T, QBLOCK):
        i1 = min(T, i0 + QBLOCK)
        s = att[:, :, i0:i1, :i1]
        np.matmul(q[:, :, i0:i1], k[:, :, :i1].swapaxes(-1, -2), out=s)
        _causal_softmax_(att, i0, i1, i1, i0)
        np.matmul(s, v[:, :, :i1], out=y[:, :, i0:i1])
    return merge_heads(y), att


@njit(cache=True, inline="always")
def _softmax_backward_head(datt, att, bh, r0, scale):
    R, L = datt.shape[1], datt.shape[2]
    sc = datt.dtype.type(scale)
    for r in range(R):
        d = datt[bh, r]
        a = att[bh, r0 + r]
        dot = d.dtype.type(_dot(d, a[:L]))
        for j in range(L):
            d[j] = a[j] * (d[j] - dot) * sc


@njit(cache=True)
def _softmax_backward_rows(datt, att, r0, scale):
    """datt: (BH, R, L) <- att * (datt - sum(datt * att)) * scale, with att's rows
    r0..r0+R-1 (columns 0..L-1) the matching probabilities."""
    for bh in range(datt.shape[0]):
        _softmax_backward_head(datt, att, bh, r0, scale)


@njit(cache=True, parallel=True)
def _softmax_backward_rows_par(datt, att, r0, scale):
    for bh in prange(datt.shape[0]):
        _softmax_backward_head(datt, att, bh, r0, scale)


def attention_backward(dout, qkv, att, NH):
    """dout: (B, T, C) -> dqkv (B, T, 3C). Blockwise like attention_forward."""
    B, T, C3 = qkv.shape
    q, k, v = _split_qkv(qkv, NH)
    hs = q.shape[-1]
    q *= math.sqrt(hs)  # dk needs q unscaled (the scale is applied to dscores)
    scale = 1.0 / math.sqrt(hs)
    att = np.ascontiguousarray(att)
    dy = np.ascontiguousarray(split_heads(dout, NH))
    dqkv = np.empty((3, B, NH, T, hs), dtype=qkv.dtype)
    dq, dk, dv = dqkv[0], dqkv[1], dqkv[2]
    dk[...] = 0
    dv[...] = 0
    for i0 in range(0, T, QBLOCK):
        i1 = min(T, i0 + QBLOCK)
        a = att[:, :, i0:i1, :i1]
        dyb = dy[:, :, i0:i1]
        dv[:, :, :i1] += a.swapaxes(-1, -2) @ dyb
        datt = dyb @ v[:, :, :i1].swapaxes(-1, -2)
        flat = datt.reshape(B * NH, i1 - i0, i1)
        (_softmax_backward_rows_par if flat.size >= PARALLEL_MIN else _softmax_backward_rows)(
            flat, att.reshape(B * NH, T, T), i0, scale)
        np.matmul(datt, k[:, :, :i1], out=dq[:, :, i0:i1])
        dk[:, :, :i1] += datt.swapaxes(-1, -2) @ q[:, :, i0:i1]
    # (3, B, NH, T, hs) -> (B, T, 3, NH, hs) = (B, T, 3C)
    return np.ascontiguousarray(dqkv.transpose(1, 3, 0, 2, 4)).reshape(B, T, C3)


@njit(cache=True)
def _softmax_rows_small(s):
    """s: (N, L) float, in place; for decoding, where each row is short and one loop with
    a scalar exp costs less than three calls around NumPy's."""
    for i in range(s.shape[0]):
        row = s[i]
        m = _max(row, row.shape[0])
        total = 0.0
        for j in range(row.shape[0]):
            e = math.exp(row[j] - m)
            row[j] = e
            total += e
        inv = s.dtype.type(1.0 / total)
        for j in range(row.shape[0]):
            row[j] = row[j] * inv


def _decode_attention(qkv, k_cache, v_cache, pos, NH):
    """attention_forward_cached for one new position: views instead of copies, one
    matrix-vector product per head for the scores and one for the output."""
    B, _, C3 = qkv.shape
    hs = C3 // 3 // NH
    q, k, v = qkv.reshape(B, 3, NH, hs).transpose(1, 0, 2, 3)  # each (B, NH, hs), views
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    end = pos + 1
    s = np.matmul(k_cache[:, :, :end], (q * (1.0 / math.sqrt(hs)))[..., None])  # (B, NH, end, 1)
    _softmax_rows_small(s.reshape(B * NH, end))
    y = np.matmul(s.reshape(B, NH, 1, end), v_cache[:, :, :end])  # (B, NH, 1, hs)
    return y.reshape(B, 1, NH * hs)


def attention_forward_cached(qkv, k_cache, v_cache, pos0, NH):
    """Attention for T new positions pos0..pos0+T-1 against a KV cache (inference only).

    qkv: (B, T, 3C); k_cache, v_cache: (B, NH, n_ctx, hs), filled up to pos0 and written
    here for the new positions. Returns out (B, T, C), equal to rows pos0.. of
    attention_forward over the whole sequence. Blockwise through BLAS like
    attention_forward, with a scores buffer the size of one block (no (T, T) matrix).
    """
    B, T, C3 = qkv.shape
    if T == 1:
        return _decode_attention(qkv, k_cache, v_cache, pos0, NH)
    q, k, v = _split_qkv(qkv, NH)
    end = pos0 + T
    k_cache[:, :, pos0:end] = k
    v_cache[:, :, pos0:end] = v
    y = np.empty_like(q)
    rows = min(T, QBLOCK)
    buf = np.empty(B * NH * rows * end, dtype=qkv.dtype)
    for i0 in range(0, T, QBLOCK):
        i1 = min(T, i0 + QBLOCK)
        L = pos0 + i1
        s = buf[:B * NH * (i1 - i0) * L].reshape(B, NH, i1 - i0, L)
        np.matmul(q[:, :, i0:i1], k_cache[:, :, :L].swapaxes(-1, -2), out=s)
        _causal_softmax_(s, 0, i1 - i0, L, pos0 + i0)
        np.matmul(s, v_cache[:, :, :L], out=y[:, :, i0:i1])
    return merge_heads(y)


# ================================================================ cross-entropy
# one row of (B*T, V) logits per unit of work; training sizes only, so always parallel
@njit(cache=True, parallel=True)
def _ce_shift(logits, targets, shifted, zt):
    """shifted = logits - row max; zt = the target's shifted logit."""
    N, V = logits.shape
    for i in prange(N):
        row = logits[i]
        m = _max(row, V)
        out = shifted[i]
        for j in range(V):
            out[j] = row[j] - m
        zt[i] = out[targets[i]]


@njit(cache=True, parallel=True)
def _ce_finish(e, zt, losses):
    """e: exp(shifted) -> probabilities in place; losses = log(sum e) - zt."""
    N, V = e.shape
    for i in prange(N):
        row = e[i]
        total = _sum(row)
        losses[i] = math.log(total) - zt[i]
        inv = e.dtype.type(1.0 / total)
        for j in range(V):
            row[j] = row[j] * inv


def crossentropy_forward(logits, targets):
    """logits: (B, T, V), targets: int (B, T) -> losses (B, T), probs (B, T, V)."""
    x = _rows(logits)
    t = np.ascontiguousarray(targets).reshape(-1)
    N, V = x.shape
    if t.size and (t.min() < 0 or t.max() >= V):
        raise IndexError(f"target id out of range [0, {V})")
    probs = np.empty_like(x)
    zt = np.empty(N, np.float64)
    _ce_shift(x, t, probs, zt)
    np.exp(probs, out=probs)
    losses = np.empty(N, dtype=x.dtype)
    _ce_finish(probs, zt, losses)
    return losses.reshape(targets.shape), probs.reshape(logits.shape)


@njit(cache=True, parallel=True)
def _ce_backward(dlosses, probs, targets, dlogits):
    N, V = probs.shape
    for i in prange(N):
        d = dlosses[i]
        p = probs[i]
        out = dlogits[i]
        for j in range(V):
            out[j] = p[j] * d
        t = targets[i]
        out[t] = (p[t] - 1.0) * d


def crossentropy_softmax_backward(dlosses, probs, targets):
    """dlosses: (B, T) -> dlogits (B, T, V) = (probs - onehot(targets)) * dlosses."""
    p = _rows(probs)
    t = np.ascontiguousarray(targets).reshape(-1)
    if t.size and (t.min() < 0 or t.max() >= p.shape[1]):
        raise IndexError(f"target id out of range [0, {p.shape[1]})")
    dlogits = np.empty_like(p)
    _ce_backward(np.ascontiguousarray(dlosses, dtype=p.dtype).reshape(-1), p, t, dlogits)
    return dlogits.reshape(probs.shape)


# ================================================================ embeddings
@njit(cache=True)
def _scatter_add_rows(dwte, ids, rows):
    for i in range(ids.shape[0]):
        dst = dwte[ids[i]]
        src = rows[i]
        for j in range(src.shape[0]):
            dst[j] += src[j]


def encoder_backward(dout, inp, V, maxT):
    """dout: (B, T, C), inp: (B, T) -> dwte: (V, C), dwpe: (maxT, C)."""
    B, T, C = dout.shape
    ids = np.ascontiguousarray(inp).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise IndexError(f"token id out of range [0, {V})")
    dwte = np.zeros((V, C), dtype=dout.dtype)
    _scatter_add_rows(dwte, ids, _rows(dout))
    dwpe = np.zeros((maxT, C), dtype=dout.dtype)
    dwpe[:T] = dout.sum(axis=0)
    return dwte, dwpe


# ================================================================ AdamW
@njit(cache=True, inline="always")
def _adamw_at(p, g, m, v, i, beta1, beta2, eps, decay, step_size, bc2_sqrt):
    gi = np.float64(g[i])
    mi = beta1 * m[i] + (1.0 - beta1) * gi
    vi = beta2 * v[i] + (1.0 - beta2) * gi * gi
    m[i] = mi
    v[i] = vi
    p[i] = p[i] * decay - step_size * mi / (math.sqrt(vi) / bc2_sqrt + eps)


@njit(cache=True)
def _adamw(p, g, m, v, beta1, beta2, eps, decay, step_size, bc2_sqrt):
    for i in range(p.shape[0]):
        _adamw_at(p, g, m, v, i, beta1, beta2, eps, decay, step_size, bc2_sqrt)


@njit(cache=True, parallel=True)
def _adamw_par(p, g, m, v, beta1, beta2, eps, decay, step_size, bc2_sqrt):
    for i in prange(p.shape[0]):
        _adamw_at(p, g, m, v, i, beta1, beta2, eps, decay, step_size, bc2_sqrt)


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, scratch=None):
    """One AdamW step in place on p, m, v: `optim.adamw_update` (the plain twin, which
    follows torch.optim.AdamW) fused into one pass over the four arrays.

    p, g, m, v: C-contiguous arrays of one shape; step counts from 1; scratch is
    accepted for the plain twin's signature and not needed:
        p *= 1 - lr*wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    arrays = (p, g, m, v)
    if any(not a.flags.c_contiguous for a in arrays) or not (p.flags.writeable and m.flags.writeable
                                                             and v.flags.writeable):
        raise ValueError("adamw_update needs C-contiguous arrays and writeable p, m, v")
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"adamw_update: shapes differ: {[a.shape for a in arrays]}")
    decay = 1.0 - float(lr) * float(weight_decay)
    step_size = float(lr) / (1.0 - beta1 ** step)
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    (_adamw_par if p.size >= PARALLEL_MIN else _adamw)(
        *(a.reshape(-1) for a in arrays), float(beta1), float(beta2), float(eps), decay,
        step_size, bc2_sqrt)
