"""GPT-2: parameters, forward pass, loss and gradients, KV cache; load, init and save.

Parameters are kept exactly as OpenAI's checkpoint holds them (TF variable name -> array,
e.g. `model/h0/attn/c_attn/w` is (1, C, 3C)), so loading and saving need no renaming.
The layer math lives in `layers.py` (plain NumPy) and its fast twins in `kernels.py`;
`NPGPT2_PLAIN=1` in the environment runs everything on the plain path.
"""
import filecmp
import json
import logging
import math
import mmap
import os
import shutil
from pathlib import Path

import numpy as np

from . import gemv, layers, quant
from .checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint, write_checkpoint_state
from .compact_vocab import VOCAB_FILE as COMPACT_VOCAB_FILE
from .errors import Npgpt2Error
from .fsutil import atomic_write, read_json
from .jit import numba, plain_fallback
from .param_map import ParamMap
from .quant import QuantizedWeight

log = logging.getLogger(__name__)

HPARAM_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
ASSETS = Path(__file__).parent / "assets"

# The sizes OpenAI released; 117M and 345M are the names they were first published under.
MODEL_HPARAMS = {
    "124M": dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "355M": dict(n_vocab=50257, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),
    "774M": dict(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
    "1558M": dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48),
}
ALIASES = {"117M": "124M", "345M": "355M"}


def ops():
    """The layer implementations in use: Numba kernels, or plain NumPy with NPGPT2_PLAIN=1
    (or when Numba cannot be imported, after one logged warning)."""
    if os.environ.get("NPGPT2_PLAIN", "") not in ("", "0") or numba() is None:
        return layers
    try:
        from . import kernels
    except ImportError as e:  # a Numba that imports but cannot build the kernels
        plain_fallback(e)
        return layers
    return kernels


# ---------------------------------------------------------------- shapes
def param_shapes(hparams):
    """{TF variable name: shape} for these hparams, in OpenAI's order."""
    V, T, C, L = (hparams[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_layer"))
    shapes = {"model/wte": (V, C), "model/wpe": (T, C)}
    for i in range(L):
        h = f"model/h{i}/"
        shapes.update({
            h + "ln_1/g": (C,), h + "ln_1/b": (C,),
            h + "attn/c_attn/w": (1, C, 3 * C), h + "attn/c_attn/b": (3 * C,),
            h + "attn/c_proj/w": (1, C, C), h + "attn/c_proj/b": (C,),
            h + "ln_2/g": (C,), h + "ln_2/b": (C,),
            h + "mlp/c_fc/w": (1, C, 4 * C), h + "mlp/c_fc/b": (4 * C,),
            h + "mlp/c_proj/w": (1, 4 * C, C), h + "mlp/c_proj/b": (C,),
        })
    shapes.update({"model/ln_f/g": (C,), "model/ln_f/b": (C,)})
    return shapes


def check_hparams(hparams, source="hparams.json"):
    """Raise Npgpt2Error unless hparams has the five positive integers GPT-2 needs."""
    if not isinstance(hparams, dict):
        raise Npgpt2Error(f"{source}: expected a JSON object with {', '.join(HPARAM_KEYS)}")
    for k in HPARAM_KEYS:
        v = hparams.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise Npgpt2Error(f"{source}: '{k}' must be a positive integer, got {v!r}")
    if hparams["n_embd"] % hparams["n_head"]:
        raise Npgpt2Error(f"{source}: n_embd ({hparams['n_embd']}) is not divisible by "
                          f"n_head ({hparams['n_head']})")


def validate_params(hparams, params, source):
    """Raise Npgpt2Error naming the tensor when params disagree with hparams."""
    for name, shape in param_shapes(hparams).items():
        if name not in params:
            raise Npgpt2Error(f"{source}: tensor '{name}' is missing (expected by hparams.json)")
        if tuple(params[name].shape) != shape:
            raise Npgpt2Error(f"{source}: tensor '{name}' has shape {tuple(params[name].shape)}, "
                              f"but hparams.json implies {shape}")


def check_finite(params, source):
    """Raise Npgpt2Error naming the first tensor (an int8 weight's scales) with a NaN or inf.

    A float sum is finite only when every element is (inf and NaN propagate; a finite sum
    that overflows only sends us to the exact check): 0.14-0.26 s for 124M's 500 MB (2-core Xeon, busy).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        for name, w in params.items():
            name, a = (name + "/scale", w.scale) if isinstance(w, QuantizedWeight) else (name, w)
            if a.dtype.kind == "f" and not np.isfinite(a.sum()) and not np.isfinite(a).all():
                raise Npgpt2Error(f"{source}: tensor '{name}' holds NaN or infinite values "
                                  f"(a damaged or diverged checkpoint)")


# ---------------------------------------------------------------- the model
class KVCache:
    """Keys and values of every layer for each row's positions 0..lengths[row]-1, preallocated
    to n_ctx.

    k, v: (n_layer, B, NH, n_ctx, hs); lengths: int (B,). Decoding one token writes one
    position of a row; nothing is reallocated. Rows may be at different lengths (batched
    decoding: batch_decode.py); `select(rows)` is what forward() takes to run some of them.
    """

    rows = None  # forward() runs every row, batch row b = cache row b

    def __init__(self, hparams, batch_size, dtype):
        L, NH, C, T = (hparams[k] for k in ("n_layer", "n_head", "n_embd", "n_ctx"))
        shape = (L, batch_size, NH, T, C // NH)
        self.k = lazy_zeros(shape, dtype)
        self.v = lazy_zeros(shape, dtype)
        self.lengths = np.zeros(batch_size, dtype=np.int64)

    @property
    def length(self):
        """The rows' common length (ValueError when they differ)."""
        return _common_length(self.lengths)

    @length.setter
    def length(self, n):
        self.lengths[:] = n

    def advance(self, n):
        self.lengths += n

    def truncate(self, length):
        """Forget positions >= length (they are overwritten by the next forward)."""
        np.minimum(self.lengths, length, out=self.lengths)

    def select(self, rows):
        """Some rows for one forward(): batch row b is cache row rows[b], at its own length."""
        return CacheRows(self, rows)


class CacheRows:
    """A KVCache's rows `rows` (int (B,)), each at its own length, for forward(); no copy."""

    def __init__(self, cache, rows):
        self.cache, self.k, self.v = cache, cache.k, cache.v
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def lengths(self):
        return self.cache.lengths[self.rows]

    @property
    def length(self):
        return _common_length(self.lengths)

    def advance(self, n):
        self.cache.lengths[self.rows] += n


def lazy_zeros(shape, dtype):
    """Zeros whose memory is taken only as it is written, 4 KB at a time: an anonymous mmap.
    (np.zeros of a large array asks Linux for 2 MB pages, so a short sequence, which writes a
    few positions of every head's (n_ctx, hs) block, would take 2 MB per block.)"""
    n = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(1, n * np.dtype(dtype).itemsize)), dtype=dtype, count=n).reshape(shape)


def _common_length(lengths):
    if lengths.min() != lengths.max():
        raise ValueError(f"the cache's rows have different lengths ({lengths.min()}..{lengths.max()})")
    return int(lengths[0])


class GPT2:
    """GPT-2 with its parameters in OpenAI's layout.

    hparams: dict n_vocab, n_ctx, n_embd, n_head, n_layer.
    params: {TF variable name: ndarray}; see param_shapes(). `model.params[name] = x`
    copies x into that array in place (same shape; param_map.py); set_params replaces all.
    """

    def __init__(self, hparams, params, dtype=np.float32):
        check_hparams(hparams)
        self.hparams = dict(hparams)
        self.dtype = np.dtype(dtype)
        self.lora = None  # lora.LoraAdapters once lora.attach() gives it adapters; the base is then frozen
        self.set_params(params)
        self.source_dir = None  # the folder it was loaded from (for encoder.json etc.)

    def set_params(self, params):
        """Use these parameter arrays (cast to self.dtype) and make each block's views of them.

        blocks[i] holds layer i's parameters under short names ("ln_1/g", "attn/c_attn/w"),
        the (1, C, OC) conv weights as (C, OC) views: views see the in-place updates of
        training, so they are made once here, not on every forward.
        """
        # C-contiguous (no copy when already so): the optimizer and gradcheck update in place
        self._params = {k: v if isinstance(v, QuantizedWeight)  # int8 (quant.py): kept as it is
                        else np.ascontiguousarray(v, dtype=self.dtype)
                        for k, v in params.items()}
        self.params = ParamMap(self._params, self.dtype)
        self.blocks = []
        for i in range(self.hparams["n_layer"]):
            prefix = f"model/h{i}/"
            self.blocks.append({name[len(prefix):]: (w[0] if w.ndim == 3 else w)
                                for name, w in self._params.items() if name.startswith(prefix)})
        if self.lora is not None:  # the new blocks get the adapters' views again
            from .lora import attach
            attach(self, self.lora)

    @property
    def weight_dtype(self):
        """'int8' when the weights are quant.QuantizedWeight (load_model(dtype="int8")), else the float dtype's name."""
        return "int8" if isinstance(self._params["model/wte"], QuantizedWeight) else self.dtype.name

    def new_cache(self, batch_size=1):
        return KVCache(self.hparams, batch_size, self.dtype)

    def activation_names(self):
        """The names run_with_cache and run_with_hooks know, in the order the forward makes them."""
        return ["embed"] + [f"h{i}.{name}" for i in range(self.hparams["n_layer"]) for name in BLOCK_ACTS] + ["ln_f"]

    # ------------------------------------------------------------ the forward pass, as the paper writes it
    def _trunk(self, tokens, nn, hook=None, saved=None):
        """tokens: int (B, T) -> the residual stream after ln_f (B, T, C).

        The one forward of the model (inference without a cache, interpretability, training):
        embed -> n_layer blocks -> ln_f. nn is the layer module (`layers`, or `kernels` for
        speed). hook(name, x) -> x is called at every named activation (activation_names())
        and its result used instead; hooks need nn=layers (the fast twins have no hook points).
        saved, a dict, receives what backward() needs (see forward_with_saves).
        """
        at = hook or _unchanged
        wte, wpe = self._params["model/wte"], self._params["model/wpe"]
        x = at("embed", nn.encoder_forward(wte, wpe, tokens))  # [B, T] -> [B, T, C]
        for i, blk in enumerate(self.blocks):
            block_hook = None if hook is None else _prefixed(hook, f"h{i}.")
            resid_pre = x  # [B, T, C]
            x, block_saved = self._block_forward(nn, blk, x, block_hook)  # [B, T, C] -> [B, T, C]
            if saved is not None:
                # memory_saving keeps only the block's input: backward re-runs the block from it
                saved["blocks"].append({"resid_pre": resid_pre} if saved.get("memory_saving") else block_saved)
            del block_saved  # (memory_saving) before the next block makes its own
        ln_f, ln_f_mean, ln_f_rstd = nn.layernorm_forward(
            x, self._params["model/ln_f/g"], self._params["model/ln_f/b"])  # [B, T, C]
        if saved is not None:
            saved.update({"resid_final": x, "ln_f": ln_f, "ln_f.mean": ln_f_mean, "ln_f.rstd": ln_f_rstd})
        return at("ln_f", ln_f)

    def _block_forward(self, nn, blk, x, hook=None):
        """One transformer block: x (B, T, C) -> (x (B, T, C), what its backward needs).

        Pre-norm, as GPT-2: x + attn(ln_1(x)), then that + mlp(ln_2(that)).
        """
        at = hook or _unchanged
        NH = self.hparams["n_head"]
        lora_h = {}  # with LoRA adapters: each adapted matrix's x @ A (see _linear)
        # attention: every position mixes in the values of the positions it attends to
        ln_1, _, _ = nn.layernorm_forward(x, blk["ln_1/g"], blk["ln_1/b"])  # [B, T, C]
        ln_1 = at("ln_1", ln_1)
        qkv = _linear(nn, blk, "attn/c_attn", ln_1, lora_h)  # [B, T, C] -> [B, T, 3C]
        if hook is None:
            z, att = nn.attention_forward(qkv, NH)  # [B, T, 3C] -> [B, T, C], what attention_backward needs
        else:
            z, att = layers.attention_forward(qkv, NH, hook=_prefixed(hook, "attn."))  # the same, hooked
        z = at("attn.z", z)  # [B, T, C]: the NH heads' outputs side by side
        attn_out = _linear(nn, blk, "attn/c_proj", z, lora_h)  # [B, T, C] -> [B, T, C]
        attn_out = at("attn.out", attn_out)
        resid_mid = at("resid_mid", x + attn_out)  # [B, T, C]
        # MLP: each position on its own, through 4C hidden units
        ln_2, _, _ = nn.layernorm_forward(resid_mid, blk["ln_2/g"], blk["ln_2/b"])  # [B, T, C]
        ln_2 = at("ln_2", ln_2)
        mlp_pre = _linear(nn, blk, "mlp/c_fc", ln_2, lora_h)  # [B, T, C] -> [B, T, 4C]
        mlp_pre = at("mlp.pre", mlp_pre)
        mlp_post = at("mlp.post", nn.gelu_forward(mlp_pre))  # [B, T, 4C]
        mlp_out = _linear(nn, blk, "mlp/c_proj", mlp_post, lora_h)  # [B, T, 4C] -> [B, T, C]
        mlp_out = at("mlp.out", mlp_out)
        resid_post = at("resid_post", resid_mid + mlp_out)  # [B, T, C]
        # what the backward needs that it cannot cheaply recompute (see forward_with_saves)
        saved = {"resid_pre": x, "attn.qkv": qkv, "attn.att": att, "attn.z": z, "resid_mid": resid_mid,
                 "mlp.pre": mlp_pre}
        if self.lora is not None:  # the base is frozen: the backward needs only the adapters' h
            saved["lora.h"] = lora_h
        return resid_post, saved

    def _head(self, x):
        """x: (B, T, C) after ln_f -> logits (B, T, V); the output head is the token embedding."""
        wte = self._params["model/wte"]
        if isinstance(wte, QuantizedWeight) and ops() is not layers:  # int8: the dequantising GEMV
            from .quant_kernels import matmul_forward
            return matmul_forward(x, wte.T, None)  # [B, T, C] -> [B, T, V]
        # one GEMM over all B*T rows: NumPy's matmul of (B, T, C) would make one per batch row,
        # each reading all of wte (at T = 1, batched decoding, B times the head's memory traffic)
        B, T, C = x.shape
        if B * T <= gemv.MAX_ROWS and wte.dtype == np.float32 and ops() is not layers:
            # decoding: gemv.py reads each wte row once for all rows, on 2 cores when one is free
            return gemv.matmul_rows(x.reshape(B * T, C), wte.T).reshape(B, T, -1)  # [B*T, C] -> [B, T, V]
        return (x.reshape(B * T, C) @ wte.T).reshape(B, T, -1)  # [B*T, C] @ [C, V] -> [B, T, V]

    # ------------------------------------------------------------ inference
    def forward(self, tokens, cache=None, last_only=False):
        """tokens: int (B, T) -> logits (B, T, V); with last_only, (B, 1, V).

        With a cache, tokens are the next T positions after cache.length, and the cache
        is extended by them. last_only skips the output head for positions whose logits
        nobody reads (prompt prefill).
        """
        tokens = self._check_tokens(tokens, int(cache.lengths.max()) if cache is not None else 0)
        nn = ops()
        if nn is layers and cache is None:
            # the readable path (NPGPT2_PLAIN=1): embed -> blocks -> ln_f, the code run_with_cache runs
            x = self._trunk(tokens, layers)  # [B, T] -> [B, T, C]
            return self._head(x[:, -1:] if last_only else x)  # [B, T, C] -> [B, T, V]
        return self._forward_fast(nn, tokens, cache, last_only)

    def _check_tokens(self, tokens, pos0=0, error=ValueError):
        """tokens as an int (B, T) array, or `error` saying what is wrong with them."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise error(f"tokens: expected token ids of shape (B, T), got shape {tokens.shape} dtype {tokens.dtype}")
        if pos0 + tokens.shape[1] > self.hparams["n_ctx"]:
            raise error(f"tokens: {pos0 + tokens.shape[1]} positions exceed the context n_ctx={self.hparams['n_ctx']}")
        if error is Npgpt2Error:  # the learner-facing calls: a negative id would silently wrap around
            V = self.hparams["n_vocab"]
            if tokens.size == 0:
                raise error(f"tokens: empty (shape {tokens.shape})")
            if tokens.min() < 0 or tokens.max() >= V:
                raise error(f"tokens: ids must be in [0, {V}), got {int(tokens.min())}..{int(tokens.max())}")
        return tokens

    def _forward_fast(self, nn, tokens, cache, last_only):
        """forward() for the kernels and for decoding with a KV cache: the same result as
        _trunk + _head (tests hold them equal), computed the way that is fast, not readable.

        It differs from the paper's forward in four ways, each for speed or memory:
        - attention goes through attention_forward_cached (keys and values written to a cache,
          a throwaway one without `cache`): the (B, NH, T, T) probabilities, which only
          training and run_with_cache need, are never kept;
        - with a cache, tokens are only the new positions; earlier keys and values are reused;
        - with last_only, the last layer computes attention, MLP and residual for the last
          position only (the others only give it keys and values);
        - the residual additions go into x in place (no saved activation needs the old x).
        """
        B, T = tokens.shape  # T new positions pos0..pos0+T-1 (all of them without a cache)
        rows, pos0 = (None, 0) if cache is None else (cache.rows, cache.lengths)  # cache rows, (B,) lengths
        if rows is None and (pos0 == np.min(pos0)).all():
            pos0 = int(np.min(pos0))  # every row at one length: the kernels' one-call path
        NH, L = self.hparams["n_head"], self.hparams["n_layer"]
        hs = self.hparams["n_embd"] // NH
        # x is a fresh array: the residual additions below go into it in place
        x = nn.encoder_forward(self._params["model/wte"], self._params["model/wpe"], tokens, pos0)  # [B, T, C]
        for i, blk in enumerate(self.blocks):
            ln_1, _, _ = nn.layernorm_forward(x, blk["ln_1/g"], blk["ln_1/b"])  # [B, T, C]
            qkv = _linear(nn, blk, "attn/c_attn", ln_1)  # [B, T, C] -> [B, T, 3C]
            if cache is None:
                # a throwaway cache for this layer: the same result as attention_forward
                # without keeping its (B, NH, T, T) probabilities, which only training needs
                kv = np.empty((2, B, NH, T, hs), dtype=qkv.dtype)
                k_cache, v_cache, p0 = kv[0], kv[1], 0  # [B, NH, T, hs] each
            else:
                k_cache, v_cache, p0 = cache.k[i], cache.v[i], pos0  # [B, NH, n_ctx, hs] each
            if last_only and i == L - 1 and T > 1:
                # only the last position's output is read: the others give the last layer
                # keys and values, but their attention, MLP and residual rows are skipped
                k, v = (layers.split_heads(t, NH) for t in np.split(qkv[:, :-1], 3, axis=-1)[1:])  # [B, NH, T-1, hs]
                for b, (r, p) in enumerate(zip(range(B) if rows is None else rows, np.broadcast_to(p0, (B,)))):
                    k_cache[r, :, p:p + T - 1] = k[b]  # [NH, T-1, hs] into cache row r at its length
                    v_cache[r, :, p:p + T - 1] = v[b]
                qkv, x, p0 = qkv[:, -1:], x[:, -1:], p0 + T - 1  # from here T is 1
            z = nn.attention_forward_cached(qkv, k_cache, v_cache, p0, NH, rows)  # [B, T, 3C] -> [B, T, C]
            x += _linear(nn, blk, "attn/c_proj", z)  # [B, T, C]
            ln_2, _, _ = nn.layernorm_forward(x, blk["ln_2/g"], blk["ln_2/b"])  # [B, T, C]
            mlp_h = _linear(nn, blk, "mlp/c_fc", ln_2)  # [B, T, C] -> [B, T, 4C]
            mlp_h = nn.gelu_forward(mlp_h)  # [B, T, 4C]
            x += _linear(nn, blk, "mlp/c_proj", mlp_h)  # [B, T, 4C] -> [B, T, C]
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]  # [B, 1, C]
        x, _, _ = nn.layernorm_forward(x, self._params["model/ln_f/g"], self._params["model/ln_f/b"])  # [B, T, C]
        return self._head(x)  # [B, T, C] -> [B, T, V]

    # ------------------------------------------------------------ looking inside (plain layers only)
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

    # ------------------------------------------------------------ training
    def forward_with_saves(self, tokens, nn=None, memory_saving=False):
        """tokens: int (B, T) -> (logits (B, T, V), saved): the forward that backward() continues.

        nn: the layer module (default ops(): the kernels unless NPGPT2_PLAIN=1); backward
        uses the same one. memory_saving (`train --memory_saving_gradients`): saved["blocks"][i]
        holds resid_pre alone (C floats a token and layer instead of 10C + attention's), and
        backward re-runs block i's forward from it, with its saves, just before block i's
        backward: one block's activations exist at a time, for one more forward of the blocks.
        The same ops on the same inputs, so the gradients are the same.
        saved holds (llm.c's ActivationTensors; B, T, C, NH as usual):

            per block, saved["blocks"][i]:
              resid_pre (B, T, C)      the block's input, the residual stream (ln_1's input)
              attn.qkv (B, T, 3C)      c_attn's output: queries, keys, values side by side
              attn.att                 attention_forward's second return: what attention_backward
                                       needs ((B, NH, T, T) probabilities in layers.py)
              attn.z (B, T, C)         the heads' outputs merged, c_proj's input
              resid_mid (B, T, C)      the residual stream after the attention branch (ln_2's input)
              mlp.pre (B, T, 4C)       c_fc's output, GELU's input
            resid_final (B, T, C)      the last block's output
            ln_f (B, T, C)             ln_f's output; ln_f.mean, ln_f.rstd (B, T)
            tokens (B, T), nn          the input ids and the layer module

        Not kept, because backward recomputes them (one cheap pass each, where keeping them
        would cost 6C more floats a token in every layer, on top of these 10C): ln_1 and
        ln_2 (outputs, mean, rstd: layernorm_forward of resid_pre, resid_mid) and mlp.post
        (gelu_forward of mlp.pre). The recomputed values are the forward's, bit for bit.
        """
        ln_f, saved = self._trunk_with_saves(tokens, nn, memory_saving)  # [B, T] -> [B, T, C]
        return self._head(ln_f), saved  # [B, T, C] -> [B, T, V]

    def _trunk_with_saves(self, tokens, nn=None, memory_saving=False):
        """forward_with_saves without the output head: -> (ln_f (B, T, C), saved)."""
        if self.weight_dtype == "int8" and self.lora is None:  # a frozen int8 base under LoRA adapters trains
            raise Npgpt2Error("training an int8 model: int8 weights are for generation only; "
                              "load it with dtype float32 (the default) to train, or train LoRA adapters on it")
        nn = nn or ops()
        tokens = self._check_tokens(tokens)
        saved = {"tokens": tokens, "nn": nn, "blocks": [], "memory_saving": bool(memory_saving)}
        return self._trunk(tokens, nn, saved=saved), saved

    def backward(self, dlogits, saved):
        """dlogits: (B, T, V), any gradient of the logits; saved: from forward_with_saves.

        Returns (grads, dembed): grads has the keys and shapes of params (the tied model/wte
        gets the output head's and the embedding's contributions), dembed (B, T, C) is the
        gradient with respect to the embedding output wte[tokens] + wpe[positions].
        Consumes saved (each block's activations are freed once its backward is done).
        """
        V, C = self.hparams["n_vocab"], self.hparams["n_embd"]
        # the output head: logits = ln_f @ wte.T; wte's second contribution comes at the embedding
        dwte = None if self.lora is not None else (  # a frozen base (LoRA) gets no gradient
            dlogits.reshape(-1, V).T @ saved["ln_f"].reshape(-1, C))  # [V, B*T] @ [B*T, C] -> [V, C]
        dln_f = dlogits @ self._params["model/wte"]  # [B, T, V] @ [V, C] -> [B, T, C]
        return self._trunk_backward(dln_f, dwte, saved)

    def _trunk_backward(self, dln_f, dwte, saved):
        """backward() after the head: dln_f (B, T, C) at ln_f's output, dwte (V, C) the head's
        part of wte's gradient (the embedding's is added to it in place) -> (grads, dembed)."""
        nn, tokens, blocks = saved["nn"], saved["tokens"], saved["blocks"]
        grads = {}
        dresid, grads["model/ln_f/g"], grads["model/ln_f/b"] = nn.layernorm_backward(
            dln_f, saved.pop("resid_final"), self._params["model/ln_f/g"], saved["ln_f.mean"],
            saved["ln_f.rstd"])  # [B, T, C]
        saved.pop("ln_f", None)  # not needed below (loss_and_grads drops its own reference too)
        for i in reversed(range(len(blocks))):
            act = blocks.pop()
            if saved.get("memory_saving"):  # the forward kept only the block's input: run the block again
                act = self._block_forward(nn, self.blocks[i], act["resid_pre"])[1]  # [B, T, C] -> its saves
            dresid = self._block_backward(nn, i, dresid, act, grads)  # [B, T, C] -> [B, T, C]
            del act  # this block's activations go before the next block's are made
        dembed = dresid  # [B, T, C]: the gradient at wte[tokens] + wpe[positions]
        if self.lora is not None:  # LoRA: the adapters' gradients alone (the layer norms' (C,) ones, two
            return {k: grads[k] for k in self.lora.params}, dembed  # sums each, are dropped); no embedding's
        # the embedding: rows of wte picked by the tokens (a repeated token sums its rows' gradients).
        # Only the distinct tokens' rows get a gradient, so encoder_backward runs over those (ids
        # renumbered 0..n-1): a (n, C) array instead of a second (V, C) one (154 MB at 124M)
        ids, renumbered = np.unique(tokens, return_inverse=True)
        drows, grads["model/wpe"] = nn.encoder_backward(
            dembed, renumbered.reshape(tokens.shape), len(ids), self.hparams["n_ctx"])  # [n, C], [n_ctx, C]
        dwte[ids] += drows  # the tied wte's second contribution (ids are distinct: no repeat is lost)
        grads["model/wte"] = dwte
        return {k: grads[k] for k in self._params}, dembed

    def _block_backward(self, nn, i, dresid, act, grads):
        """Block i backward: dresid (B, T, C) at its output -> at its input; fills grads.

        act: what _block_forward saved. Each linear layer's backward is _linear_backward: its
        (C, OC) weight gradient gets back the leading axis of TF's conv1d weight (1, C, OC), so a
        gradient has its parameter's shape; with LoRA adapters (act["lora.h"]) only the adapters'
        gradients are made.
        """
        blk, prefix, NH = self.blocks[i], f"model/h{i}/", self.hparams["n_head"]
        g = {}  # this block's gradients under the short names of blk
        # resid_post = resid_mid + mlp(resid_mid): dresid flows into the MLP branch and past it
        lora_h = act.get("lora.h")  # None, or the base is frozen (LoRA): see _linear_backward
        mlp_post = nn.gelu_forward(act["mlp.pre"])  # [B, T, 4C]: GELU's output again (not saved)
        dmlp_post = _linear_backward(nn, blk, "mlp/c_proj", dresid, mlp_post, g, lora_h)  # [B, T, C] -> [B, T, 4C]
        del mlp_post
        dmlp_pre = nn.gelu_backward(dmlp_post, act["mlp.pre"])  # [B, T, 4C]
        del dmlp_post  # the (B, T, 4C) gradients go as soon as they are used: they set the peak
        dbranch = _norm_linear_backward(nn, blk, "ln_2", "mlp/c_fc", act["resid_mid"], dmlp_pre, g,
                                        lora_h)  # [B, T, C]
        del dmlp_pre
        dresid = dresid + dbranch  # [B, T, C] at resid_mid
        # resid_mid = resid_pre + attn(resid_pre): the same again through the attention branch
        dz = _linear_backward(nn, blk, "attn/c_proj", dresid, act["attn.z"], g, lora_h)  # [B, T, C]
        dqkv = nn.attention_backward(dz, act["attn.qkv"], act["attn.att"], NH)  # [B, T, C] -> [B, T, 3C]
        dbranch = _norm_linear_backward(nn, blk, "ln_1", "attn/c_attn", act["resid_pre"], dqkv, g,
                                        lora_h)  # [B, T, C]
        grads.update({prefix + name: grad for name, grad in g.items()})
        return dresid + dbranch  # [B, T, C] at resid_pre

    def loss_and_grads(self, inputs, targets, mask=None, memory_saving=False):
        """inputs, targets: int (B, T) -> (mean cross-entropy, grads).

        grads has the same keys and shapes as params; the tied model/wte gets both the
        embedding's and the output head's contribution. mask: None, or 0/1 (B, T) on the
        targets: the loss is then sum(mask * ce) / sum(mask), the mean over the masked
        positions only (the caller never passes an all-zero mask), and grads are its gradients.
        memory_saving: keep only each block's input and recompute the block in the backward
        (see forward_with_saves); same gradients.
        """
        nn = ops()
        targets = np.asarray(targets)
        ln_f, saved = self._trunk_with_saves(inputs, nn, memory_saving)  # [B, T] -> [B, T, C]
        losses, dln_f, dwte = self._head_loss_backward(nn, ln_f, targets, mask)  # [B, T], [B, T, C], [V, C]
        del ln_f  # saved holds it until _trunk_backward is past ln_f
        grads, _ = self._trunk_backward(dln_f, dwte, saved)  # {name: array like params}
        if mask is None:
            return float(losses.mean()), grads
        return float(np.sum(losses * mask, dtype=np.float64) / np.sum(mask)), grads

    def _head_loss_backward(self, nn, ln_f, targets, mask=None):
        """The output head, the cross-entropy and their backward, HEAD_ROWS positions at a time.

        ln_f (B, T, C), targets (B, T), mask None or (B, T) -> (losses (B, T), dln_f (B, T, C),
        dwte (V, C) the head's part of wte's gradient): what _head, crossentropy_forward,
        crossentropy_softmax_backward (for the mean loss, or the masked mean) and backward's head
        give for the whole batch, up to float rounding.
        The logits are the largest array of a step (B*T*V floats: 206 MB at B=1, T=1024), so
        they never exist whole: each chunk's logits buffer holds its probabilities, then their
        gradient (the `out=` of the cross-entropy), and is gone before the next chunk's.
        """
        B, T, C = ln_f.shape
        V, N = self.hparams["n_vocab"], B * T
        wte = self._params["model/wte"]
        x, tgt = ln_f.reshape(1, N, C), targets.reshape(1, N)  # the B*T positions as one row
        losses = np.empty((1, N), dtype=self.dtype)
        dln_f = np.empty((1, N, C), dtype=self.dtype)
        dwte = None if self.lora is not None else np.empty((V, C), dtype=self.dtype)  # LoRA: wte is frozen
        if mask is None:
            dlosses = np.full((1, min(N, HEAD_ROWS)), 1.0 / N, dtype=self.dtype)  # d mean / d each loss
        else:  # d (sum(mask * ce) / sum(mask)) / d each loss: 0 off the mask
            dlosses = (np.asarray(mask, np.float64).reshape(1, N) / np.sum(mask)).astype(self.dtype)
        part = np.empty((min(V, HEAD_VOCAB_BLOCK), C), dtype=self.dtype)
        for n0 in range(0, N, HEAD_ROWS):
            n1 = min(N, n0 + HEAD_ROWS)
            logits = self._head(x[:, n0:n1])  # [1, R, C] -> [1, R, V]
            losses[:, n0:n1], probs = nn.crossentropy_forward(logits, tgt[:, n0:n1], out=logits)
            dlogits = nn.crossentropy_softmax_backward(
                dlosses[:, :n1 - n0] if mask is None else dlosses[:, n0:n1], probs, tgt[:, n0:n1],
                out=probs)  # [1, R, V], over probs
            _head_input_grad(dlogits, wte, dln_f[:, n0:n1])  # [1, R, V] @ [V, C] -> [1, R, C]
            d, xr = dlogits.reshape(-1, V), x[0, n0:n1]  # [R, V], [R, C]
            if dwte is not None and n0 == 0:  # (None: LoRA's frozen wte)
                np.matmul(d.T, xr, out=dwte)  # [V, R] @ [R, C] -> [V, C]
            elif dwte is not None:  # a later chunk adds to dwte a block of rows at a time: no second (V, C) array
                for v0 in range(0, V, HEAD_VOCAB_BLOCK):
                    v1 = min(V, v0 + HEAD_VOCAB_BLOCK)
                    dwte[v0:v1] += np.matmul(d[:, v0:v1].T, xr, out=part[:v1 - v0])  # [v, R] @ [R, C]
            del logits, probs, dlogits, d  # this chunk's buffer goes before the next one is made
        return losses.reshape(B, T), dln_f.reshape(B, T, C), dwte


# training computes the logits this many positions at a time (256 x 50257 floats: 51 MB) ...
HEAD_ROWS = 256
# ... and adds each chunk's part of the output head's (V, C) gradient this many rows at a time
HEAD_VOCAB_BLOCK = 4096

# the activations of block i are named h{i}.<one of these>, in the order the forward makes them
BLOCK_ACTS = ("ln_1", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", "attn.out",
              "resid_mid", "ln_2", "mlp.pre", "mlp.post", "mlp.out", "resid_post")


def _norm_linear_backward(nn, blk, ln, linear, x, dout, g, lora_h=None):
    """The backward of linear(ln(x)), how each branch of a block begins: dout (B, T, OC) at the
    linear layer's output -> the gradient at x (B, T, C); the four parameter gradients go into
    g under blk's short names (with lora_h, a frozen base: the adapter's instead of the
    linear layer's, see _linear_backward). ln's output is recomputed from x (not saved by the forward), bit for
    bit what the forward had.
    """
    h, mean, rstd = nn.layernorm_forward(x, blk[ln + "/g"], blk[ln + "/b"])  # [B, T, C]: ln again
    dh = _linear_backward(nn, blk, linear, dout, h, g, lora_h)  # [B, T, OC] -> [B, T, C]
    dx, g[ln + "/g"], g[ln + "/b"] = nn.layernorm_backward(dh, x, blk[ln + "/g"], mean, rstd)  # [B, T, C]
    return dx


def _linear(nn, blk, name, x, lora_h=None):
    """x @ W + b for blk's matrix `name` (e.g. "attn/c_attn"), x (B, T, C) -> (B, T, OC); with a
    LoRA adapter on it (lora.attach put `name/lora_A`, `/lora_B`, `/lora_scaling` in blk),
    lora_forward's x @ W + b + scaling * (x @ A) @ B, its h = x @ A kept in lora_h[name]."""
    if name + "/lora_A" not in blk:
        return nn.matmul_forward(x, blk[name + "/w"], blk[name + "/b"])
    out, h = nn.lora_forward(x, blk[name + "/w"], blk[name + "/b"], blk[name + "/lora_A"],
                             blk[name + "/lora_B"], blk[name + "/lora_scaling"])  # [B, T, OC], [B, T, r]
    if lora_h is not None:
        lora_h[name] = h
    return out


def _linear_backward(nn, blk, name, dout, x, g, lora_h=None):
    """The backward of _linear: dout (B, T, OC) -> dx (B, T, C). lora_h None: the base trains,
    g gets `name/w` (1, C, OC) and `name/b`. Otherwise the base is frozen: an adapted matrix
    gives g `name/lora_A`, `name/lora_B` (lora_backward), any other only dx = dout @ W^T."""
    w = blk[name + "/w"]
    if lora_h is None:
        dx, dw, g[name + "/b"] = nn.matmul_backward(dout, x, w)  # [B, T, OC] -> [B, T, C]
        g[name + "/w"] = dw[None]  # [C, OC] -> [1, C, OC], the conv1d weight's shape
        return dx
    if name in lora_h:
        dx, g[name + "/lora_A"], g[name + "/lora_B"] = nn.lora_backward(
            dout, x, w, blk[name + "/lora_A"], blk[name + "/lora_B"], blk[name + "/lora_scaling"],
            lora_h[name])  # [B, T, C], [C, r], [r, OC]
        return dx
    C, OC = w.shape
    return (dout.reshape(-1, OC) @ w.T).reshape(x.shape)  # [N, OC] @ [OC, C]: the input gradient alone


def _head_input_grad(dlogits, wte, out):
    """out[...] = dlogits @ wte, (1, R, V) @ (V, C) -> (1, R, C). An int8 wte (a frozen 8-bit
    base under LoRA) is dequantised HEAD_VOCAB_BLOCK rows at a time, never whole."""
    if not isinstance(wte, QuantizedWeight):
        np.matmul(dlogits, wte, out=out)  # [1, R, V] @ [V, C] -> [1, R, C]
        return
    V = wte.shape[0]
    out[...] = 0
    for v0 in range(0, V, HEAD_VOCAB_BLOCK):
        rows = wte.rows(slice(v0, v0 + HEAD_VOCAB_BLOCK))  # [v, C] float32
        out += dlogits[..., v0:v0 + HEAD_VOCAB_BLOCK] @ rows  # [1, R, v] @ [v, C] -> [1, R, C]


def _unchanged(name, x):
    return x


def _prefixed(hook, prefix):
    """hook(name, x) called as hook(prefix + name, x)."""
    return lambda name, x: hook(prefix + name, x)


# ---------------------------------------------------------------- init, load, save
def init_model(hparams, seed=0, dtype=np.float32):
    """A GPT2 with GPT-2's initialisation (as OpenAI's model.py and the GPT-2 paper).

    Weights N(0, 0.02), wpe N(0, 0.01), biases 0, layernorm gains 1; the residual
    projections (attn/c_proj, mlp/c_proj) scaled by 1/sqrt(2 n_layer) as the paper says.
    """
    check_hparams(hparams, "hparams")
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    proj_std = 0.02 / math.sqrt(2 * hparams["n_layer"])
    params = {}
    for name, shape in param_shapes(hparams).items():
        leaf = name.rsplit("/", 1)[1]
        if leaf == "g":
            params[name] = np.ones(shape, dtype)
        elif leaf == "b":
            params[name] = np.zeros(shape, dtype)
        else:
            std = 0.01 if name == "model/wpe" else proj_std if name.endswith("c_proj/w") else 0.02
            w = rng.standard_normal(shape, dtype=np.float32 if dtype == np.float32 else np.float64)
            w *= std
            params[name] = w.astype(dtype, copy=False)
    return GPT2(hparams, params, dtype)


def resolve_model_dir(models_dir, model_name):
    """models_dir/model_name, accepting 117M/345M for 124M/355M (and back)."""
    folder = Path(models_dir) / model_name
    if folder.is_dir():
        return folder
    other = {**ALIASES, **{v: k for k, v in ALIASES.items()}}.get(model_name)
    if other and (Path(models_dir) / other).is_dir():
        return Path(models_dir) / other
    hint = (f"; download it with: npgpt2 download {model_name} --models_dir {models_dir}"
            if ALIASES.get(model_name, model_name) in MODEL_HPARAMS else "")
    raise Npgpt2Error(f"{folder}: model folder not found (--models_dir/--model_name){hint}")


def check_download_finished(model_dir):
    """Raise Npgpt2Error with the download command when `model_dir` is a released model's
    folder (124M, ...) left empty or half-filled by an interrupted `npgpt2 download`."""
    d = Path(model_dir)
    name = ALIASES.get(d.name, d.name)
    if name not in MODEL_HPARAMS or (d / "config.json").exists():
        return
    # `npgpt2 download` writes `checkpoint` last; OpenAI's download_model.py writes these too
    files = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "checkpoint")
    has = {n: (d / n).is_file() for n in files}
    if not has["hparams.json"] or (not has["checkpoint"] and (not all(has.values()) or any(d.glob("*.part")))):
        missing = ", ".join(n for n, ok in has.items() if not ok)
        raise Npgpt2Error(f"{d}: an empty or unfinished download ({missing} missing); finish it with: "
                          f"npgpt2 download {d.name} --models_dir {d.parent}")


def read_hparams(model_dir):
    path = Path(model_dir) / "hparams.json"
    try:
        hparams = read_json(path)
    except FileNotFoundError:
        if (Path(model_dir) / "config.json").exists():
            raise Npgpt2Error(f"{path}: missing; {model_dir} looks like a Hugging Face folder: "
                              f"convert it with: npgpt2 convert {model_dir} DST") from None
        raise Npgpt2Error(f"{path}: missing (not a GPT-2 model folder?)") from None
    check_hparams(hparams, str(path))
    return hparams


def load_model(model_dir, dtype=np.float32, verify=True, mmap=False, adapter=None, checkpoint=None):
    """Load an OpenAI-layout model folder (hparams.json + TF checkpoint) as a GPT2.

    verify checks every tensor's crc32c and that every weight is finite. mmap maps the checkpoint's data file instead of
    reading it (float32 only), so a 1558M model is paged in on demand, not copied.
    dtype="int8": 8-bit weights for generation (quant.py), quantised tensor by tensor from
    the memory-mapped float32 checkpoint, or read as they are from a folder written by
    `npgpt2 convert --dtype int8` (which loads dequantised with a float dtype).
    A LoRA run folder (adapter.json, see lora.py) loads its base model with its adapters
    attached; adapter=DIR attaches DIR's adapters (a LoRA run folder or a PEFT folder).
    checkpoint: a prefix path to load instead of the folder's latest (e.g. a run's model-best-<step>).
    """
    model_dir = Path(model_dir)
    try:
        int8 = np.dtype(dtype) == np.int8
        ok = int8 or np.dtype(dtype) in (np.float32, np.float64)
    except TypeError:
        ok = False
    if not ok:
        raise Npgpt2Error(f"dtype: {dtype!r} is not one of float32, float64 or 'int8'")
    if not model_dir.is_dir():
        raise Npgpt2Error(f"{model_dir}: model folder not found")
    from . import lora
    if lora.is_run_dir(model_dir) or adapter is not None:
        return lora.load_with_adapters(model_dir, dtype, verify, mmap, adapter)
    check_download_finished(model_dir)
    hparams = read_hparams(model_dir)
    prefix = checkpoint or latest_checkpoint(model_dir)
    if quant.read_quant_info(model_dir) is not None:  # an int8 folder
        params = quant.params_from_checkpoint(read_checkpoint(prefix, verify=verify, mmap=mmap),
                                              param_shapes(hparams), f"{prefix}.index")
        if verify:
            check_finite(params, prefix)
        params = params if int8 else quant.dequantize_params(params)
    else:
        params = read_checkpoint(prefix, verify=verify, mmap=mmap or int8)
        validate_params(hparams, params, f"{prefix}.index")
        params = {k: params[k] for k in param_shapes(hparams)}  # drop optimizer slots etc.
        if verify:  # the crc pass has read every byte already; this reads them once more
            check_finite(params, prefix)
        params = quant.quantize_params(params) if int8 else params
    model = GPT2(hparams, params, np.float32 if int8 else dtype)
    model.source_dir = model_dir
    return model


def save_model(model, model_dir, step=None, keep=None):
    """Write model as an OpenAI-layout folder that load_model (and TF tools) can read.

    Writes hparams.json, encoder.json, vocab.bpe (and a compact vocabulary map, see
    compact_vocab.py, when the model came with one), the checkpoint `model-<step>` (or
    `model.ckpt` without a step) in float32, then the `checkpoint` file naming it. With
    keep=K, only the newest K `model-*` checkpoints stay. Returns the prefix path.
    """
    if model.weight_dtype == "int8":
        raise Npgpt2Error(f"{model_dir}: cannot save an int8 model as a float32 checkpoint; "
                          f"write an int8 folder with: npgpt2 convert SRC DST --dtype int8")
    write_model_files(model, model_dir)
    return write_step_checkpoint(model_dir, model.params, step, keep)


def write_model_files(model, model_dir):
    """hparams.json, encoder.json, vocab.bpe (and compact_vocab.npy) of model into model_dir."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(model_dir / "hparams.json", "w", encoding="utf-8") as f:
        json.dump(model.hparams, f, indent=2)
    source = Path(model.source_dir or ASSETS)
    for name in ("encoder.json", "vocab.bpe", COMPACT_VOCAB_FILE):
        src = source / name
        if not src.exists():
            if name == COMPACT_VOCAB_FILE:
                continue
            src = ASSETS / name
        dst = model_dir / name
        # once per run folder: every checkpoint save rewrote (and fsynced) 1.5 MB, and failed there on a full disk
        if not dst.is_file() or not (os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)):
            with atomic_write(dst) as f, open(src, "rb") as s:
                shutil.copyfileobj(s, f)


def write_step_checkpoint(model_dir, tensors, step=None, keep=None):
    """Write tensors (as float32) as the checkpoint `model-<step>` (`model.ckpt` without a step),
    then the `checkpoint` file naming it, then prune to the newest `keep`. Returns the prefix.

    The order makes a crash at any instant harmless: the new checkpoint is complete before
    the `checkpoint` file names it, and old ones are pruned only after that, so the
    `checkpoint` file always names a complete checkpoint.
    """
    model_dir = Path(model_dir)
    name = "model.ckpt" if step is None else f"model-{step}"
    write_checkpoint(str(model_dir / name), {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})
    steps = sorted(int(p.name[6:-6]) for p in model_dir.glob("model-*.index") if p.name[6:-6].isdigit())
    pruned = []
    if keep is not None and step is not None:
        older = [s for s in steps if s != step]
        cut = max(len(older) - (keep - 1), 0)
        pruned, steps = older[:cut], older[cut:] + [step]
    names = [f"model-{s}" for s in steps] if step is not None else [name]
    write_checkpoint_state(model_dir, name, names)  # names the new, complete checkpoint
    for old in pruned:
        remove_checkpoint(model_dir, f"model-{old}")
    return str(model_dir / name)


def remove_checkpoint(model_dir, name):
    """Delete checkpoint `name` (index + data files) from model_dir, the index first: a
    half-removed checkpoint is then no longer a complete one that anything would load."""
    for f in sorted(Path(model_dir).glob(f"{name}.*"), key=lambda p: not p.name.endswith(".index")):
        f.unlink()
