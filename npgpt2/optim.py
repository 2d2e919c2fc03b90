"""Optimizers for fine-tuning: AdamW and SGD, global-norm clipping, the learning-rate schedule
and gradient accumulation.

Parameters and gradients are dicts {name: ndarray} as `GPT2.params` and
`GPT2.loss_and_grads` use. Every update is in place: the parameter arrays the model holds
are the ones that change, and one scratch buffer (the size of the largest tensor) is reused
for the temporaries, so a step never allocates a second copy of the parameters.

AdamW follows `torch.optim.AdamW` (Loshchilov & Hutter): bias-corrected moments and weight
decay decoupled from the gradient, `p -= lr * wd * p` before the Adam step. SGD is plain
`p -= lr * (g + wd * p)` as `torch.optim.SGD` without momentum (and TF's
GradientDescentOptimizer, which OpenAI's train.py used).

The per-tensor AdamW math is one function, `adamw_update`; when `npgpt2.kernels` provides
a function of the same name and signature (a fused Numba loop), AdamW uses it instead,
unless NPGPT2_PLAIN=1.
"""
import math

import numpy as np

from .errors import Npgpt2Error
from .jit import numba, plain_fallback, plain_requested

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing; so do we, so that
# clipped trajectories match torch's to the last bit that matters
CLIP_EPS = 1e-6


# ---------------------------------------------------------------- the update rules
def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, scratch=None):
    """One AdamW step for one tensor, in place on p, m, v.

    p, g, m, v: arrays of one shape (m, v the first/second moments, same dtype as p);
    step: the 1-based number of this update (for bias correction); scratch: optional
    flat buffer with at least p.size elements of p's dtype, reused for temporaries.
    Same math as torch.optim.AdamW:
        p *= 1 - lr*wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    A Numba twin in kernels.py must keep this signature and math.
    """
    tmp = (scratch[:p.size].reshape(p.shape) if scratch is not None
           else np.empty_like(p))
    if weight_decay:
        p *= 1.0 - lr * weight_decay
    m *= beta1
    np.multiply(g, 1.0 - beta1, out=tmp)
    m += tmp
    v *= beta2
    np.multiply(g, g, out=tmp)
    tmp *= 1.0 - beta2
    v += tmp
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    np.sqrt(v, out=tmp)
    tmp *= 1.0 / math.sqrt(bias2)
    tmp += eps
    np.divide(m, tmp, out=tmp)
    tmp *= lr / bias1
    p -= tmp


def _adamw_impl():
    """kernels.adamw_update if the speed work provides one (and NPGPT2_PLAIN is unset)."""
    if plain_requested() or numba() is None:
        return adamw_update
    try:
        from . import kernels
    except ImportError as e:  # a kernel module that fails to import must not stop training
        plain_fallback(e)
        return adamw_update
    fast = getattr(kernels, "adamw_update", None)
    return fast if fast is not None and fast is not adamw_update else adamw_update


class Optimizer:
    """Holds references to the parameters it updates and the per-parameter state.

    params: {name: ndarray}, updated in place by step(grads, lr). Only the names given
    are updated (e.g. just the transformer layers); grads may hold more.
    """

    kind = None

    def __init__(self, params, lr):
        self.params = dict(params)
        self.lr = float(lr)
        self.step_count = 0  # updates done so far
        largest = max((p.size for p in self.params.values()), default=0)
        dtypes = {p.dtype for p in self.params.values()}
        if len(dtypes) > 1:
            raise ValueError(f"parameters of mixed dtypes {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        self._scratch = np.empty(largest, dtype=self.dtype)

    def step(self, grads, lr=None):
        """Apply one update with grads (same names and shapes as params); lr overrides self.lr."""
        raise NotImplementedError

    def state_dict(self):
        """{key: ndarray} with everything needed to continue exactly (np.savez-able)."""
        return {"optimizer": np.array(self.kind), "step": np.array(self.step_count, dtype=np.int64)}

    def load_state_dict(self, state, source="optimizer state"):
        """Restore what state_dict() returned (copying into the existing buffers)."""
        kind = str(state["optimizer"])
        if kind != self.kind:
            raise Npgpt2Error(f"{source}: was saved by the {kind} optimizer, not {self.kind} "
                              f"(pass the same --optimizer, or --restore_from fresh)")
        self.step_count = int(state["step"])


class AdamW(Optimizer):
    """AdamW with torch's defaults except weight_decay (0 by default: fine-tuning).

    weight_decay: one float for all, or {name: float} (e.g. 0 for biases and gains).
    """

    kind = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = _per_param(weight_decay, self.params)
        self.m = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.v = {k: np.zeros_like(p) for k, p in self.params.items()}
        self._update = _adamw_impl()

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        for k, p in self.params.items():
            if self._update is adamw_update:
                adamw_update(p, grads[k], self.m[k], self.v[k], lr, self.beta1, self.beta2,
                             self.eps, self.weight_decay[k], self.step_count, self._scratch)
            else:
                self._update(p, grads[k], self.m[k], self.v[k], lr, self.beta1, self.beta2,
                             self.eps, self.weight_decay[k], self.step_count)

    def state_dict(self):
        state = super().state_dict()
        for k in self.params:
            state["m/" + k] = self.m[k]
            state["v/" + k] = self.v[k]
        return state

    def load_state_dict(self, state, source="optimizer state"):
        super().load_state_dict(state, source)
        for k in self.params:
            for slot, bufs in (("m/", self.m), ("v/", self.v)):
                if slot + k not in state:
                    raise Npgpt2Error(f"{source}: no '{slot + k}' (saved for other parameters? "
                                      f"check --only_train_transformer_layers)")
                saved = state[slot + k]
                if saved.shape != bufs[k].shape:
                    raise Npgpt2Error(f"{source}: '{slot + k}' has shape {saved.shape}, "
                                      f"the model needs {bufs[k].shape}")
                bufs[k][...] = saved


class SGD(Optimizer):
    """Plain gradient descent (no momentum); weight_decay adds wd * p to the gradient."""

    kind = "sgd"

    def __init__(self, params, lr=1e-3, weight_decay=0.0):
        super().__init__(params, lr)
        self.weight_decay = _per_param(weight_decay, self.params)

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        for k, p in self.params.items():
            tmp = self._scratch[:p.size].reshape(p.shape)
            np.multiply(grads[k], lr, out=tmp)
            if self.weight_decay[k]:
                p *= 1.0 - lr * self.weight_decay[k]
            p -= tmp


def _per_param(weight_decay, params):
    """A float for every parameter, or a {name: float} dict (missing names: 0)."""
    if isinstance(weight_decay, dict):
        return {k: float(weight_decay.get(k, 0.0)) for k in params}
    return {k: float(weight_decay) for k in params}


OPTIMIZERS = {"adam": AdamW, "sgd": SGD}  # --optimizer's choices
SCHEDULES = ("constant", "cosine")        # --lr_schedule's choices


def check_choice(flag, value, choices):
    """Raise the one-line error for a flag whose value is not one of `choices`."""
    if value not in choices:
        raise Npgpt2Error(f"{flag} must be {' or '.join(map(repr, choices))}, got {value!r}")


def make_optimizer(name, params, lr, weight_decay=0.0):
    """'adam' (AdamW) or 'sgd', as train.py's --optimizer."""
    check_choice("--optimizer", name, list(OPTIMIZERS))
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


# ---------------------------------------------------------------- gradients
def global_norm(grads):
    """sqrt of the sum of squares of every gradient, accumulated in float64."""
    return math.sqrt(sum(_sumsq(g.reshape(-1)) for g in grads.values()))


def _sumsq(flat, chunk=1 << 20):
    # a float32 dot product over millions of numbers loses ~1e-4 relative; float64 chunks
    # keep the norm accurate without a float64 copy of a whole 154 MB embedding
    total = 0.0
    for i in range(0, flat.size, chunk):
        c = flat[i:i + chunk].astype(np.float64, copy=False)
        total += float(np.dot(c, c))
    return total


def clip_grad_norm(grads, max_norm):
    """Scale grads in place so their global norm is at most max_norm (as torch's
    clip_grad_norm_: factor max_norm / (norm + 1e-6), only when that is < 1).

    Returns the norm before clipping. max_norm <= 0 or None turns clipping off.
    """
    norm = global_norm(grads)
    if max_norm and max_norm > 0:
        scale = max_norm / (norm + CLIP_EPS)
        if scale < 1.0:
            for g in grads.values():
                g *= scale
    return norm


def all_finite(tensors):
    """True when no tensor of the dict holds a NaN or an infinity: one pass, no copies.

    A sum is finite only if every term is. It is taken in the tensors' own dtype (3x faster
    than float64 on float32), so a float32 tensor whose sum passes 3.4e38 also counts as
    not finite: no trainable model is within many orders of magnitude of that.
    """
    return all(math.isfinite(float(np.add.reduce(t.reshape(-1)))) for t in tensors.values())


def accumulate(total, grads, names=None):
    """total[k] += grads[k] in place for k in names (default all of total); returns total."""
    for k in (total if names is None else names):
        total[k] += grads[k]
    return total


def scale_(grads, factor):
    """grads[k] *= factor in place; returns grads."""
    if factor != 1.0:
        for g in grads.values():
            g *= factor
    return grads


# ---------------------------------------------------------------- learning-rate schedule
def learning_rate(step, base_lr, warmup=0, schedule="constant", decay_steps=0, min_lr_ratio=0.1):
    """The learning rate for update number `step` (0-based).

    Linear warmup from base_lr/warmup to base_lr over the first `warmup` updates, then
    constant, or a cosine from base_lr down to min_lr_ratio*base_lr at update decay_steps
    (and flat after it), as nanoGPT.
    """
    check_choice("--lr_schedule", schedule, SCHEDULES)
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    min_lr = base_lr * min_lr_ratio
    if decay_steps <= warmup or step >= decay_steps:
        return min_lr if step >= decay_steps else base_lr
    progress = (step - warmup) / (decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)
