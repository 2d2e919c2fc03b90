"""GPT-2: parameters, forward pass, loss and gradients, KV cache; load, init and save.

Parameters are kept exactly as OpenAI's checkpoint holds them (TF variable name -> array,
e.g. `model/h0/attn/c_attn/w` is (1, C, 3C)), so loading and saving need no renaming.
The layer math lives in `layers.py` (plain NumPy) and its fast twins in `kernels.py`;
`NPGPT2_PLAIN=1` in the environment runs everything on the plain path.
"""
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from . import layers
from .checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint, write_checkpoint_state
from .errors import Npgpt2Error
from .fsutil import atomic_write, read_json

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
    """The layer implementations in use: Numba kernels, or plain NumPy with NPGPT2_PLAIN=1."""
    if os.environ.get("NPGPT2_PLAIN", "") not in ("", "0"):
        return layers
    from . import kernels
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


# ---------------------------------------------------------------- the model
class KVCache:
    """Keys and values of every layer for positions 0..length-1, preallocated to n_ctx.

    k, v: (n_layer, B, NH, n_ctx, hs). Decoding one token writes one row; nothing is
    reallocated.
    """

    def __init__(self, hparams, batch_size, dtype):
        L, NH, C, T = (hparams[k] for k in ("n_layer", "n_head", "n_embd", "n_ctx"))
        shape = (L, batch_size, NH, T, C // NH)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.length = 0

    def truncate(self, length):
        """Forget positions >= length (they are overwritten by the next forward)."""
        self.length = min(self.length, length)


class GPT2:
    """GPT-2 with its parameters in OpenAI's layout.

    hparams: dict n_vocab, n_ctx, n_embd, n_head, n_layer.
    params: {TF variable name: ndarray}; see param_shapes().
    """

    def __init__(self, hparams, params, dtype=np.float32):
        check_hparams(hparams)
        self.hparams = dict(hparams)
        self.dtype = np.dtype(dtype)
        self.params = {k: np.asarray(v) if v.dtype == self.dtype else v.astype(self.dtype)
                       for k, v in params.items()}
        self.source_dir = None  # the folder it was loaded from (for encoder.json etc.)

    def _blocks(self):
        """Per layer, its parameters with the (1, C, OC) conv weights as (C, OC) views.

        Built once per set of parameter arrays (decoding would otherwise rebuild them every
        token); the views see in-place updates, and replacing an array rebuilds them.
        """
        key = tuple(map(id, self.params.values()))
        if getattr(self, "_blocks_key", None) != key:
            self._block_list = [self._block_views(i) for i in range(self.hparams["n_layer"])]
            self._blocks_key = key
        return self._block_list

    def _block_views(self, i):
        h = f"model/h{i}/"
        return {k[len(h):]: (v[0] if v.ndim == 3 else v)
                for k, v in self.params.items() if k.startswith(h)}

    def new_cache(self, batch_size=1):
        return KVCache(self.hparams, batch_size, self.dtype)

    # ------------------------------------------------------------ inference
    def forward(self, tokens, cache=None, last_only=False):
        """tokens: int (B, T) -> logits (B, T, V); with last_only, (B, 1, V).

        With a cache, tokens are the next T positions after cache.length, and the cache
        is extended by them. last_only skips the output head for positions whose logits
        nobody reads (prompt prefill).
        """
        K = ops()
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tokens.shape}")
        B, T = tokens.shape
        pos0 = cache.length if cache is not None else 0
        if pos0 + T > self.hparams["n_ctx"]:
            raise ValueError(f"{pos0 + T} positions exceed the context n_ctx={self.hparams['n_ctx']}")
        NH, p = self.hparams["n_head"], self.params
        # x is a fresh array: the residual additions below go into it in place
        x = K.encoder_forward(p["model/wte"], p["model/wpe"], tokens, pos0)
        L = self.hparams["n_layer"]
        for i, P in enumerate(self._blocks()):
            a, _, _ = K.layernorm_forward(x, P["ln_1/g"], P["ln_1/b"])
            qkv = K.matmul_forward(a, P["attn/c_attn/w"], P["attn/c_attn/b"])
            if cache is None:
                # a throwaway cache for this layer: the same result as attention_forward
                # without keeping its (B, NH, T, T) probabilities, which only training needs
                kv = np.empty((2, B, NH, T, qkv.shape[-1] // 3 // NH), dtype=qkv.dtype)
                k_cache, v_cache, p0 = kv[0], kv[1], 0
            else:
                k_cache, v_cache, p0 = cache.k[i], cache.v[i], pos0
            if last_only and i == L - 1 and T > 1:
                # only the last position's output is read: the others give the last layer
                # keys and values, but their attention, MLP and residual rows are skipped
                k, v = (layers.split_heads(t, NH) for t in np.split(qkv[:, :-1], 3, axis=-1)[1:])
                k_cache[:, :, p0:p0 + T - 1] = k
                v_cache[:, :, p0:p0 + T - 1] = v
                qkv, x, p0 = qkv[:, -1:], x[:, -1:], p0 + T - 1
            a = K.attention_forward_cached(qkv, k_cache, v_cache, p0, NH)
            x += K.matmul_forward(a, P["attn/c_proj/w"], P["attn/c_proj/b"])
            m, _, _ = K.layernorm_forward(x, P["ln_2/g"], P["ln_2/b"])
            m = K.gelu_forward(K.matmul_forward(m, P["mlp/c_fc/w"], P["mlp/c_fc/b"]))
            x += K.matmul_forward(m, P["mlp/c_proj/w"], P["mlp/c_proj/b"])
        if cache is not None:
            cache.length = pos0 + T
        if last_only:
            x = x[:, -1:]
        x, _, _ = K.layernorm_forward(x, p["model/ln_f/g"], p["model/ln_f/b"])
        return x @ p["model/wte"].T  # the output head shares the token embedding

    # ------------------------------------------------------------ training
    def loss_and_grads(self, inputs, targets):
        """inputs, targets: int (B, T) -> (mean cross-entropy, grads).

        grads has the same keys and shapes as params; the tied model/wte gets both the
        embedding's and the output head's contribution.
        """
        K = ops()
        inputs, targets = np.asarray(inputs), np.asarray(targets)
        B, T = inputs.shape
        V, C, NH, L = (self.hparams[k] for k in ("n_vocab", "n_embd", "n_head", "n_layer"))
        p = self.params
        # forward, keeping what each backward needs
        acts = []
        x = K.encoder_forward(p["model/wte"], p["model/wpe"], inputs)
        for P in self._blocks():
            a = {"x": x}
            a["ln1"], a["ln1_mean"], a["ln1_rstd"] = K.layernorm_forward(x, P["ln_1/g"], P["ln_1/b"])
            a["qkv"] = K.matmul_forward(a["ln1"], P["attn/c_attn/w"], P["attn/c_attn/b"])
            a["atty"], a["att"] = K.attention_forward(a["qkv"], NH)
            a["x2"] = x + K.matmul_forward(a["atty"], P["attn/c_proj/w"], P["attn/c_proj/b"])
            a["ln2"], a["ln2_mean"], a["ln2_rstd"] = K.layernorm_forward(a["x2"], P["ln_2/g"], P["ln_2/b"])
            a["fch"] = K.matmul_forward(a["ln2"], P["mlp/c_fc/w"], P["mlp/c_fc/b"])
            a["fch_gelu"] = K.gelu_forward(a["fch"])
            x = a["x2"] + K.matmul_forward(a["fch_gelu"], P["mlp/c_proj/w"], P["mlp/c_proj/b"])
            acts.append(a)
        lnf, lnf_mean, lnf_rstd = K.layernorm_forward(x, p["model/ln_f/g"], p["model/ln_f/b"])
        logits = lnf @ p["model/wte"].T
        losses, probs = K.crossentropy_forward(logits, targets)
        del logits
        loss = float(losses.mean())

        # backward
        g = {}
        dlosses = np.full((B, T), 1.0 / (B * T), dtype=self.dtype)
        dlogits = K.crossentropy_softmax_backward(dlosses, probs, targets)
        del probs
        dwte_head = dlogits.reshape(-1, V).T @ lnf.reshape(-1, C)
        dlnf = dlogits @ p["model/wte"]
        del dlogits
        dx, g["model/ln_f/g"], g["model/ln_f/b"] = K.layernorm_backward(
            dlnf, x, p["model/ln_f/g"], lnf_mean, lnf_rstd)
        for i in reversed(range(L)):
            P, a, h = self._blocks()[i], acts.pop(), f"model/h{i}/"
            # the residual stream dx flows into the MLP branch and past it
            dfch_gelu, dw, g[h + "mlp/c_proj/b"] = K.matmul_backward(dx, a["fch_gelu"], P["mlp/c_proj/w"])
            g[h + "mlp/c_proj/w"] = dw[None]
            dfch = K.gelu_backward(dfch_gelu, a["fch"])
            dln2, dw, g[h + "mlp/c_fc/b"] = K.matmul_backward(dfch, a["ln2"], P["mlp/c_fc/w"])
            g[h + "mlp/c_fc/w"] = dw[None]
            dx2, g[h + "ln_2/g"], g[h + "ln_2/b"] = K.layernorm_backward(
                dln2, a["x2"], P["ln_2/g"], a["ln2_mean"], a["ln2_rstd"])
            dx = dx + dx2
            # then into the attention branch and past it
            datty, dw, g[h + "attn/c_proj/b"] = K.matmul_backward(dx, a["atty"], P["attn/c_proj/w"])
            g[h + "attn/c_proj/w"] = dw[None]
            dqkv = K.attention_backward(datty, a["qkv"], a["att"], NH)
            dln1, dw, g[h + "attn/c_attn/b"] = K.matmul_backward(dqkv, a["ln1"], P["attn/c_attn/w"])
            g[h + "attn/c_attn/w"] = dw[None]
            dx1, g[h + "ln_1/g"], g[h + "ln_1/b"] = K.layernorm_backward(
                dln1, a["x"], P["ln_1/g"], a["ln1_mean"], a["ln1_rstd"])
            dx = dx + dx1
        dwte, g["model/wpe"] = K.encoder_backward(dx, inputs, V, self.hparams["n_ctx"])
        dwte += dwte_head  # in place: a third (V, C) array would cost 154 MB at 124M
        g["model/wte"] = dwte
        return loss, {k: g[k] for k in p}


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


def load_model(model_dir, dtype=np.float32, verify=True, mmap=False):
    """Load an OpenAI-layout model folder (hparams.json + TF checkpoint) as a GPT2.

    verify checks every tensor's crc32c. mmap maps the checkpoint's data file instead of
    reading it (float32 only), so a 1558M model is paged in on demand, not copied.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise Npgpt2Error(f"{model_dir}: model folder not found")
    check_download_finished(model_dir)
    hparams = read_hparams(model_dir)
    prefix = latest_checkpoint(model_dir)
    params = read_checkpoint(prefix, verify=verify, mmap=mmap)
    validate_params(hparams, params, f"{prefix}.index")
    params = {k: params[k] for k in param_shapes(hparams)}  # drop optimizer slots etc.
    model = GPT2(hparams, params, dtype)
    model.source_dir = model_dir
    return model


def save_model(model, model_dir, step=None, keep=None):
    """Write model as an OpenAI-layout folder that load_model (and TF tools) can read.

    Writes hparams.json, encoder.json, vocab.bpe, the checkpoint `model-<step>` (or
    `model.ckpt` without a step) in float32, then the `checkpoint` file naming it. With
    keep=K, only the newest K `model-*` checkpoints stay. Returns the prefix path.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(model_dir / "hparams.json", "w", encoding="utf-8") as f:
        json.dump(model.hparams, f, indent=2)
    for name in ("encoder.json", "vocab.bpe"):
        src = Path(model.source_dir or ASSETS) / name
        if not src.exists():
            src = ASSETS / name
        dst = model_dir / name
        if not dst.exists() or not os.path.samefile(src, dst):
            with atomic_write(dst) as f, open(src, "rb") as s:
                shutil.copyfileobj(s, f)
    name = "model.ckpt" if step is None else f"model-{step}"
    write_checkpoint(str(model_dir / name), {k: np.asarray(v, dtype=np.float32) for k, v in model.params.items()})
    steps = sorted(int(p.name[6:-6]) for p in model_dir.glob("model-*.index") if p.name[6:-6].isdigit())
    if keep is not None and step is not None:
        for old in steps[:-keep]:
            for f in model_dir.glob(f"model-{old}.*"):
                f.unlink()
        steps = steps[-keep:]
    names = [f"model-{s}" for s in steps] if step is not None else [name]
    write_checkpoint_state(model_dir, name, names)
    return str(model_dir / name)
