"""GPT-2's layers in plain NumPy, each a forward/backward pair.

The names and argument order follow llm.c's train_gpt2.c: `layernorm_forward` returns
what `layernorm_backward` needs, and every backward returns the gradients of its inputs.
Shapes: B batch, T time, C channels, OC output channels, NH heads, hs = C // NH, V vocab.
This file is the readable reference; `kernels.py` holds the fast twins and tests keep
the two equal.
"""
import math

import numpy as np


# ---------------------------------------------------------------- embeddings
def embedding_forward(wte, wpe, inp, pos0=0):
    """Token + position embedding (llm.c's encoder_forward; here "encoder" means only the
    tokenizer's encoder.json).

    wte: (V, C), wpe: (maxT, C), inp: int (B, T); positions start at pos0 (KV cache), an int
    or, for rows at different lengths (batched decoding), an int array (B,).
    Returns out: (B, T, C).
    """
    T = inp.shape[1]
    if np.ndim(pos0) == 0:
        return wte[inp] + wpe[pos0:pos0 + T]
    return wte[inp] + wpe[np.asarray(pos0)[:, None] + np.arange(T)]  # row b at positions pos0[b]..


def embedding_backward(dout, inp, V, maxT):
    """dout: (B, T, C), inp: (B, T) -> dwte: (V, C), dwpe: (maxT, C)."""
    B, T, C = dout.shape
    dwte = np.zeros((V, C), dtype=dout.dtype)
    np.add.at(dwte, inp.reshape(-1), dout.reshape(-1, C))  # a token may repeat: accumulate
    dwpe = np.zeros((maxT, C), dtype=dout.dtype)
    dwpe[:T] = dout.sum(axis=0)
    return dwte, dwpe


# ---------------------------------------------------------------- layernorm
def layernorm_forward(inp, weight, bias, eps=1e-5):
    """inp: (..., C), weight/bias: (C,) -> out (..., C), mean (...), rstd (...)."""
    mean = inp.mean(axis=-1)
    xc = inp - mean[..., None]
    var = (xc * xc).mean(axis=-1)  # biased variance, as TF and PyTorch
    rstd = 1.0 / np.sqrt(var + eps)
    out = xc * rstd[..., None] * weight + bias
    return out, mean, rstd


def layernorm_backward(dout, inp, weight, mean, rstd):
    """-> dinp (..., C), dweight (C,), dbias (C,)."""
    C = inp.shape[-1]
    norm = (inp - mean[..., None]) * rstd[..., None]
    dbias = dout.reshape(-1, C).sum(axis=0)
    dweight = (dout * norm).reshape(-1, C).sum(axis=0)
    dnorm = dout * weight
    # d/dx of (x - mean) * rstd: subtract the mean of dnorm and its projection on norm
    dinp = (dnorm - dnorm.mean(axis=-1, keepdims=True)
            - norm * (dnorm * norm).mean(axis=-1, keepdims=True)) * rstd[..., None]
    return dinp, dweight, dbias


# ---------------------------------------------------------------- linear (TF's conv1d)
def matmul_forward(inp, weight, bias):
    """inp: (..., C), weight: (C, OC), bias: (OC,) -> out (..., OC)."""
    return inp @ weight + bias


def matmul_backward(dout, inp, weight):
    """-> dinp (..., C), dweight (C, OC), dbias (OC,)."""
    C, OC = weight.shape
    dinp = dout @ weight.T
    dweight = inp.reshape(-1, C).T @ dout.reshape(-1, OC)
    dbias = dout.reshape(-1, OC).sum(axis=0)
    return dinp, dweight, dbias


# ---------------------------------------------------------------- LoRA (a frozen linear + a low-rank update)
def lora_forward(inp, weight, bias, lora_A, lora_B, scaling):
    """y = inp @ weight + bias + scaling * (inp @ A) @ B; weight and bias stay frozen.

    inp: (..., C), weight: (C, OC) (float, or an int8 quant.QuantizedWeight), bias: (OC,),
    lora_A: (C, r), lora_B: (r, OC), scaling: alpha / r.
    Returns out (..., OC) and h = inp @ A (..., r), which lora_backward needs.
    """
    h = inp @ lora_A  # [..., C] @ [C, r] -> [..., r]: the r numbers the update is made of
    out = inp @ weight + bias  # [..., C] @ [C, OC] -> [..., OC]: the frozen layer
    out += scaling * (h @ lora_B)  # [..., r] @ [r, OC] -> [..., OC]: its low-rank correction
    return out, h


def lora_backward(dout, inp, weight, lora_A, lora_B, scaling, h):
    """-> dinp (..., C), dA (C, r), dB (r, OC). The forward was out = inp @ W + b + s * h @ B
    with h = inp @ A: W and b are frozen, so neither gets a gradient (no (C, OC) product at all).

    dB = s * h^T dout; dh = s * dout B^T; dA = inp^T dh; dinp = dout W^T + dh A^T.
    """
    C, r = lora_A.shape
    OC = lora_B.shape[1]
    d = dout.reshape(-1, OC)  # [N, OC]: every position is a row (one GEMM, not one per batch entry)
    dB = h.reshape(-1, r).T @ d  # [r, N] @ [N, OC] -> [r, OC]
    dB *= scaling
    dh = d @ lora_B.T  # [N, OC] @ [OC, r] -> [N, r]
    dh *= scaling
    dA = inp.reshape(-1, C).T @ dh  # [C, N] @ [N, r] -> [C, r]
    dinp = d @ weight.T  # [N, OC] @ [OC, C] -> [N, C]: through the frozen weight (int8: dequantised once)
    dinp += dh @ lora_A.T  # [N, r] @ [r, C] -> [N, C]: and through the adapter
    return dinp.reshape(inp.shape), dA, dB


# ---------------------------------------------------------------- LoRA on the tied token embedding (target "wte")
# GPT-2 uses wte (V, C) twice: as the input lookup and, transposed, as the output head. One
# low-rank delta on the tied matrix, W' = W + scaling * A @ B (A: (V, r), B: (r, C)), serves
# both uses, so merging it gives a tied model again; its gradient is the sum of the two uses'.
def lora_embedding_forward(wte, wpe, inp, lora_A, lora_B, scaling, pos0=0):
    """embedding_forward with the adapted token embedding: W'[inp] + wpe[positions], where
    W'[inp] = wte[inp] + scaling * A[inp] @ B. wte and wpe are frozen.

    wte: (V, C) (or int8), wpe: (maxT, C), inp: int (B, T), lora_A: (V, r), lora_B: (r, C).
    Returns out (B, T, C); the backward needs only inp.
    """
    out = embedding_forward(wte, wpe, inp, pos0)  # [B, T, C]: the frozen lookup
    out += scaling * (lora_A[inp] @ lora_B)  # [B, T, r] @ [r, C] -> [B, T, C]: the rows' low-rank part
    return out


def lora_embedding_backward(dout, inp, lora_A, lora_B, scaling):
    """-> dA (V, r), dB (r, C) of lora_embedding_forward (wte and wpe are frozen: no gradient).

    out[n] = ... + s * A[inp[n]] @ B, so dB = s * A[inp]^T dout and row v of dA sums
    s * dout[n] @ B^T over the positions n holding token v (a token may repeat).
    """
    V, r = lora_A.shape
    C = lora_B.shape[1]
    ids = inp.reshape(-1)
    d = dout.reshape(-1, C)  # [N, C]
    dB = lora_A[ids].T @ d  # [r, N] @ [N, C] -> [r, C]
    dB *= scaling
    drows = d @ lora_B.T  # [N, C] @ [C, r] -> [N, r]
    drows *= scaling
    dA = np.zeros((V, r), dtype=drows.dtype)
    np.add.at(dA, ids, drows)  # repeated tokens accumulate
    return dA, dB


def lora_head_forward(x, wte, lora_A, lora_B, scaling):
    """The output head with the adapted tied matrix: logits = x @ W'^T
    = x @ wte^T + scaling * (x @ B^T) @ A^T, never forming the (V, C) W'.

    x: (..., C), wte: (V, C) frozen (or int8), lora_A: (V, r), lora_B: (r, C).
    Returns logits (..., V) and u = x @ B^T (..., r), which lora_head_backward needs.
    """
    u = x @ lora_B.T  # [..., C] @ [C, r] -> [..., r]
    logits = x @ wte.T  # [..., C] @ [C, V] -> [..., V]: the frozen head
    logits += scaling * (u @ lora_A.T)  # [..., r] @ [r, V] -> [..., V]
    return logits, u


def lora_head_backward(dlogits, x, wte, lora_A, lora_B, scaling, u):
    """-> dx (..., C), dA (V, r), dB (r, C) of lora_head_forward (wte frozen: no (V, C) gradient).

    logits = x W^T + s u A^T with u = x B^T: dA = s dlogits^T u; du = s dlogits A;
    dB = du^T x; dx = dlogits W + du B.
    """
    V, r = lora_A.shape
    C = x.shape[-1]
    d, xr, ur = dlogits.reshape(-1, V), x.reshape(-1, C), u.reshape(-1, r)  # [N, V], [N, C], [N, r]
    dA = d.T @ ur  # [V, N] @ [N, r] -> [V, r]
    dA *= scaling
    du = d @ lora_A  # [N, V] @ [V, r] -> [N, r]
    du *= scaling
    dB = du.T @ xr  # [r, N] @ [N, C] -> [r, C]
    dx = d @ wte  # [N, V] @ [V, C] -> [N, C]: through the frozen head (int8: dequantised)
    dx += du @ lora_B  # [N, r] @ [r, C] -> [N, C]: and through the adapter
    return dx.reshape(x.shape), dA, dB


# ---------------------------------------------------------------- attention
def split_heads(x, NH):
    """(B, T, C) -> (B, NH, T, hs)."""
    B, T, C = x.shape
    return x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, NH, T, hs) -> (B, T, C)."""
    B, NH, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


def softmax(x):
    """Softmax over the last axis; -inf entries get probability 0."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention_forward(qkv, NH, hook=None):
    """Causal multi-head self-attention.

    qkv: (B, T, 3C) -> out (B, T, C), att (B, NH, T, T) the softmax probabilities.
    att is what attention_backward needs (a fast twin may return something else there).
    hook(name, x) -> x, if given, sees (and may replace) the named intermediates:
    'q', 'k', 'v' (B, NH, T, hs), 'scores' (B, NH, T, T) with the future at -inf, and
    'pattern' (B, NH, T, T) the probabilities; the model names them `h{i}.attn.<name>`.
    """
    hook = hook or _unchanged
    C = qkv.shape[-1] // 3
    q, k, v = (split_heads(x, NH) for x in np.split(qkv, 3, axis=-1))  # [B, T, 3C] -> 3 x [B, NH, T, hs]
    q, k, v = hook("q", q), hook("k", k), hook("v", v)
    T = q.shape[2]
    scale = 1.0 / math.sqrt(C // NH)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale  # [B, NH, T, hs] @ [B, NH, hs, T] -> [B, NH, T, T]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = hook("scores", np.where(future, -np.inf, scores))  # position t sees only 0..t
    att = hook("pattern", softmax(scores))  # [B, NH, T, T], each row sums to 1
    return merge_heads(att @ v), att  # [B, NH, T, T] @ [B, NH, T, hs] -> [B, NH, T, hs] -> [B, T, C]


def _unchanged(name, x):
    return x


def attention_backward(dout, qkv, att, NH):
    """dout: (B, T, C) -> dqkv (B, T, 3C)."""
    C = qkv.shape[-1] // 3
    q, k, v = (split_heads(x, NH) for x in np.split(qkv, 3, axis=-1))
    scale = 1.0 / math.sqrt(C // NH)
    dy = split_heads(dout, NH)
    datt = dy @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dy
    # softmax backward; masked positions have att == 0 so they get no gradient
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) * scale
    dq = dscores @ k
    dk = dscores.transpose(0, 1, 3, 2) @ q
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


def attention_forward_cached(qkv, k_cache, v_cache, pos0, NH, rows=None):
    """Attention for T new positions of each row against a KV cache (inference only).

    qkv: (B, T, 3C); k_cache, v_cache: (R, NH, n_ctx, hs) with R >= B. Row b of the batch
    is cache row rows[b] (default b), filled up to pos0 (an int, or an int array (B,) when
    rows are at different lengths: batched decoding); its keys and values for positions
    pos0[b]..pos0[b]+T-1 are written here. Returns out (B, T, C), row b equal to rows
    pos0[b].. of attention_forward over that row's whole sequence.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    pos0 = np.broadcast_to(pos0, (B,))
    rows = range(B) if rows is None else rows
    q, k, v = (split_heads(x, NH) for x in np.split(qkv, 3, axis=-1))  # 3 x [B, NH, T, hs]
    scale = 1.0 / math.sqrt(C // NH)
    out = np.empty_like(q)  # [B, NH, T, hs]
    for b, r in enumerate(rows):  # each row has its own cache row and length
        p0, end = int(pos0[b]), int(pos0[b]) + T
        k_cache[r, :, p0:end] = k[b]
        v_cache[r, :, p0:end] = v[b]
        scores = (q[b] @ k_cache[r, :, :end].transpose(0, 2, 1)) * scale  # [NH, T, hs] @ [NH, hs, end] -> [NH, T, end]
        future = np.arange(end)[None, :] > (p0 + np.arange(T))[:, None]  # [T, end]
        scores = np.where(future, -np.inf, scores)
        out[b] = softmax(scores) @ v_cache[r, :, :end]  # [NH, T, end] @ [NH, end, hs] -> [NH, T, hs]
    return merge_heads(out)  # [B, T, C]


# ---------------------------------------------------------------- GELU (tanh form, as GPT-2)
# Python floats, not NumPy float64 scalars: those would promote float32 arrays to float64
GELU_SCALE = math.sqrt(2.0 / math.pi)


def gelu_forward(inp):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); inp: any shape."""
    # x*x*x, not x**3: NumPy's float power is ~80x slower
    return 0.5 * inp * (1.0 + np.tanh(GELU_SCALE * (inp + 0.044715 * inp * inp * inp)))


def gelu_backward(dout, inp):
    """-> dinp, same shape as inp."""
    t = np.tanh(GELU_SCALE * (inp + 0.044715 * inp * inp * inp))
    dt = (1.0 - t * t) * GELU_SCALE * (1.0 + 3 * 0.044715 * inp * inp)
    return dout * (0.5 * (1.0 + t) + 0.5 * inp * dt)


# ---------------------------------------------------------------- output head + loss
def crossentropy_forward(logits, targets, out=None):
    """logits: (B, T, V), targets: int (B, T) -> losses (B, T), probs (B, T, V).

    out: where to write probs; it may be logits itself (the logits are then lost), so that
    training holds one (B, T, V) buffer instead of two.
    """
    shifted = np.subtract(logits, logits.max(axis=-1, keepdims=True), out=out)
    # the loss from the log-sum-exp, not log(probs): tiny probabilities stay finite
    logp = np.take_along_axis(shifted, targets[..., None], axis=-1)  # the target's shifted logit
    e = np.exp(shifted, out=shifted)
    sumexp = e.sum(axis=-1, keepdims=True)
    logp = logp - np.log(sumexp)
    e /= sumexp  # the probabilities
    return -logp[..., 0], e


def crossentropy_softmax_backward(dlosses, probs, targets, out=None):
    """dlosses: (B, T) -> dlogits (B, T, V) = (probs - onehot(targets)) * dlosses.

    out: where to write dlogits; it may be probs itself (training's one (B, T, V) buffer).
    """
    if out is None:
        dlogits = probs.copy()
    else:
        dlogits = out
        if out is not probs:
            dlogits[...] = probs
    np.put_along_axis(dlogits, targets[..., None],
                      np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1.0, axis=-1)
    dlogits *= dlosses[..., None]
    return dlogits
