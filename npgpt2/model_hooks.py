"""Looking inside GPT-2: the named activations, run_with_cache and run_with_hooks.

GPT2 gets these methods from `Hooks`; they run the plain layers of layers.py through the
model's one forward (GPT2._trunk), which calls hook(name, x) at every named activation.
"""
import numpy as np

from . import layers
from .errors import Npgpt2Error

# the activations of block i are named h{i}.<one of these>, in the order the forward makes them
BLOCK_ACTS = ("ln_1", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", "attn.out",
              "resid_mid", "ln_2", "mlp.pre", "mlp.post", "mlp.out", "resid_post")


class Hooks:
    """GPT2's interpretability methods (a mixin: GPT2 gives _trunk, _head, _check_tokens, hparams)."""

    def activation_names(self):
        """The names run_with_cache and run_with_hooks know, in the order the forward makes them."""
        return ["embed"] + [f"h{i}.{name}" for i in range(self.hparams["n_layer"]) for name in BLOCK_ACTS] + ["ln_f"]

    def run_with_cache(self, tokens, names=None):
        """tokens: int (B, T) -> (logits (B, T, V), acts {name: array}).

        Runs the plain layers of layers.py (never the fast kernels) and keeps every named
        activation (activation_names(); shapes in HACKING.md), or only those in `names`:
        a list of names or a predicate name -> bool (keep only what you need at long T:
        each layer's pattern is B * NH * T * T floats).
        """
        keep = self._name_filter(names)
        acts = {}

        def record(name, x):
            if keep(name):
                acts[name] = x
            return x

        tokens = self._check_tokens(tokens, error=Npgpt2Error)
        return self._head(self._trunk(tokens, layers, hook=record)), acts

    def run_with_hooks(self, tokens, hooks):
        """tokens: int (B, T), hooks {name: fn} -> logits (B, T, V) with the hooks applied.

        fn(x) gets the activation `name` and returns the array to use instead, of the same
        shape (or None to keep x, possibly changed in place). Zeroing
        `h{l}.attn.pattern[:, h]` ablates head h of layer l. Runs the plain layers.
        """
        hooks = dict(hooks)
        valid = set(self.activation_names())
        for name in hooks:
            if name not in valid:
                raise Npgpt2Error(f"hooks: unknown activation name {name!r}; valid: {self._name_forms()}")

        def apply(name, x):
            fn = hooks.get(name)
            if fn is None:
                return x
            out = fn(x)
            if out is None:
                return x
            if getattr(out, "shape", None) != x.shape:
                raise Npgpt2Error(f"hooks[{name!r}]: returned shape {getattr(out, 'shape', type(out).__name__)}, "
                                  f"expected {x.shape}")
            if getattr(out, "dtype", np.dtype(object)).kind not in "fiub":  # complex logits, objects: stop here
                raise Npgpt2Error(f"hooks[{name!r}]: returned dtype {getattr(out, 'dtype', type(out).__name__)}, "
                                  f"expected real numbers ({x.dtype})")
            return out

        tokens = self._check_tokens(tokens, error=Npgpt2Error)
        return self._head(self._trunk(tokens, layers, hook=apply))

    def _name_filter(self, names):
        if names is None:
            return lambda name: True
        if callable(names):
            return names
        names = [names] if isinstance(names, str) else list(names)
        valid = set(self.activation_names())
        for name in names:
            if name not in valid:
                raise Npgpt2Error(f"names: unknown activation name {name!r}; valid: {self._name_forms()}")
        names = set(names)
        return names.__contains__

    def _name_forms(self):
        parts = ", ".join(f"h{{i}}.{name}" for name in BLOCK_ACTS)
        return f"embed, {parts}, ln_f (i = 0..{self.hparams['n_layer'] - 1})"


def _unchanged(name, x):
    return x


def _prefixed(hook, prefix):
    """hook(name, x) called as hook(prefix + name, x)."""
    return lambda name, x: hook(prefix + name, x)
