"""Fast twins of the hot loops in layers.py: same names, same arguments, same results.

The twins (each computes what its namesake in `layers.py` computes; tests keep them equal
in float32 and float64) are listed in TWINS; the functions without a twin are the plain
ones, re-exported by name (PLAIN), so that `kernels.embedding_forward` is visibly
`layers.embedding_forward` and `kernels.layernorm_forward` visibly is not. `NPGPT2_PLAIN=1`
makes the model use `layers.py` instead. One contract differs by design: what
attention_forward saves for attention_backward (the plain twin: the probabilities
(B, NH, T, T); here: the output and each row's log-sum-exp, see "fused attention").

How the speed is won (each choice was measured against the plain twin, see benchmarks/):
- Numba loops fuse the elementwise passes NumPy would make one temporary at a time
  (layernorm, the softmax bookkeeping, cross-entropy, AdamW, embedding scatter-add).
- Transcendentals must vectorise: a scalar `exp`/`tanh` from a Numba loop is ~10x slower
  than NumPy's SIMD ones. float32 `exp` is `_exp32`, a polynomial plus an exponent written
  into the bits, which LLVM vectorises inside the loop that needs it (the attention
  forward's rows, GELU as x * sigmoid(2u)): one pass, where handing the exp to NumPy took
  three. Elsewhere a kernel prepares an argument in one Numba pass, lets NumPy apply
  `np.exp` in place, and finishes in a second Numba pass.
- GEMMs stay on BLAS (`np.matmul`). Causal attention runs per block of queries, skipping
  the masked future, and keeps no (T, T) matrix; its forward's heads run on two Python
  threads (one BLAS thread each), where OpenBLAS's own two threads gained little.
- `parallel=True` only where two threads measurably beat one; small inputs, and any
  input while `threads.py` finds no free core, take the serial twin of each loop.
- Sums accumulate in float64 with eight partial sums: no loss in float32 and no long
  dependency chain (fastmath stays off, so LLVM may not reorder a single sum itself).

All kernels are compiled with `cache=True`: a second process loads the machine code from
`__pycache__` instead of recompiling.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

# Numba's OpenMP workers spin for a while after each parallel loop (libgomp's default);
# on a 2-core machine that spinning takes the core BLAS's second thread needs next, and
# on a busy machine it multiplies the time (measured: forward 6.5 s instead of 3.7 s).
# Only takes effect if libgomp is not loaded yet; a user's own setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import literal_unroll, njit, prange, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

from . import gemv, quant_kernels, threads  # noqa: E402

# the plain functions, which have no fast twin here (the model calls them through this module)
from .layers import (  # noqa: F401,E402
    GELU_SCALE,  # noqa: E402
    embedding_forward,
    lora_backward,
    lora_embedding_backward,
    lora_embedding_forward,
    lora_head_backward,
    lora_head_forward,
    merge_heads,
    softmax,
    split_heads,
)
from .quant import QuantizedWeight  # noqa: E402


def float_activations():
    """quant_kernels.float_activations(): training's forward multiplies int8 weights by
    unquantised activations (model_backward.py finds it here, on the ops module). Looked up at
    the call: quant_kernels imports gemv_pool, which imports this module, so it may not have
    its functions yet while this one is imported."""
    return quant_kernels.float_activations()


PLAIN = ("embedding_forward", "lora_backward", "lora_embedding_backward", "lora_embedding_forward",
         "lora_head_backward", "lora_head_forward", "merge_heads", "softmax", "split_heads")
# the fast twins defined below, each with its plain namesake's signature (layers.py; for
# adamw_update, optim.py)
TWINS = ("layernorm_forward", "layernorm_backward", "matmul_forward", "matmul_backward",
         "gelu_forward", "gelu_backward", "attention_forward", "attention_backward",
         "attention_forward_cached", "crossentropy_forward", "crossentropy_softmax_backward",
         "embedding_backward", "adamw_update", "lora_forward")

# below this many elements a loop runs on one thread: starting the second thread costs
# little on an idle machine, but on a busy one it waits for a core (milliseconds)
PARALLEL_MIN = 1 << 20
# queries per block in causal attention: 64, 128 and 256 took the same CPU time in the
# forward at T=1024 (27-28 ms a layer, Intel Xeon, 2026-12-06); fewer rows waste less of the
# diagonal block on masked scores, more make longer BLAS calls.
QBLOCK = 256


def _parallel(n):
    """Run a loop over n elements on Numba's threads? Only if big enough, and only while
    the thread policy finds more than one core free for us (threads.py)."""
    return n >= PARALLEL_MIN and threads.numba_threads(n) > 1


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


@intrinsic
def _f32_from_bits(typingctx, i):
    """The float32 whose 32 bits are the integer i's low 32 (a bitcast, no conversion)."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        bits = builder.trunc(args[0], ir.IntType(32)) if i.bitwidth > 32 else args[0]
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(i), codegen


@intrinsic
def _fma32(typingctx, a, b, c):
    """a * b + c for float32s, rounded once (llvm.fma): the same bits in a loop's SIMD body and in
    its scalar tail, where fastmath "contract" may fuse in one and not the other."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, sig, args):
        f = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f], fnty=ir.FunctionType(f, [f, f, f]))
        return builder.call(fn, args)
    return types.float32(types.float32, types.float32, types.float32), codegen


LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = HI + LO, HI with few bits: k * HI is exact
# 1/7!, 1/6!, ..., 1/1!, 1/0!: e^f's Taylor coefficients, highest first (Horner)
EXP_TAYLOR = (1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0)


@njit(cache=True, inline="always")
def _exp32(x):
    """exp of a float32, in float32 operations that vectorise in a loop (Numba has no vector exp
    without Intel's SVML; NumPy's np.exp would need a pass of its own over the data).

    x is clamped to [-87, 88] (exp(-87) ~ 1.6e-38, 2^k stays a normal float32). exp(x) = 2^k e^f,
    k = round(x / ln 2), f = x - k ln 2 (|f| <= 0.35; the two-part ln 2 keeps f exact to its last
    bit): e^f by its Taylor polynomial of degree 7 (truncation error 5e-9) in fused multiply-adds,
    2^k by writing k + 127 into a float32's exponent field. Measured: relative error <= 3.2e-7
    over [-87, 88]; ~0.6 ns an element in a GELU loop (1.0 with separate multiplies and adds)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    k = np.floor(_fma32(x, np.float32(LOG2E), np.float32(0.5)))
    f = _fma32(k, np.float32(-LN2_LO), _fma32(k, np.float32(-LN2_HI), x))
    p = np.float32(EXP_TAYLOR[0])
    for c in literal_unroll(EXP_TAYLOR[1:]):
        p = _fma32(f, p, np.float32(c))
    return p * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


def _exp(x):
    """exp in the kernels' loops, finite for any x: _exp32 for a float32, otherwise (float64:
    tests, gradient checks) math.exp with x clamped to 709 (exp(710) overflows float64)."""
    return math.exp(min(x, 709.0))


@overload(_exp, jit_options={"cache": True})
def _exp_typed(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(min(x, 709.0))


def _rows(x):
    """(..., C) -> a C-contiguous (N, C) view (or copy)."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


# Work split into independent parts runs on Python threads: BLAS and the Numba loops marked
# nogil release the GIL, and a part that keeps its data in one core's cache (one head's
# attention) beats one BLAS call shared by two threads.
_pool = None


def _forget_pool():  # a forked child has the parent's pool object but not its threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _on_threads(part, n):
    """part(t) for t in 0..n-1, part(0) on this thread, the others on the pool's threads."""
    global _pool
    if n > 1 and _pool is None:
        _pool = ThreadPoolExecutor(max_workers=threads.available_cpus(), thread_name_prefix="npgpt2-part")
    others = [_pool.submit(part, t) for t in range(1, n)]
    try:
        part(0)
    finally:
        for f in others:
            f.result()


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
    (_ln_fwd_par if _parallel(x.size) else _ln_fwd)(x, weight, bias, eps, out, mean, rstd)
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
    (_ln_bwd_par if _parallel(x.size) else _ln_bwd)(
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
    x = inp.reshape(-1, C)
    if x.shape[0] <= gemv.MAX_ROWS and weight.dtype == x.dtype == np.float32 and weight.flags.c_contiguous:
        # decoding (one row per sequence): gemv.py reads each weight once, on 2 cores while one is free
        return gemv.matmul_rows(x, weight, bias).reshape(inp.shape[:-1] + (OC,))
    threads.blas_threads(2 * x.shape[0] * C * OC)
    out = x @ weight
    out += bias
    return out.reshape(inp.shape[:-1] + (OC,))


def matmul_backward(dout, inp, weight):
    """-> dinp (..., C), dweight (C, OC), dbias (OC,); every product one GEMM over all rows."""
    C, OC = weight.shape
    d = dout.reshape(-1, OC)
    threads.blas_threads(2 * d.shape[0] * C * OC)
    dinp = (d @ weight.T).reshape(inp.shape)
    dweight = inp.reshape(-1, C).T @ d
    return dinp, dweight, d.sum(axis=0)


def lora_forward(inp, weight, bias, lora_A, lora_B, scaling):
    """layers.lora_forward with the frozen product on matmul_forward above (one GEMM with the
    bias added in place; an int8 weight's GEMV when decoding, which the plain twin would
    dequantise whole for every token). -> out (..., OC), h (..., r)."""
    C, r = lora_A.shape
    out = matmul_forward(inp, weight, bias)  # [..., C] -> [..., OC]
    h = inp.reshape(-1, C) @ lora_A  # [N, C] @ [C, r] -> [N, r]
    out.reshape(-1, out.shape[-1])[...] += scaling * (h @ lora_B)  # [N, r] @ [r, OC] -> [N, OC]
    return out, h.reshape(inp.shape[:-1] + (r,))


# ================================================================ GELU
# tanh form: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed in one pass as
# x * sigmoid(2u) (0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + exp(-2u))): float32's _exp
# vectorises, where the tanh form took three passes (argument, NumPy's tanh, finish).
# Each formula is written once, for element i; a serial and a parallel loop run it.
# error_model="numpy" on every inlined level (no ZeroDivisionError check) and one constant per
# statement: without either, the loops calling these stayed scalar (checked with inspect_asm)
@njit(cache=True, inline="always", error_model="numpy")
def _gelu_sigmoid(x, i):
    """-> (x[i], e = exp(-2u), sg = sigmoid(2u) = 1 / (1 + e)) at x[i], in x's dtype."""
    one = x.dtype.type(1.0)
    c = x.dtype.type(GELU_SCALE)
    k = x.dtype.type(0.044715)
    v = x[i]
    e = _exp(x.dtype.type(-2.0) * c * (v + k * v * v * v))
    return v, e, one / (one + e)


@njit(cache=True, inline="always", error_model="numpy")
def _gelu_dsig(x, v, e, sg):
    """-> GELU'(v) from _gelu_sigmoid's (v, e, sg) (x: for its dtype): with th = tanh(u) =
    2 sg - 1, layers.gelu_backward's 0.5 (1 + th) + 0.5 x (1 - th^2) du/dx is
    sg + 2 x sg (1 - sg) du/dx, and 1 - sg = e sg (no cancellation where sg is near 1)."""
    c = x.dtype.type(GELU_SCALE)
    k3 = x.dtype.type(3 * 0.044715)
    du = c * (x.dtype.type(1.0) + k3 * v * v)
    return sg + x.dtype.type(2.0) * v * (e * sg) * sg * du  # e * sg first: e alone may be ~1e38


# the loops call each helper above directly: one more level of inlining between (an
# element-i function calling them) left the loops scalar. No fastmath "contract": LLVM would
# fuse multiply-adds in the SIMD body and maybe not in the scalar tail, so an element's bits
# would depend on where the array ends (a batch of 2 windows vs 3 gave different losses)
@njit(cache=True, error_model="numpy")
def _gelu_fwd(x, out):
    for i in range(x.shape[0]):
        out[i] = x[i] * _gelu_sigmoid(x, i)[2]


@njit(cache=True, parallel=True, error_model="numpy")
def _gelu_fwd_par(x, out):
    for i in prange(x.shape[0]):
        out[i] = x[i] * _gelu_sigmoid(x, i)[2]


@njit(cache=True, error_model="numpy")
def _gelu_bwd(dout, x, out):
    for i in range(x.shape[0]):
        v, e, sg = _gelu_sigmoid(x, i)
        out[i] = dout[i] * _gelu_dsig(x, v, e, sg)


@njit(cache=True, parallel=True, error_model="numpy")
def _gelu_bwd_par(dout, x, out):
    for i in prange(x.shape[0]):
        v, e, sg = _gelu_sigmoid(x, i)
        out[i] = dout[i] * _gelu_dsig(x, v, e, sg)


def _flat(x):
    return np.ascontiguousarray(x).reshape(-1)


def gelu_forward(inp):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); inp: any shape."""
    x = _flat(inp)
    out = np.empty_like(x)
    (_gelu_fwd_par if _parallel(x.size) else _gelu_fwd)(x, out)
    return out.reshape(inp.shape)


def gelu_backward(dout, inp):
    """-> dinp, same shape as inp."""
    x = _flat(inp)
    out = np.empty_like(x)
    (_gelu_bwd_par if _parallel(x.size) else _gelu_bwd)(_flat(dout), x, out)
    return out.reshape(inp.shape)


# ================================================================ attention
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


# ---------------------------------------------------------------- fused attention
# Neither pass keeps the (B, NH, T, T) probabilities. Both take each head's queries QBLOCK
# rows at a time together with the whole rows of scores they see, s = q k^T of shape
# (R, first + i1), in a buffer the size of one block. The forward's softmax is then exact
# per row at once (no running max, no rescaling): e = exp(s - max) (0 in the row's future),
# y = (e v) / sum(e), and it saves only each row's log-sum-exp lse = max + log(sum). The
# backward recomputes the block's probabilities as exp(scores - lse) (FlashAttention-2's
# scheme). GEMMs run on BLAS, the row work in Numba.
# Heads are independent, so groups of them go to Python threads (BLAS and the Numba row
# loops below release the GIL), each thread's BLAS on one core: both cores work on every
# product, where OpenBLAS's own two threads gain little on these thin ones (hs = 64).
# q, k, v (and dy) are read where they lie in qkv, dout or the KV cache, and y (and dqkv)
# written in place (BLAS takes a row stride): no copies to split or merge heads.
GROUP_ELEMS = 1 << 16  # scores per thread's block below which heads are grouped into one BLAS call


@njit(cache=True, nogil=True, fastmath={"reassoc"})  # reassoc: the row sum in SIMD lanes
def _exp_rows(s, q0, scale, m, total):
    """s (G, R, n) scores of G heads' R query rows; row r sees keys 0..q0 + r. In place:
    s = exp(scale * (s - max)) over those keys, 0 after them; m = max, total = sum of the row
    (G, R) float64. One pass after the max: float32's _exp vectorises, and the sum with it
    (in SIMD lanes, as BLAS and np.sum sum)."""
    G, R, n = s.shape
    sc = s.dtype.type(scale)  # in s's dtype: a float64 in a float32 loop halves its SIMD width
    for g in range(G):
        for r in range(R):
            row = s[g, r]
            lim = min(n, q0 + r + 1)
            mx = _max(row, lim)
            tot = s.dtype.type(0.0)
            for j in range(lim):
                e = _exp(sc * (row[j] - mx))
                row[j] = e
                tot += e
            for j in range(lim, n):
                row[j] = 0.0
            m[g, r] = mx
            total[g, r] = tot


@njit(cache=True, nogil=True)
def _finish_rows(y, scale, m, total, lse):
    """y (G, R, hs) = e v: y /= total; lse = scale * m + log(total) (G, R)."""
    G, R, hs = y.shape
    for g in range(G):
        for r in range(R):
            inv = y.dtype.type(1.0 / total[g, r])
            for d in range(hs):
                y[g, r, d] *= inv
            lse[g, r] = scale * m[g, r] + math.log(total[g, r])


def _attend_group(q, k, v, first, y, lse, scale, sbuf, m, total):
    """One group of heads, every query block: q (G, Tq, hs), k, v (G, >= first + Tq, hs),
    y (G, Tq, hs), lse, m, total (G, Tq) (views, any row strides); sbuf: the scores' buffer."""
    G, Tq, hs = q.shape
    for i0 in range(0, Tq, QBLOCK):
        i1 = min(Tq, i0 + QBLOCK)
        R, n = i1 - i0, first + i1  # the block's rows and the keys its last row sees
        s = sbuf[:G * R * n].reshape(G, R, n)
        np.matmul(q[:, i0:i1], k[:, :n].swapaxes(1, 2), out=s)  # [G, R, hs] @ [G, hs, n]
        _exp_rows(s, first + i0, scale, m[:, i0:i1], total[:, i0:i1])
        np.matmul(s, v[:, :n], out=y[:, i0:i1])  # [G, R, n] @ [G, n, hs]
        _finish_rows(y[:, i0:i1], scale, m[:, i0:i1], total[:, i0:i1], lse[:, i0:i1])


def _head_parts(B, NH, Tq, L, hs, run, buffers):
    """run(b, h0, h1, buf) for every group of heads h0..h1-1 of batch row b, the groups shared
    out to the part threads (G heads a group: enough scores for one BLAS call to pay);
    buf = buffers(G, R, L), made once per thread (R = a block's query rows, L = the keys)."""
    R = min(Tq, QBLOCK)
    G = max(1, min(NH, GROUP_ELEMS // (R * L)))
    groups = [(b, h, min(NH, h + G)) for b in range(B) for h in range(0, NH, G)]
    n = threads.part_threads(len(groups)) if B * NH * Tq * L >= PARALLEL_MIN else 1
    if n == 1:
        threads.blas_threads(2 * B * NH * R * L * hs)

    def part(t):  # thread t's share of the groups, in order
        buf = buffers(G, R, L)
        for b, h0, h1 in groups[t * len(groups) // n:(t + 1) * len(groups) // n]:
            run(b, h0, h1, buf)

    _on_threads(part, n)


def _causal_attention(q, k, v, first, y, lse):
    """Causal softmax attention of Tq new queries per head: query row r sees keys
    0..first + r. q: (B, NH, Tq, hs), k, v: (B, NH, >= first + Tq, hs), y: (B, NH, Tq, hs)
    written, lse: (B, NH, Tq) float64 written; views with any strides but the last."""
    B, NH, Tq, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    m, total = (np.empty((B, NH, Tq)) for _ in range(2))

    def run(b, h0, h1, buf):
        _attend_group(q[b, h0:h1], k[b, h0:h1], v[b, h0:h1], first, y[b, h0:h1], lse[b, h0:h1], scale,
                      buf, m[b, h0:h1], total[b, h0:h1])
    _head_parts(B, NH, Tq, first + Tq, hs, run, lambda G, R, L: np.empty(G * R * L, q.dtype))  # scores


def _qkv_heads(qkv, NH):
    """(B, T, 3C) -> q, k, v: views (B, NH, T, hs) of its three thirds' heads (no copy)."""
    return (split_heads(t, NH) for t in np.split(np.ascontiguousarray(qkv), 3, axis=-1))


def attention_forward(qkv, NH):
    """Causal multi-head self-attention, fused: the same out as layers.attention_forward.

    qkv: (B, T, 3C) -> out (B, T, C), saved = (out, lse) with lse (B*NH, T) float64 the
    log-sum-exp of each row of scores: all that attention_backward needs to recompute the
    probabilities (the plain twin saves them, (B, NH, T, T)).
    """
    B, T, C3 = qkv.shape
    q, k, v = _qkv_heads(qkv, NH)  # each [B, NH, T, hs]
    out = np.empty((B, T, C3 // 3), qkv.dtype)
    lse = np.empty((B, NH, T))
    _causal_attention(q, k, v, 0, split_heads(out, NH), lse)
    return out, (out, lse.reshape(B * NH, T))


@njit(cache=True, parallel=True)
def _rowdot_heads(dout, out, D, NH):
    """D[b * NH + h, t] = dout[b, t, head h] . out[b, t, head h]  (dout, out: (B, T, C))."""
    B, T, C = out.shape
    hs = C // NH
    for bh in prange(B * NH):
        b, h = bh // NH, bh % NH
        for t in range(T):
            D[bh, t] = _dot(dout[b, t, h * hs:(h + 1) * hs], out[b, t, h * hs:(h + 1) * hs])


@njit(cache=True, nogil=True)
def _probs_rows(s, q0, scale, lse):
    """s (G, R, n) scores q.k of G heads' R query rows (unscaled); row r sees keys
    0..q0 + r. In place: s = exp(scale * s - lse), the probabilities, 0 after those keys."""
    G, R, n = s.shape
    sc = s.dtype.type(scale)
    for g in range(G):
        for r in range(R):
            row = s[g, r]
            lim = min(n, q0 + r + 1)
            z = s.dtype.type(lse[g, r])
            for j in range(lim):
                row[j] = _exp(sc * row[j] - z)
            for j in range(lim, n):
                row[j] = 0.0


@njit(cache=True, nogil=True)
def _dscores_rows(dp, p, D, scale):
    """dp <- scale * p * (dp - D) (G, R, n): the softmax backward (masked entries have p = 0),
    times d(scaled scores)/d(q.k) = scale, so that dq = dp k and dk = dp^T q."""
    G, R, n = dp.shape
    sc = dp.dtype.type(scale)
    for g in range(G):
        for r in range(R):
            d = dp.dtype.type(D[g, r])
            dr = dp[g, r]
            pr = p[g, r]
            for j in range(n):
                dr[j] = sc * pr[j] * (dr[j] - d)


def _backward_group(q, k, v, dy, lse, D, dq, dk, dv, scale, buf):
    """One group of heads' gradients, every query block: q, k, v, dy (G, T, hs), lse, D (G, T)
    -> dq written, dk, dv accumulated (G, T, hs) (views, any row strides); buf = (p, dp, tmp)."""
    G, T, hs = q.shape
    pbuf, dpbuf, tmp = buf
    for i0 in range(0, T, QBLOCK):
        i1 = min(T, i0 + QBLOCK)
        R = i1 - i0  # the block's rows see keys 0..i1-1
        p = pbuf[:G * R * i1].reshape(G, R, i1)
        np.matmul(q[:, i0:i1], k[:, :i1].swapaxes(1, 2), out=p)  # scores [G, R, i1]
        _probs_rows(p, i0, scale, lse[:, i0:i1])
        t_kv = tmp[:G * i1 * hs].reshape(G, i1, hs)
        dv[:, :i1] += np.matmul(p.swapaxes(1, 2), dy[:, i0:i1], out=t_kv)  # [G, i1, R] @ [G, R, hs]
        dp = dpbuf[:G * R * i1].reshape(G, R, i1)
        np.matmul(dy[:, i0:i1], v[:, :i1].swapaxes(1, 2), out=dp)  # [G, R, i1]
        _dscores_rows(dp, p, D[:, i0:i1], scale)  # in the forward: scores = scale * q.k
        np.matmul(dp, k[:, :i1], out=dq[:, i0:i1])  # [G, R, i1] @ [G, i1, hs]
        dk[:, :i1] += np.matmul(dp.swapaxes(1, 2), q[:, i0:i1], out=t_kv)  # [G, i1, R] @ [G, R, hs]


def attention_backward(dout, qkv, saved, NH):
    """dout: (B, T, C), saved = (out, lse) from attention_forward -> dqkv (B, T, 3C).

    Per block of queries, against all the keys they see: p = exp(scale q k^T - lse),
    dv += p^T dy, dp = dy v^T, ds = p (dp - D) with D = rowsum(dy * out), dq = scale ds k,
    dk += scale ds^T q. Groups of heads on the part threads, as in the forward.
    """
    out, lse = saved
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = np.empty((B * NH, T))
    _parallel(dout.size)  # sets Numba's thread count for this loop
    _rowdot_heads(np.ascontiguousarray(dout), np.ascontiguousarray(out), D, NH)
    dqkv = np.zeros((B, T, C3), dtype=qkv.dtype)
    q, k, v = _qkv_heads(qkv, NH)  # each [B, NH, T, hs]
    dq, dk, dv = _qkv_heads(dqkv, NH)  # views into dqkv
    dy = split_heads(np.ascontiguousarray(dout), NH)
    lse, D = lse.reshape(B, NH, T), D.reshape(B, NH, T)
    scale = 1.0 / math.sqrt(C // NH)

    def run(b, h0, h1, buf):
        _backward_group(q[b, h0:h1], k[b, h0:h1], v[b, h0:h1], dy[b, h0:h1], lse[b, h0:h1], D[b, h0:h1],
                        dq[b, h0:h1], dk[b, h0:h1], dv[b, h0:h1], scale, buf)
    _head_parts(B, NH, T, T, C // NH, run,  # probabilities, their gradient, (G, L, hs) scratch
                lambda G, R, L: (np.empty(G * R * L, qkv.dtype), np.empty(G * R * L, qkv.dtype),
                                 np.empty(G * L * (C // NH), qkv.dtype)))
    return dqkv


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
def _decode_attention_kernel(qkv, k_cache, v_cache, rows, pos, NH, out, u0, u1):
    """One new position per sequence, the heads u = b*NH + h for u0 <= u < u1 in one call
    (decoding; gemv_pool shares them between two threads: each head is computed alone).

    qkv: (B, 3C) the new position's queries, keys, values; k_cache, v_cache: (R, NH, n_ctx, hs);
    batch row b is cache row rows[b], filled up to pos[b], and its new key and value are
    written at pos[b]; out: (B, C). Per head: scores s_j = q.k_j / sqrt(hs) for j <= pos[b],
    p = softmax(s), out = sum_j p_j v_j. Each row is computed alone, the same way whatever
    the other rows are (a row decoded in a batch gets the bits it gets alone).
    Sums are in the arrays' dtype, in any order (fastmath: SIMD lanes), as BLAS sums them.
    A few thousand multiply-adds a head: as loops here they cost less than the NumPy calls
    around two small batched matmuls did (~0.1 ms a layer at short contexts).
    """
    C = qkv.shape[1] // 3
    hs = C // NH
    zero = qkv.dtype.type(0.0)
    scale = qkv.dtype.type(1.0 / math.sqrt(hs))
    s = np.empty(pos.max() + 1, dtype=qkv.dtype)
    for u in range(u0, u1):
        b, h = u // NH, u % NH
        p_b = pos[b]
        end = p_b + 1
        c0 = h * hs
        kc = k_cache[rows[b], h]
        vc = v_cache[rows[b], h]
        kc[p_b] = qkv[b, C + c0:C + c0 + hs]
        vc[p_b] = qkv[b, 2 * C + c0:2 * C + c0 + hs]
        q = qkv[b, c0:c0 + hs]
        for j in range(end):
            acc = zero
            for d in range(hs):
                acc += kc[j, d] * q[d]
            s[j] = acc * scale
        m = _max(s, end)
        total = 0.0
        for j in range(end):
            e = math.exp(s[j] - m)
            s[j] = e
            total += e
        inv = qkv.dtype.type(1.0 / total)
        y = out[b, c0:c0 + hs]
        y[:] = zero
        for j in range(end):
            p = s[j] * inv
            for d in range(hs):
                y[d] += p * vc[j, d]


def _decode_attention(qkv, k_cache, v_cache, pos, NH, rows):
    """attention_forward_cached for one new position: (B, 1, 3C) -> (B, 1, C). float32 heads
    are shared with gemv_pool's worker while threads.gemv_threads finds a core free for their
    multiply-adds (a token's attention reads the cache's keys and values, cold after the
    weights' stream: ~1 ms a token at 124M and 50 positions, growing with the context)."""
    B, _, C3 = qkv.shape
    out = np.empty((B, C3 // 3), dtype=qkv.dtype)  # [B, C]
    q = np.ascontiguousarray(qkv.reshape(B, C3))
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    units = B * NH
    n = 1
    if q.dtype == np.float32 and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous:
        n = threads.gemv_threads(2 * units * (int(pos.max()) + 1) * (C3 // 3 // NH))
    if n == 1:
        _decode_attention_kernel(q, k_cache, v_cache, rows, pos, NH, out, 0, units)
    else:
        gemv_pool = gemv._pool()  # imported on first use: it imports this module's decode kernel
        params = gemv_pool.job_params((q, k_cache, v_cache, rows, pos, out),
                                      (B, C3, k_cache.shape[0], NH, k_cache.shape[2], k_cache.shape[3]))
        gemv_pool.run(gemv_pool.KIND_DECODE_ATTN, params, gemv.chunks(units, n), n)
    return out.reshape(B, 1, C3 // 3)


def attention_forward_cached(qkv, k_cache, v_cache, pos0, NH, rows=None):
    """Attention for T new positions of each row against a KV cache (inference only).

    qkv: (B, T, 3C); k_cache, v_cache: (R, NH, n_ctx, hs); row b is cache row rows[b]
    (default b), filled up to pos0 (an int, or an int array (B,)) and written here for the
    new positions. Returns out (B, T, C), equal to rows pos0.. of attention_forward over
    the whole sequence. Blockwise through BLAS like attention_forward, with a scores buffer
    the size of one block (no (T, T) matrix); one new position per row (decoding) in one
    Numba call for every row, each at its own length.
    """
    B, T, C3 = qkv.shape
    if T == 1:
        rows = np.arange(B) if rows is None else np.asarray(rows, dtype=np.int64)
        return _decode_attention(qkv, k_cache, v_cache, np.ascontiguousarray(np.broadcast_to(pos0, (B,)),
                                                                             dtype=np.int64), NH, rows)
    if rows is not None or np.ndim(pos0) != 0:  # rows at their own places: one at a time
        rows = range(B) if rows is None else rows
        pos0 = np.broadcast_to(pos0, (B,))
        return np.concatenate([attention_forward_cached(qkv[b:b + 1], k_cache[r:r + 1], v_cache[r:r + 1],
                                                        int(pos0[b]), NH) for b, r in enumerate(rows)])
    q, k, v = _qkv_heads(qkv, NH)  # each [B, NH, T, hs]
    k_cache[:, :, pos0:pos0 + T] = k
    v_cache[:, :, pos0:pos0 + T] = v
    out = np.empty((B, T, C3 // 3), qkv.dtype)
    _causal_attention(q, k_cache, v_cache, pos0, split_heads(out, NH), np.empty((B, NH, T)))
    return out


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


def _out_rows(out, like):
    """out=None -> a new (N, V) array like `like`; else out's (N, V) view, which must be a
    C-contiguous array of like's shape and dtype (results are written into it)."""
    if out is None:
        return np.empty_like(like)
    if out.shape[-1] != like.shape[-1] or out.size != like.size or out.dtype != like.dtype \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out: expected a writeable C-contiguous {like.dtype} array of "
                         f"{like.size} elements, got {out.dtype} {out.shape}")
    return out.reshape(like.shape)


def crossentropy_forward(logits, targets, out=None):
    """logits: (B, T, V), targets: int (B, T) -> losses (B, T), probs (B, T, V).

    out: where to write probs (C-contiguous); it may be logits itself (the logits are
    then lost), so that training holds one (B, T, V) buffer instead of two.
    """
    x = _rows(logits)
    t = np.ascontiguousarray(targets).reshape(-1)
    N, V = x.shape
    if t.size and (t.min() < 0 or t.max() >= V):
        raise IndexError(f"target id out of range [0, {V})")
    probs = _out_rows(out, x)
    zt = np.empty(N, np.float64)
    _parallel(x.size)  # sets Numba's thread count for the loops below
    _ce_shift(x, t, probs, zt)  # row by row, so probs may be x itself
    np.exp(probs, out=probs)
    losses = np.empty(N, dtype=x.dtype)
    _ce_finish(probs, zt, losses)
    return losses.reshape(targets.shape), probs.reshape(logits.shape)


@njit(cache=True, parallel=True)
def _ce_backward(dlosses, probs, targets, dlogits):
    """dlogits may be probs itself: each row reads p[t] before it writes."""
    N, V = probs.shape
    for i in prange(N):
        d = dlosses[i]
        p = probs[i]
        out = dlogits[i]
        t = targets[i]
        pt = p[t]
        for j in range(V):
            out[j] = p[j] * d
        out[t] = (pt - 1.0) * d


def crossentropy_softmax_backward(dlosses, probs, targets, out=None):
    """dlosses: (B, T) -> dlogits (B, T, V) = (probs - onehot(targets)) * dlosses.

    out: where to write dlogits (C-contiguous); it may be probs itself (training's one
    (B, T, V) buffer).
    """
    p = _rows(probs)
    t = np.ascontiguousarray(targets).reshape(-1)
    if t.size and (t.min() < 0 or t.max() >= p.shape[1]):
        raise IndexError(f"target id out of range [0, {p.shape[1]})")
    dlogits = _out_rows(out, p)
    _parallel(p.size)  # sets Numba's thread count for this loop
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


def embedding_backward(dout, inp, V, maxT):
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


# error_model="numpy": a float division by zero gives inf instead of raising, so LLVM can
# vectorise the loop (the check for ZeroDivisionError kept it scalar: 5.7 -> 1.3 ns an element,
# 124M parameters 0.70 -> 0.16 s a step on one thread). The denominator is >= eps > 0 anyway.
@njit(cache=True, error_model="numpy")
def _adamw(p, g, m, v, beta1, beta2, eps, decay, step_size, bc2_sqrt):
    for i in range(p.shape[0]):
        _adamw_at(p, g, m, v, i, beta1, beta2, eps, decay, step_size, bc2_sqrt)


@njit(cache=True, parallel=True, error_model="numpy")
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
    (_adamw_par if _parallel(p.size) else _adamw)(
        *(a.reshape(-1) for a in arrays), float(beta1), float(beta2), float(eps), decay,
        step_size, bc2_sqrt)
