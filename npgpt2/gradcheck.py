"""Gradient checking: every hand-written backward pass against central finite differences.

Finite differences need only the *forward* pass, so they are a reference independent of the
backward code being checked. For a scalar L(x), nudging one entry x_i by +-h gives

    dL/dx_i  ~  (L(x + h e_i) - L(x - h e_i)) / 2h        (error O(h^2), not O(h))

A layer y = f(x) is checked through the scalar L = sum(dy * f(x)) for a random upstream
gradient dy, whose exact gradient is what `*_backward(dy, ...)` returns. The whole model is
checked through its mean cross-entropy, on sampled parameter entries (two forward passes per
entry), against `GPT2.loss_and_grads`.

Everything runs in float64: in float32 the roundoff of L (~1e-7 |L|) divided by 2h would
swamp the gradient. The tolerances below say why they are what they are.

    rows = check_layers() + check_model(model)   # each a Check(name, error, tol, worst)
    bad = [r for r in rows if not r.ok]
"""
import logging
import re
from dataclasses import dataclass

import numpy as np

from . import layers
from .model import GPT2, param_shapes

log = logging.getLogger(__name__)

# Step for central differences in float64. Truncation error is ~h^2 |f'''| / 6 (~1e-10
# relative here); roundoff is ~eps |L| / h (~1e-11 for the O(1) sums below). 1e-5 balances
# the two; much smaller h lets roundoff grow, much larger lets truncation grow.
H = 1e-5

# Layers on small O(1) inputs: both error sources above are ~1e-10 relative, so 1e-6 leaves
# four orders of margin while any real mistake in a backward (a missing term, a wrong
# transpose, a factor of 2) gives errors of 1e-2 or more.
LAYER_TOL = 1e-6

# A model's loss sums over B*T*V logits through every layer, so its roundoff is larger. On
# random 124M weights (loss ~10.8, float64) the finite-difference error measured: h = 1e-5,
# ~1e-10 absolute (roundoff); h = 1e-4, ~2e-11; h = 1e-3, ~1e-9 (truncation). So MODEL_H = 1e-4.
# Entries whose gradient is below GRAD_FLOOR (e.g. the key biases, whose exact gradient is 0:
# adding a constant to every score of a row leaves softmax unchanged) are compared against
# GRAD_FLOOR instead of their own size, so that noise is not read as a large relative error:
# 2e-11 / 1e-5 = 2e-6, fifty times under MODEL_TOL = 1e-4, while a wrong backward (a missing
# term, a wrong scale) is off by 1e-2 or more. Measured worst on the fixtures and on random
# 124M weights: ~1e-6.
MODEL_H = 1e-4
MODEL_TOL = 1e-4
GRAD_FLOOR = 1e-5


@dataclass
class Check:
    """One row of the report: `name` passed when its relative `error` is at most `tol`.

    `worst` says which gradient (dinp, dweight, ...) or tensor gave the largest error.
    """
    name: str
    error: float
    tol: float
    worst: str = ""

    @property
    def ok(self):
        return bool(self.error <= self.tol)  # NaN fails


# ---------------------------------------------------------------- the two primitives
def numeric_grad(f, x, h=H, entries=None):
    """dL/dx by central differences, nudging x in place (f() reads x and returns L).

    x: a float64 array that f() reads on every call; it is restored after each nudge.
    entries: index tuples into x to differentiate (default: every entry).
    Returns an array shaped like x, or (len(entries),) when entries are given.
    """
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("numeric_grad needs a contiguous array to nudge in place")
    idx = (range(x.size) if entries is None
           else [int(np.ravel_multi_index(e, x.shape)) for e in entries])
    out = np.empty(len(idx), dtype=np.float64)
    for n, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + h
        plus = f()
        flat[i] = old - h
        minus = f()
        flat[i] = old
        out[n] = (plus - minus) / (2 * h)
    return out.reshape(x.shape) if entries is None else out


def rel_error(numeric, analytic, floor=0.0):
    """||numeric - analytic|| / max(||numeric||, ||analytic||, floor): 0 when equal, ~1 when unrelated."""
    numeric, analytic = np.asarray(numeric, np.float64), np.asarray(analytic, np.float64)
    denom = max(np.linalg.norm(numeric), np.linalg.norm(analytic), floor, 1e-300)
    return float(np.linalg.norm(numeric - analytic) / denom)


# ---------------------------------------------------------------- each layer
def _check_layer(name, f, pairs):
    """pairs: [(label, x, analytic dL/dx)]; f() -> L reading the current x. One Check."""
    errors = {}
    for label, x, analytic in pairs:
        if analytic.shape != x.shape:
            errors[label] = float("inf")
            continue
        errors[label] = rel_error(numeric_grad(f, x), analytic)
    worst = max(errors, key=lambda k: (np.nan_to_num(errors[k], nan=np.inf), k))
    return Check(name, errors[worst], LAYER_TOL, worst)


def _dot(dy, y):
    return float((dy * y).sum())


def check_layers(seed=0):
    """Each backward in layers.py against finite differences of its forward -> [Check].

    Shapes are small (a few hundred entries each) and deliberately awkward: T > 1 so the
    causal mask matters, NH > 1 so heads must not mix, a vocabulary of 5 for 8 tokens so
    tokens repeat and their embedding rows must accumulate.
    """
    rng = np.random.default_rng(seed)
    B, T, NH, hs = 2, 4, 2, 3
    C = NH * hs
    rows = []

    # layernorm: inputs away from zero mean/unit variance so the normalisation does something
    x = rng.standard_normal((B, T, C)) * 2 + 0.5
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    dy = rng.standard_normal((B, T, C))
    _, mean, rstd = layers.layernorm_forward(x, w, b)
    dx, dw, db = layers.layernorm_backward(dy, x, w, mean, rstd)
    rows.append(_check_layer("layernorm", lambda: _dot(dy, layers.layernorm_forward(x, w, b)[0]),
                             [("dinp", x, dx), ("dweight", w, dw), ("dbias", b, db)]))

    # matmul (TF's conv1d with a (C, OC) weight)
    OC = 5
    x = rng.standard_normal((B, T, C))
    w, b = rng.standard_normal((C, OC)), rng.standard_normal(OC)
    dy = rng.standard_normal((B, T, OC))
    dx, dw, db = layers.matmul_backward(dy, x, w)
    rows.append(_check_layer("matmul", lambda: _dot(dy, layers.matmul_forward(x, w, b)),
                             [("dinp", x, dx), ("dweight", w, dw), ("dbias", b, db)]))

    # LoRA: a frozen matmul plus scaling * (x @ A) @ B; only x, A and B get gradients
    r = 2
    x = rng.standard_normal((B, T, C))
    w, b = rng.standard_normal((C, OC)), rng.standard_normal(OC)
    lora_A, lora_B = rng.standard_normal((C, r)), rng.standard_normal((r, OC))
    dy = rng.standard_normal((B, T, OC))
    _, h = layers.lora_forward(x, w, b, lora_A, lora_B, 1.5)
    dx, dA, dB = layers.lora_backward(dy, x, w, lora_A, lora_B, 1.5, h)
    rows.append(_check_layer("lora", lambda: _dot(dy, layers.lora_forward(x, w, b, lora_A, lora_B, 1.5)[0]),
                             [("dinp", x, dx), ("dA", lora_A, dA), ("dB", lora_B, dB)]))

    # causal self-attention, softmax included
    qkv = rng.standard_normal((B, T, 3 * C))
    dy = rng.standard_normal((B, T, C))
    _, att = layers.attention_forward(qkv, NH)
    dqkv = layers.attention_backward(dy, qkv, att, NH)
    rows.append(_check_layer("attention", lambda: _dot(dy, layers.attention_forward(qkv, NH)[0]),
                             [("dqkv", qkv, dqkv)]))

    # GELU over the range where its curvature is (|x| < ~4)
    x = rng.standard_normal((B, T, 4 * C)) * 2
    dy = rng.standard_normal(x.shape)
    rows.append(_check_layer("gelu", lambda: _dot(dy, layers.gelu_forward(x)),
                             [("dinp", x, layers.gelu_backward(dy, x))]))

    # cross-entropy fused with softmax: d losses / d logits = probs - onehot
    V = 7
    logits = rng.standard_normal((B, T, V)) * 3
    targets = rng.integers(0, V, (B, T))
    dlosses = rng.standard_normal((B, T))
    _, probs = layers.crossentropy_forward(logits, targets)
    dlogits = layers.crossentropy_softmax_backward(dlosses, probs, targets)
    rows.append(_check_layer(
        "crossentropy_softmax", lambda: _dot(dlosses, layers.crossentropy_forward(logits, targets)[0]),
        [("dlogits", logits, dlogits)]))

    # token + position embeddings; V=5 for 8 tokens: some tokens repeat
    V, maxT = 5, T + 2
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((maxT, C))
    inp = rng.integers(0, V, (B, T))
    dy = rng.standard_normal((B, T, C))
    dwte, dwpe = layers.embedding_backward(dy, inp, V, maxT)
    rows.append(_check_layer("embedding", lambda: _dot(dy, layers.embedding_forward(wte, wpe, inp)),
                             [("dwte", wte, dwte), ("dwpe", wpe, dwpe)]))
    return rows


# ---------------------------------------------------------------- a whole model
def tiny_model(seed=0):
    """A 2-layer float64 GPT2 with weights far from GPT-2's tiny init, so every gradient is sizeable."""
    hp = dict(n_vocab=13, n_ctx=8, n_embd=8, n_head=2, n_layer=2)
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) * (0.3 if len(s) > 1 else 1.0) + (1.0 if k.endswith("/g") else 0.0)
              for k, s in param_shapes(hp).items()}
    return GPT2(hp, params, dtype=np.float64)


def mean_crossentropy(model, inputs, targets):
    """The loss from `model.forward` alone (log-sum-exp, float64): the finite differences' L."""
    logits = model.forward(inputs).astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
    return float((lse - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]).mean())


def _sample_entries(name, shape, k, rng, inputs):
    """k distinct index tuples of a tensor where the gradient can be nonzero."""
    if name == "model/wpe":  # only positions < T are read
        shape = (inputs.shape[1],) + shape[1:]
    picks = []
    if name == "model/wte":  # one row that is input (embedding + head), the rest random (head)
        picks.append((int(inputs.reshape(-1)[0]), int(rng.integers(shape[1]))))
    size = int(np.prod(shape))
    for i in rng.permutation(size)[:k]:
        e = tuple(int(j) for j in np.unravel_index(int(i), shape))
        if e not in picks and len(picks) < k:
            picks.append(e)
    return picks


# Above this many parameters, one sampled entry per tensor by default: each entry costs two
# forward passes, which at 124M in float64 read 1 GB of weights each (~0.08 s on 2 idle cores),
# so 148 tensors x 1 entry x 2 passes stays well under a minute.
BIG_MODEL = 10_000_000


def default_entries(model):
    """Sampled entries per tensor when none are asked for: 2, or 1 above BIG_MODEL parameters."""
    return 1 if sum(p.size for p in model.params.values()) > BIG_MODEL else 2


def check_model(model, entries=None, T=4, B=1, seed=0, progress=None):
    """loss_and_grads of `model` (a float64 copy) against finite differences -> [Check].

    Random inputs/targets of (B, T) tokens; `entries` sampled entries of every parameter
    tensor (default 2, or 1 above BIG_MODEL parameters), two forward passes each; the rows
    of model/wte always include a token that is input twice (its row gets the head's gradient
    and the embedding's from both positions). Rows group a tensor kind over layers
    (`model/h*/attn/c_attn/w`); `worst` names the tensor with the largest error.
    progress: optional callable(done, total) after each tensor.
    """
    hp = model.hparams
    if entries is None:
        entries = default_entries(model)
    m64 = model if model.dtype == np.float64 else GPT2(hp, model.params, dtype=np.float64)
    if model.lora is not None and m64 is not model:
        from .lora import LoraAdapters, attach
        attach(m64, LoraAdapters(model.lora.config, {k: v.astype(np.float64) for k, v in model.lora.params.items()}))
    rng = np.random.default_rng(seed)
    T = min(T, hp["n_ctx"])
    inputs = rng.integers(0, hp["n_vocab"], (B, T))
    targets = rng.integers(0, hp["n_vocab"], (B, T))
    if T > 1:  # a token that occurs twice: its wte row must sum both positions' gradients
        inputs[:, -1] = inputs[:, 0]
    _, grads = m64.loss_and_grads(inputs, targets)

    def loss():
        return mean_crossentropy(m64, inputs, targets)

    groups = {}
    trained = m64.params if m64.lora is None else m64.lora.params  # LoRA: the adapters alone train
    names = list(param_shapes(hp)) if m64.lora is None else list(trained)
    with _one_blas_thread():
        for n, name in enumerate(names):
            p = trained[name]
            picks = _sample_entries(name, p.shape, entries, rng, inputs)
            numeric = numeric_grad(loss, p, h=MODEL_H, entries=picks)
            analytic = np.array([grads[name][e] for e in picks])
            # per entry: relative to its own size, or to GRAD_FLOOR for entries that are ~0
            err = max(rel_error(a, b, GRAD_FLOOR) for a, b in zip(numeric, analytic))
            kind = re.sub(r"/h\d+/", "/h*/", name)
            if kind not in groups or not err <= groups[kind].error:
                groups[kind] = Check(kind, err, MODEL_TOL, name)
            if progress is not None:
                progress(n + 1, len(names))
    return list(groups.values())


def _one_blas_thread():
    """A context in which BLAS uses one thread, when threadpoolctl is installed.

    The forwards here are on a few tokens: matrix-vector work where a second BLAS thread buys
    little, and on a busy machine costs much (a 124M forward measured 0.5 s on one thread,
    3-4 s on two, at load average 10 on 2 cores).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def format_table(rows, title=None):
    """The report as aligned text lines: name, max relative error, tolerance, ok."""
    w = max([len("layer")] + [len(r.name) for r in rows])
    lines = [title] if title else []
    lines.append(f"{'layer':<{w}}  {'max rel error':>13}  {'tolerance':>9}  ok    worst")
    for r in rows:
        lines.append(f"{r.name:<{w}}  {r.error:>13.2e}  {r.tol:>9.0e}  {'yes' if r.ok else 'NO ':<4}  {r.worst}")
    return lines
