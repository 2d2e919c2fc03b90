"""GPT-2: parameters and the forward pass; init, load and save.

Parameters are kept exactly as OpenAI's checkpoint holds them (TF variable name -> array,
e.g. `model/h0/attn/c_attn/w` is (1, C, 3C)), so loading and saving need no renaming.
The layer math lives in `layers.py` (plain NumPy) and its fast twins in `kernels.py`;
`NPGPT2_PLAIN=1` in the environment runs everything on the plain path.
GPT2's other methods come from one module each: model_hooks.py (run_with_cache,
run_with_hooks), model_backward.py (forward_with_saves, backward), model_loss.py
(loss_and_grads), model_fast.py (_forward_fast); the KV cache is kv_cache.py.
"""
import contextlib
import filecmp
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from . import layers, memsave, quant
from .checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint, write_checkpoint_state
from .compact_vocab import VOCAB_FILE as COMPACT_VOCAB_FILE
from .errors import Npgpt2Error
from .fsutil import atomic_write, read_json
from .jit import ops
from .kv_cache import CacheRows, KVCache, lazy_zeros
from .linear import linear as _linear
from .model_backward import Training
from .model_fast import FastForward
from .model_hooks import BLOCK_ACTS, Hooks, _prefixed, _unchanged
from .model_loss import HEAD_ROWS, HEAD_VOCAB_BLOCK, Loss
from .param_map import ParamMap
from .quant import QuantizedWeight

# names that moved out of this module, importable from it as before
__all__ = ["ALIASES", "ASSETS", "BLOCK_ACTS", "GPT2", "CacheRows", "HEAD_ROWS", "HEAD_VOCAB_BLOCK", "KVCache",
           "MODEL_HPARAMS", "check_download_finished", "check_finite", "check_hparams", "check_tokens", "init_model",
           "lazy_zeros", "load_model", "ops", "param_shapes", "read_hparams", "remove_checkpoint",
           "resolve_model_dir", "save_model", "validate_params", "write_model_files", "write_step_checkpoint"]

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



class GPT2(Hooks, Training, Loss, FastForward):
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
        self.wte_lora = None  # (A (V, r), B (r, C), scaling) when the adapters include the tied wte (target "wte")
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

    # ------------------------------------------------------------ the forward pass, as the paper writes it
    def _trunk(self, tokens, lay, hook=None, saved=None, cache=None):
        """tokens: int (B, T) -> the residual stream after ln_f (B, T, C).

        The one forward of the model (inference, plain decoding, interpretability, training):
        embed -> n_layer blocks -> ln_f. lay: the layer module (`layers`, or `kernels`).
        hook(name, x) -> x is called at every named activation (activation_names()), its
        result used instead (lay=layers only). saved, a dict, receives what backward() needs.
        cache: a KVCache (or cache.select(rows)): tokens are the T positions after each row's
        cache.lengths[b] (rows may differ), appended to the cache; it advances by T at the end.
        """
        at = hook or _unchanged
        pos0 = 0 if cache is None else np.array(cache.lengths)  # (B,): where each row's new tokens go
        x = at("embed", self._embed(lay, tokens, pos0))  # [B, T] -> [B, T, C]
        for i, blk in enumerate(self.blocks):
            block_hook = None if hook is None else _prefixed(hook, f"h{i}.")
            # layer i's keys and values: (R, NH, n_ctx, hs) each, batch row b in cache row rows[b]
            kv = None if cache is None else (cache.k[i], cache.v[i], pos0, cache.rows)
            resid_pre = x  # [B, T, C]
            if saved is not None and saved.get("memory_saving"):
                # memory_saving keeps only the block's input: backward re-runs the block from it
                x = memsave.block_forward(self, lay, blk, x)  # [B, T, C] -> [B, T, C], no saves kept
                saved["blocks"].append({"resid_pre": resid_pre})
                continue
            x, block_saved = self._block_forward(lay, blk, x, block_hook, kv)  # [B, T, C] -> [B, T, C]
            if saved is not None:
                saved["blocks"].append(block_saved)
            del block_saved  # (inference) before the next block makes its own
        ln_f, ln_f_mean, ln_f_rstd = lay.layernorm_forward(
            x, self._params["model/ln_f/g"], self._params["model/ln_f/b"])  # [B, T, C]
        if saved is not None:
            saved.update({"resid_final": x, "ln_f": ln_f, "ln_f.mean": ln_f_mean, "ln_f.rstd": ln_f_rstd})
        if cache is not None:  # only now: an interrupted forward leaves the cache's lengths as they were
            cache.advance(tokens.shape[1])
        return at("ln_f", ln_f)

    def _embed(self, lay, tokens, pos0=0):
        """tokens (B, T) -> wte[tokens] + wpe[positions] (B, T, C); with a LoRA adapter on the tied
        wte (self.wte_lora), its adapted rows (layers.lora_embedding_forward)."""
        wte, wpe = self._params["model/wte"], self._params["model/wpe"]
        if self.wte_lora is None:
            return lay.embedding_forward(wte, wpe, tokens, pos0)
        return lay.lora_embedding_forward(wte, wpe, tokens, *self.wte_lora, pos0)

    def _block_forward(self, lay, blk, x, hook=None, kv=None):
        """One transformer block: x (B, T, C) -> (x (B, T, C), what its backward needs).

        Pre-norm, as GPT-2: x + attn(ln_1(x)), then that + mlp(ln_2(that)).
        kv: None, or (k_cache, v_cache, pos0, rows) of this layer when decoding (see _trunk):
        attention then writes the new keys and values at positions pos0[b].. of cache row
        rows[b] and attends to that row's positions 0..pos0[b]+t (attention_forward_cached).
        """
        at = hook or _unchanged
        NH = self.hparams["n_head"]
        lora_h = {}  # with LoRA adapters: each adapted matrix's x @ A (see _linear)
        # attention: every position mixes in the values of the positions it attends to
        ln_1, _, _ = lay.layernorm_forward(x, blk["ln_1/g"], blk["ln_1/b"])  # [B, T, C]
        ln_1 = at("ln_1", ln_1)
        qkv = _linear(lay, blk, "attn/c_attn", ln_1, lora_h)  # [B, T, C] -> [B, T, 3C]
        if kv is not None:  # decoding: the earlier positions' keys and values come from the cache
            k_cache, v_cache, pos0, rows = kv
            z, att = lay.attention_forward_cached(qkv, k_cache, v_cache, pos0, NH, rows), None  # [B, T, C]
        elif hook is None:
            z, att = lay.attention_forward(qkv, NH)  # [B, T, 3C] -> [B, T, C], what attention_backward needs
        else:
            z, att = layers.attention_forward(qkv, NH, hook=_prefixed(hook, "attn."))  # the same, hooked
        z = at("attn.z", z)  # [B, T, C]: the NH heads' outputs side by side
        attn_out = _linear(lay, blk, "attn/c_proj", z, lora_h)  # [B, T, C] -> [B, T, C]
        attn_out = at("attn.out", attn_out)
        resid_mid = at("resid_mid", x + attn_out)  # [B, T, C]
        # MLP: each position on its own, through 4C hidden units
        ln_2, _, _ = lay.layernorm_forward(resid_mid, blk["ln_2/g"], blk["ln_2/b"])  # [B, T, C]
        ln_2 = at("ln_2", ln_2)
        mlp_pre = _linear(lay, blk, "mlp/c_fc", ln_2, lora_h)  # [B, T, C] -> [B, T, 4C]
        mlp_pre = at("mlp.pre", mlp_pre)
        mlp_post = at("mlp.post", lay.gelu_forward(mlp_pre))  # [B, T, 4C]
        mlp_out = _linear(lay, blk, "mlp/c_proj", mlp_post, lora_h)  # [B, T, 4C] -> [B, T, C]
        mlp_out = at("mlp.out", mlp_out)
        resid_post = at("resid_post", resid_mid + mlp_out)  # [B, T, C]
        # what the backward needs that it cannot cheaply recompute (see forward_with_saves)
        saved = {"resid_pre": x, "attn.qkv": qkv, "attn.att": att, "attn.z": z, "resid_mid": resid_mid,
                 "mlp.pre": mlp_pre}
        if self.lora is not None:  # the base is frozen: the backward needs only the adapters' h
            saved["lora.h"] = lora_h
        return resid_post, saved

    def _head(self, x, fast=False):
        """x: (..., C) after ln_f, usually (B, T, C) -> logits (..., V); the output head is the
        token embedding. fast (the kernels' decoding, model_fast.py): few rows go through the
        decode GEMVs, an int8 head with its activations quantised too; otherwise the product is
        exact in x."""
        wte = self._params["model/wte"]
        lead, C = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, C)  # [N, C]: one GEMM over all rows; NumPy's matmul of (B, T, C) would
        # make one per batch row, each reading all of wte (at T = 1, batched decoding, B times the traffic)
        if self.wte_lora is not None:  # a LoRA adapter on the tied wte: the frozen head + its low-rank part
            logits = layers.lora_head_forward(x, wte, *self.wte_lora)[0]  # [N, C] -> [N, V]
        elif isinstance(wte, QuantizedWeight) and ops() is not layers:  # int8: the dequantising GEMV
            from .quant_kernels import float_activations, matmul_forward
            with contextlib.nullcontext() if fast else float_activations():
                logits = matmul_forward(x, wte.T, None)  # [N, C] -> [N, V]
        elif fast and x.shape[0] <= 8 and wte.dtype == np.float32:  # 8: gemv.MAX_ROWS
            # decoding: gemv.py reads each wte row once for all rows, on 2 cores when one is free
            # (imported here: it needs Numba, which the plain path must not)
            from . import gemv
            logits = gemv.matmul_rows(x, wte.T)  # [N, C] -> [N, V]
        else:
            logits = x @ wte.T  # [N, C] @ [C, V] -> [N, V]
        return logits.reshape(lead + (-1,))  # [..., V]

    # ------------------------------------------------------------ inference
    def forward(self, tokens, cache=None, last_only=False):
        """tokens: int (B, T) -> logits (B, T, V); with last_only, (B, 1, V).

        With a cache, tokens are the next T positions after cache.length, and the cache
        is extended by them. last_only skips the output head for positions whose logits
        nobody reads (prompt prefill).
        """
        tokens = self._check_tokens(tokens, int(cache.lengths.max()) if cache is not None else 0)
        lay = ops()
        if lay is layers:
            # the readable path (NPGPT2_PLAIN=1): embed -> blocks (attention with the KV cache
            # when decoding) -> ln_f, the code run_with_cache and training run
            x = self._trunk(tokens, layers, cache=cache)  # [B, T] -> [B, T, C]
            return self._head(x[:, -1:] if last_only else x)  # [B, T, C] -> [B, T, V]
        return self._forward_fast(lay, tokens, cache, last_only)

    def _check_tokens(self, tokens, pos0=0, error=ValueError):
        return check_tokens(tokens, self.hparams, pos0, error)


def check_tokens(tokens, hparams, pos0=0, error=ValueError):
    """tokens as an int (B, T) array, or `error` saying what is wrong with them (positions pos0..
    must fit n_ctx; with error=Npgpt2Error, the learner-facing calls, also ids in [0, n_vocab))."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise error(f"tokens: expected token ids of shape (B, T), got shape {tokens.shape} dtype {tokens.dtype}")
    if pos0 + tokens.shape[1] > hparams["n_ctx"]:
        raise error(f"tokens: {pos0 + tokens.shape[1]} positions exceed the context n_ctx={hparams['n_ctx']}")
    if error is Npgpt2Error:  # the learner-facing calls: a negative id would silently wrap around
        V = hparams["n_vocab"]
        if tokens.size == 0:
            raise error(f"tokens: empty (shape {tokens.shape})")
        if tokens.min() < 0 or tokens.max() >= V:
            raise error(f"tokens: ids must be in [0, {V}), got {int(tokens.min())}..{int(tokens.max())}")
    return tokens


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
        # the crc pass has read every byte already; the finite check reads them once more (int8:
        # each mapped tensor just before it is quantised and its pages given back)
        if int8:
            params = quant.quantize_params(params, check=(lambda name, w: check_finite({name: w}, prefix))
                                           if verify else None)
        elif verify:
            check_finite(params, prefix)
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
