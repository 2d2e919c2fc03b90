"""Looking inside the model: the logit lens and the gradient of a prediction w.r.t. the input.

Both run the plain layers of layers.py, like GPT2.run_with_cache, so what a learner steps
through is what produced the numbers.
"""
import operator

import numpy as np

from . import layers
from .errors import Npgpt2Error


def logit_lens(model, acts, positions=None):
    """What each layer "thinks" the next token is: (L + 1, B, T, V) logits.

    acts: from model.run_with_cache (needs `embed` and every `h{i}.resid_post`). Row 0 reads
    the embedding, row i the residual stream after block i-1, each through ln_f and the
    tied output head, so the last row equals the logits. positions (an index, slice or list
    for the T axis) keeps only those positions: at 124M each row is B * T * 50257 floats.
    """
    L = model.hparams["n_layer"]
    names = ["embed"] + [f"h{i}.resid_post" for i in range(L)]
    missing = [n for n in names if n not in acts]
    if missing:
        raise Npgpt2Error(f"acts: missing {', '.join(missing)} (run_with_cache without a names filter keeps them)")
    p = model.params
    if positions is not None:
        T = acts["embed"].shape[1]
        try:
            np.empty(T)[positions]  # the same indexing on a (T,) stand-in: an error here names the argument
        except (IndexError, TypeError, ValueError) as e:
            raise Npgpt2Error(f"positions: {positions!r} does not index the {T} positions ({e})") from None
    rows = []
    for name in names:
        resid = acts[name] if positions is None else acts[name][:, positions]  # [B, T, C]
        normed, _, _ = layers.layernorm_forward(resid, p["model/ln_f/g"], p["model/ln_f/b"])  # [B, T, C]
        # the model's own head (wte.T, with a LoRA adapter on the tied wte its adapted matrix)
        rows.append(model._head(normed))  # [B, T, C] @ [C, V] -> [B, T, V]
    return np.stack(rows)  # [L + 1, B, T, V]


def input_gradient(model, ids, position, target):
    """d log p(target | ids[:position + 1]) / d embedding of each input position: (T, C).

    ids: int (T,); position in [0, T); target a token id. The embedding of position t is
    wte[ids[t]] + wpe[t]; positions after `position` get zeros (the model is causal).
    Computed by the model's hand-written backward on the plain layers.
    """
    V, n_ctx = model.hparams["n_vocab"], model.hparams["n_ctx"]
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise Npgpt2Error(f"ids: expected a non-empty 1-D array of token ids, got shape {ids.shape} "
                          f"dtype {ids.dtype}")
    if ids.size > n_ctx:
        raise Npgpt2Error(f"ids: {ids.size} tokens exceed the context n_ctx={n_ctx}")
    if ids.min() < 0 or ids.max() >= V:
        raise Npgpt2Error(f"ids: token ids must be in [0, {V}), got {int(ids.min())}..{int(ids.max())}")
    T = ids.size
    position, target = _index(position, T, "position"), _index(target, V, "target")
    model = float_model(model)
    logits, saved = model.forward_with_saves(ids[None], lay=layers)  # [1, T] -> [1, T, V]
    return logprob_backward(model, logits, saved, position, target)


def logprob_backward(model, logits, saved, position, target):
    """The backward half of input_gradient, for a caller that already ran the forward.

    logits (1, T, V), saved: from model.forward_with_saves of one sequence (consumed).
    Returns (T, C): d log p(target) at `position` / d each input position's embedding.
    """
    # d log_softmax(z)[target] / dz = onehot(target) - softmax(z), at this one position
    dlogits = np.zeros_like(logits)                               # [1, T, V]
    dlogits[0, position] = -layers.softmax(logits[0, position])
    dlogits[0, position, target] += 1.0
    _, dembed = model.backward(dlogits, saved)                    # [1, T, C]
    return dembed[0]


def float_model(model):
    """model itself, or for an int8 model (quant.py) a float32 GPT2 of its dequantised
    weights: gradients need float weights, and int8 weights are for generation. The copy is
    4 bytes a parameter, refused up front when that memory is not available."""
    if model.weight_dtype != "int8":
        return model
    from . import quant
    from .memory import check_memory
    from .model import GPT2
    n = sum(int(np.prod(w.shape)) for w in model.params.values())
    check_memory(4 * n, "explaining an int8 model (its weights dequantised to float32)",
                 "load the model as float32, or use a machine with more memory")
    copy = GPT2(model.hparams, quant.dequantize_params(model.params), np.float32)
    copy.source_dir = model.source_dir
    return copy


def previous_token_score(pattern):
    """pattern: (B, NH, T, T) attention probabilities of one layer -> (NH,) the mean weight a
    query at t >= 1 gives to position t - 1: 1.0 for a perfect previous-token head, about
    1/(t+1) for uniform attention."""
    B, NH, T, _ = pattern.shape
    t = np.arange(1, T)
    return pattern[:, :, t, t - 1].astype(np.float64).mean(axis=(0, 2))       # [B, NH, T-1] -> [NH]


def induction_score(pattern, period):
    """pattern: (B, NH, T, T) of one layer on tokens that repeat with `period` (a random
    block, then the same block again) -> (NH,) the mean weight a query at t >= period gives
    to position t - period + 1: the token after the previous occurrence of the current one,
    which an induction head attends to (and then copies)."""
    B, NH, T, _ = pattern.shape
    if not 1 <= period < T:
        raise Npgpt2Error(f"period: must be in [1, {T}) for {T} positions, got {period}")
    t = np.arange(period, T)
    return pattern[:, :, t, t - period + 1].astype(np.float64).mean(axis=(0, 2))  # [B, NH, T-period] -> [NH]


def _index(value, size, name):
    """value as an int in [0, size), or a one-line Npgpt2Error naming the argument."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        index = operator.index(value)  # ints, NumPy integers and 0-d integer arrays
    except TypeError:
        raise Npgpt2Error(f"{name}: expected an integer, got {value!r}") from None
    if not 0 <= index < size:
        raise Npgpt2Error(f"{name}: {index} is out of range [0, {size})")
    return index
