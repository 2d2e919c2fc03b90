"""Hugging Face PEFT LoRA adapter folders: read one into LoraAdapters, write ours as one, merge into the base.

A PEFT LoRA folder, as `PeftModel.save_pretrained` writes it for GPT-2:

  adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...],
                               "rank_pattern": {...}, "alpha_pattern": {...}, "fan_in_fan_out": true, ...}
  adapter_model.safetensors   base_model.model.transformer.h.{i}.{target}.lora_A.weight  (r, C_in)
                              base_model.model.transformer.h.{i}.{target}.lora_B.weight  (C_out, r)
                              float32, float16 or bfloat16

The tied token embedding / output head (npgpt2's target "wte", one delta A (V, r) @ B (r, C) on the one
matrix) is, in PEFT, an Embedding LoRA on transformer.wte plus a Linear LoRA on lm_head holding the same
values, tied by `ensure_weight_tying` (peft >= 0.19; peft shares the head's tensors with the embedding's):

  base_model.model.transformer.wte.lora_embedding_A  (r, V) = A.T    .lora_embedding_B  (C, r) = B.T
  base_model.model.lm_head.lora_A.weight              (r, C) = B      .lora_B.weight     (V, r) = A

scaling alpha / r for both (PEFT's Embedding delta is lora_embedding_A.T @ lora_embedding_B.T). Reading,
the head's tensors must equal the embedding's (transposed) and have the same r and alpha: an adapter on
only one of the two (untied, the head and the lookup differing) is refused in one line, as npgpt2's
model has one tied matrix. peft's own save_pretrained of a tied adapter lists "wte" but not "lm_head" in
target_modules (ensure_weight_tying: true says the head is tied); npgpt2 writes both, which peft reloads.

GPT-2's matrices are HF `Conv1D` modules, whose weight is (C_in, C_out) like ours (`fan_in_fan_out`),
and PEFT's delta is scaling * (lora_B @ lora_A).T = scaling * lora_A.T @ lora_B.T, so
A = lora_A.weight.T (C_in, r) and B = lora_B.weight.T (r, C_out) exactly (lora.py's layout).

Which matrices a config adapts, and with which r and alpha, follows PEFT's own matching (peft 0.21):
a `target_modules` list entry matches a module name equal to it or ending in "." + it ("c_proj" is
both attn.c_proj and mlp.c_proj); a string is a regex that must match the whole name; a
`rank_pattern`/`alpha_pattern` key K matches a name when re.match(rf"(.*\\.)?({K})$", name) does, and
the first such key (in file order) wins. The names are HF's (`transformer.h.3.mlp.c_fc`); LoraConfig
keys its exceptions by module_prefix ("model/h3/mlp/c_fc").
"""
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from . import lora, quant
from .errors import Npgpt2Error
from .fsutil import atomic_write, read_json_object
from .lora import TARGETS, LoraAdapters, LoraConfig, matrix_shapes, module_prefix
from .safetensors_io import read_safetensors, write_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# base_model.model.[transformer.]h.{i}.{target}.lora_{A,B}.weight (no "transformer." when the base was GPT2Model)
TENSOR_KEY = re.compile(r"base_model\.model\.((?:transformer\.)?)h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc"
                        r"|mlp\.c_proj)\.lora_([AB])\.weight")
# the tied token embedding's two halves (WTE in lora.py): the lookup's Embedding LoRA and the head's Linear LoRA
EMBED_KEY = re.compile(r"base_model\.model\.((?:transformer\.)?)wte\.lora_embedding_([AB])")
HEAD_KEY = re.compile(r"base_model\.model\.lm_head\.lora_([AB])\.weight")
HEAD = "lm_head"
# PEFT's default targets for GPT-2 when target_modules is null (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
GPT2_DEFAULT_TARGETS = ["c_attn"]
# Config options whose adapters compute something else than x @ A @ B * alpha / r on the four matrices:
# name -> (value(s) that are fine, what npgpt2 would have to do).
UNSUPPORTED = {
    "use_dora": ((False, None), "DoRA (weight-decomposed LoRA)"),
    "use_rslora": ((False, None), "rank-stabilised scaling alpha/sqrt(r)"),
    "bias": (("none", None), "trained biases"),
    "lora_bias": ((False, None), "a bias on lora_B"),
    "modules_to_save": ((None, []), "fully trained extra modules"),
    "layer_replication": ((None, []), "replicated layers"),
    "trainable_token_indices": ((None, [], {}), "trained token embeddings"),
    "target_parameters": ((None, []), "adapters on raw parameters"),
    "alora_invocation_tokens": ((None, []), "activated LoRA (aLoRA)"),
}
# the HF names of a GPT2LMHeadModel's modules besides a block's four matrices, which a config must not target
OTHER_MODULES = ("transformer", "transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h",
                 "transformer.ln_f", "lm_head")
BLOCK_MODULES = ("", ".ln_1", ".attn", ".attn.attn_dropout", ".attn.resid_dropout", ".ln_2", ".mlp", ".mlp.act",
                 ".mlp.dropout")
# HF hub names of OpenAI's four releases, for base_model_name_or_path
HF_NAMES = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


def is_peft_dir(path):
    """True when `path` is a folder holding a PEFT adapter_config.json (read_peft_adapter says what else is wrong)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


# ---------------------------------------------------------------- reading
def read_peft_adapter(path, hparams):
    """The PEFT LoRA folder at `path` as LoraAdapters for a GPT-2 with these hparams (float32 arrays).

    Raises Npgpt2Error("<file>: what is wrong") for anything npgpt2 cannot reproduce exactly: another
    model type, DoRA, rsLoRA, biases, modules_to_save, a matrix adapted in some layers only, unknown
    tensors, wrong shapes, non-finite values.
    """
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise Npgpt2Error(f"{folder}: no such adapter folder")
    cfg = read_json_object(config_path, "not a PEFT adapter folder")
    r, alpha = _check_config(cfg, config_path)
    if not weights_path.is_file():
        other = " (adapter_model.bin is a pickle; save it with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise Npgpt2Error(f"{weights_path}: missing{other}")
    tensors, _ = read_safetensors(weights_path)
    found, hf_prefix = _sort_tensors(tensors, hparams, weights_path)

    wanted = _targeted_modules(cfg, hparams, hf_prefix, config_path)
    for i, target in sorted(wanted ^ set(found), key=str):
        has = "targets" if (i, target) in wanted else "does not target"
        raise Npgpt2Error(f"{config_path}: {has} {_hf_name(hf_prefix, i, target)} but {WEIGHTS_FILE} "
                          f"{'has no' if (i, target) in wanted else 'has'} tensors for it")
    _check_tied(cfg, found, hf_prefix, config_path, weights_path)
    targets = tuple(t for t in lora.ALL_TARGETS if any(t == tt for _, tt in found))
    for target in (t for t in targets if t != lora.WTE):
        missing = [i for i in range(hparams["n_layer"]) if (i, target) not in found]
        if missing:
            raise Npgpt2Error(f"{config_path}: adapts {target} in some layers but not in layer {missing[0]}; "
                              f"npgpt2 adapts a matrix in every layer")
    if not targets:
        raise Npgpt2Error(f"{weights_path}: holds no LoRA tensors")

    rank_pattern, alpha_pattern, params = {}, {}, {}
    shapes = matrix_shapes(hparams)
    for (i, target), ab in sorted(found.items(), key=str):
        if target == HEAD:  # the same values as wte's (checked by _check_tied)
            continue
        name = _hf_name(hf_prefix, i, target)
        r_m = _pattern_value(cfg, "rank_pattern", name, r, config_path)
        alpha_m = _pattern_value(cfg, "alpha_pattern", name, alpha, config_path)
        _check_number(r_m, f"{config_path}: rank_pattern for {name}", integer=True)
        _check_number(alpha_m, f"{config_path}: alpha_pattern for {name}")
        prefix = module_prefix(i, target)
        if r_m != r:
            rank_pattern[prefix] = int(r_m)
        if alpha_m != alpha:
            alpha_pattern[prefix] = float(alpha_m)
        c_in, c_out = shapes[target]
        for which, want in (("A", (r_m, c_in)), ("B", (c_out, r_m))):
            key, arr = ab[which]
            if tuple(arr.shape) != want:
                raise Npgpt2Error(f"{weights_path}: tensor '{key}' has shape {tuple(arr.shape)}, but r={r_m} and "
                                  f"n_embd={hparams['n_embd']}{', n_vocab=' + str(c_in) if target == lora.WTE else ''}"
                                  f" imply {want}")
            if arr.dtype.kind != "f" or not np.isfinite(arr).all():
                raise Npgpt2Error(f"{weights_path}: tensor '{key}' is {arr.dtype}"
                                  f"{' with NaN or inf values' if arr.dtype.kind == 'f' else ', not a float'}")
            params[f"{prefix}/lora_{which}"] = np.ascontiguousarray(arr.T, dtype=np.float32)  # PEFT -> ours: .T
    config = LoraConfig(r=int(r), alpha=float(alpha), targets=targets, rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern)
    return LoraAdapters(config=config, params=params)


def _hf_name(hf_prefix, layer, target):
    """HF's module name: transformer.h.3.mlp.c_fc, transformer.wte, lm_head."""
    return {lora.WTE: f"{hf_prefix}wte", HEAD: HEAD}.get(target, f"{hf_prefix}h.{layer}.{target}")


def _check_tied(cfg, found, hf_prefix, config_path, weights_path):
    """An adapter on wte must be tied: the same on the embedding and the head (see the module docstring)."""
    emb, head = found.get((None, lora.WTE)), found.get((None, HEAD))
    if emb is None and head is None:
        return
    if emb is None or head is None:
        has, lacks = (f"{hf_prefix}wte", HEAD) if head is None else (HEAD, f"{hf_prefix}wte")
        raise Npgpt2Error(f"{config_path}: adapts {has} but not {lacks} (untied); npgpt2 adapts GPT-2's tied "
                          f"embedding and output head as one matrix (target both, ensure_weight_tying=true)")
    for key in ("rank_pattern", "alpha_pattern"):
        default = cfg["r"] if key == "rank_pattern" else cfg["lora_alpha"]
        if _pattern_value(cfg, key, f"{hf_prefix}wte", default, config_path) != \
                _pattern_value(cfg, key, HEAD, default, config_path):
            raise Npgpt2Error(f"{config_path}: {key} gives {hf_prefix}wte and lm_head different values; "
                              f"npgpt2 adapts the tied matrix once")
    for (hk, h), (ek, e) in ((head["A"], emb["B"]), (head["B"], emb["A"])):
        if h.shape != e.shape[::-1] or not np.array_equal(np.asarray(h, np.float32), np.asarray(e, np.float32).T):
            raise Npgpt2Error(f"{weights_path}: '{hk}' is not '{ek}' transposed: the head's adapter differs from "
                              f"the embedding's (untied); npgpt2 adapts GPT-2's tied wte/lm_head as one matrix")


def _check_number(v, what, integer=False):
    ok = not isinstance(v, bool) and (isinstance(v, int) if integer else isinstance(v, (int, float)))
    if not ok or not math.isfinite(v) or v <= 0:
        raise Npgpt2Error(f"{what} must be a {'whole' if integer else 'finite'} number > 0, got {v!r}")


def _check_config(cfg, config_path):
    """(r, lora_alpha) of a LoRA config npgpt2 can reproduce; Npgpt2Error naming the first thing it cannot."""
    if cfg.get("peft_type") != "LORA":
        raise Npgpt2Error(f"{config_path}: peft_type is {cfg.get('peft_type')!r}; npgpt2 reads LoRA adapters "
                          f"(\"LORA\") only")
    for key, (fine, what) in UNSUPPORTED.items():
        if cfg.get(key) not in fine:
            raise Npgpt2Error(f"{config_path}: {key}={cfg[key]!r} ({what}) is not supported; npgpt2 reads "
                              f"plain LoRA adapters")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise Npgpt2Error(f"{config_path}: no {key!r}")
    _check_number(cfg["r"], f"{config_path}: r", integer=True)
    _check_number(cfg["lora_alpha"], f"{config_path}: lora_alpha")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise Npgpt2Error(f"{config_path}: {key} must be an object, got {cfg[key]!r}")
    return cfg["r"], cfg["lora_alpha"]


def _sort_tensors(tensors, hparams, weights_path):
    """{(layer, target): {"A": (key, lora_A), "B": (key, lora_B)}} and the module-name prefix
    ("transformer." or ""), refusing anything that is not one of a GPT-2 block's LoRA matrices."""
    found, prefixes = {}, set()
    for key in sorted(tensors):
        m = TENSOR_KEY.fullmatch(key)
        if m is None and (e := EMBED_KEY.fullmatch(key) or HEAD_KEY.fullmatch(key)):
            if e.re is EMBED_KEY:
                prefixes.add(e.group(1))
            found.setdefault((None, lora.WTE if e.re is EMBED_KEY else HEAD), {})[e.groups()[-1]] = (key, tensors[key])
            continue
        if not m:
            raise Npgpt2Error(f"{weights_path}: unknown tensor '{key}' (not lora_A/lora_B of a GPT-2 block's "
                              f"attn.c_attn, attn.c_proj, mlp.c_fc or mlp.c_proj: an adapter for another "
                              f"model type?)")
        prefix, layer, target, which = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if layer >= hparams["n_layer"]:
            raise Npgpt2Error(f"{weights_path}: tensor '{key}' is for layer {layer}, but the model has "
                              f"n_layer={hparams['n_layer']} (an adapter for another GPT-2 size?)")
        prefixes.add(prefix)
        found.setdefault((layer, target), {})[which] = (key, tensors[key])
    if len(prefixes) > 1:
        raise Npgpt2Error(f"{weights_path}: mixes tensor names with and without 'transformer.'")
    for (layer, target), ab in sorted(found.items(), key=str):
        for which in "AB":
            if which not in ab:
                raise Npgpt2Error(f"{weights_path}: has lora_{'B' if which == 'A' else 'A'} but no "
                                  f"lora_{which} for {_hf_name('', layer, target)}")
    return found, prefixes.pop() if prefixes else "transformer."


def _module_targeted(cfg, name, layer, config_path):
    """PEFT's check_target_module_exists for one module name (exclude_modules, target_modules, layers_to_transform)."""
    targets, exclude = cfg.get("target_modules"), cfg.get("exclude_modules")
    targets = GPT2_DEFAULT_TARGETS if targets is None else targets
    try:
        if isinstance(exclude, str) and re.fullmatch(exclude, name):
            return False
        if isinstance(exclude, list) and (name in exclude or any(name.endswith("." + e) for e in exclude)):
            return False
        if targets == "all-linear":  # every Conv1D but the output head (which is not one in GPT-2)
            return layer is not None and name.rsplit(".", 2)[-2] in ("attn", "mlp") \
                and name.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc")
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
    except re.error as e:
        raise Npgpt2Error(f"{config_path}: target_modules/exclude_modules is not a valid regex ({e})") from None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise Npgpt2Error(f"{config_path}: target_modules must be a list of names or a regex, got {targets!r}")
    if not (name in targets or any(name.endswith("." + t) for t in targets)):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    layers = [layers] if isinstance(layers, int) else layers
    return layer is not None and layer in layers


def _targeted_modules(cfg, hparams, hf_prefix, config_path):
    """{(layer, target)} the config adapts in a GPT-2 with these hparams ((None, "wte") the embedding,
    (None, "lm_head") the head: with ensure_weight_tying, adapting wte adapts the head too); refuses a
    config that targets one of GPT-2's other modules (position embedding, layer norms)."""
    wanted = set()
    names = [(n.replace("transformer.", hf_prefix, 1), None) for n in OTHER_MODULES if n != "transformer" or hf_prefix]
    for i in range(hparams["n_layer"]):
        names += [(f"{hf_prefix}h.{i}{suffix}", i) for suffix in BLOCK_MODULES]
        names += [(f"{hf_prefix}h.{i}.{t}", i) for t in TARGETS]
    for name, layer in names:
        if not _module_targeted(cfg, name, layer, config_path):
            continue
        target = name.split(".", 3 if hf_prefix else 2)[-1] if layer is not None else \
            {f"{hf_prefix}wte": lora.WTE, HEAD: HEAD}.get(name)
        if target not in TARGETS + (lora.WTE, HEAD):
            raise Npgpt2Error(f"{config_path}: target_modules matches {name}, which npgpt2 cannot adapt "
                              f"(only a block's attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, and the tied "
                              f"wte/lm_head)")
        wanted.add((layer, target))
    if (None, lora.WTE) in wanted and cfg.get("ensure_weight_tying") is True:
        wanted.add((None, HEAD))  # peft ties the head's adapter to the embedding's
    return wanted


def _pattern_value(cfg, key, name, default, config_path):
    """PEFT's get_pattern_key: the value of the first pattern whose regex matches the end of `name`."""
    for pattern, value in (cfg.get(key) or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", name):
                return value
        except re.error as e:
            raise Npgpt2Error(f"{config_path}: {key} key {pattern!r} is not a valid regex ({e})") from None
    return default


# ---------------------------------------------------------------- writing
def hf_module(prefix):
    """"model/h3/mlp/c_fc" -> "h.3.mlp.c_fc": PEFT's name for the module (a suffix of transformer.h.3.mlp.c_fc);
    "model/wte" -> "wte"."""
    if prefix == lora.module_prefix(None, lora.WTE):
        return "wte"
    m = re.fullmatch(r"model/h(\d+)/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)", prefix)
    if not m:
        raise Npgpt2Error(f"adapters: {prefix!r} is not a block's adapted matrix")
    return f"h.{m.group(1)}.{m.group(2).replace('/', '.')}"


def peft_config(adapters, base_name="gpt2"):
    """The adapter_config.json dict for these adapters (HF module names, r, alpha, patterns)."""
    cfg = adapters.config
    tied = lora.WTE in cfg.targets  # the head's adapter is the embedding's (module docstring)

    def pattern(p, kind):
        out = {hf_module(k): kind(v) for k, v in sorted(p.items())}
        return {**out, HEAD: out["wte"]} if "wte" in out else out
    return {
        "alpha_pattern": pattern(cfg.alpha_pattern, float),
        "base_model_name_or_path": base_name,
        "bias": "none",
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores (C_in, C_out)
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": float(cfg.alpha),
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(cfg.r),
        "rank_pattern": pattern(cfg.rank_pattern, int),
        "revision": None,
        # "attn.c_attn" matches transformer.h.{i}.attn.c_attn only; "wte": transformer.wte
        "target_modules": list(cfg.targets) + [HEAD] * tied,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
        **({"ensure_weight_tying": True} if tied else {}),
    }


def n_layers(adapters):
    """How many blocks the adapters cover (checking every block has an A and B of the right rank for
    each target, so a file written from them says the same as the config)."""
    cfg = adapters.config
    layers = {int(m.group(1)) for k in adapters.params if (m := re.match(r"model/h(\d+)/", k))}
    n = max(layers) + 1 if layers else 0
    modules = lora.adapted_modules(n, cfg.targets)
    want = {f"{module_prefix(i, t)}/lora_{w}" for i, t in modules for w in "AB"}
    if not modules or set(adapters.params) != want:
        extra = sorted(set(adapters.params) ^ want)
        raise Npgpt2Error(f"adapters: {'no arrays' if not want else 'array ' + repr(extra[0])} does not fit the "
                          f"config (targets {','.join(cfg.targets)} in each of {n} layers)")
    for i, t in modules:
        a, b = (adapters.params[f"{module_prefix(i, t)}/lora_{w}"] for w in "AB")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != cfg.rank(i, t) or b.shape[0] != cfg.rank(i, t):
            raise Npgpt2Error(f"adapters: {module_prefix(i, t)} has A {a.shape} and B {b.shape}, "
                              f"not rank {cfg.rank(i, t)}")
    return n


def peft_tensors(adapters):
    """{PEFT key: float32 array in PEFT's layout} for adapter_model.safetensors."""
    out = {}
    for i, t in lora.adapted_modules(n_layers(adapters), adapters.config.targets):
        for w in "AB":
            arr = np.asarray(adapters.params[f"{module_prefix(i, t)}/lora_{w}"])
            if t == lora.WTE:  # the lookup's Embedding LoRA, and the head's Linear LoRA: the same values
                out[f"base_model.model.transformer.wte.lora_embedding_{w}"] = np.ascontiguousarray(arr.T, np.float32)
                out[f"base_model.model.lm_head.lora_{'B' if w == 'A' else 'A'}.weight"] = \
                    np.ascontiguousarray(arr, np.float32)
                continue
            key = f"base_model.model.transformer.h.{i}.{t}.lora_{w}.weight"
            out[key] = np.ascontiguousarray(arr.T, dtype=np.float32)  # ours -> PEFT: .T
    return out


def write_peft_adapter(adapters, path, base_name="gpt2"):
    """Write `adapters` as a PEFT LoRA folder at `path` (which must not exist, or be empty) that
    PeftModel.from_pretrained loads onto HF's GPT2LMHeadModel. The folder is written under a
    temporary name and renamed into place, so a failure leaves nothing behind. Returns Path(path)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise Npgpt2Error(f"{path}: already exists{' and is not empty' if path.is_dir() else ''}; "
                          f"write the adapter to a new folder")
    tensors = peft_tensors(adapters)
    config = peft_config(adapters, base_name)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with atomic_write(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_safetensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        if path.exists():
            path.rmdir()  # the empty folder checked above
        os.replace(tmp, path)
    except OSError as e:
        raise Npgpt2Error(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def hf_base_name(base_dir):
    """base_model_name_or_path for a base folder: HF's name of an OpenAI release folder ("124M" -> "gpt2"),
    else the folder's path."""
    base_dir = Path(base_dir)
    return HF_NAMES.get(base_dir.name, str(base_dir))


# ---------------------------------------------------------------- merging
def merged_params(params, adapters, dtype=np.float32):
    """The base's params with every adapted matrix replaced by W + scaling * A @ B, in the base's
    (1, C_in, C_out) layout; other params are passed through (as `dtype`). The sum is formed in float64
    and rounded once. int8 weights (quant.QuantizedWeight) are dequantised first."""
    cfg = adapters.config
    out = {name: np.asarray(w, dtype=dtype) for name, w in quant.dequantize_params(params).items()}
    for i, target in lora.adapted_modules(n_layers(adapters), cfg.targets):
        prefix = module_prefix(i, target)
        name = prefix if target == lora.WTE else prefix + "/w"  # model/wte (V, C): no leading 1
        a = np.asarray(adapters.params[prefix + "/lora_A"], dtype=np.float64)  # [C_in, r]
        b = np.asarray(adapters.params[prefix + "/lora_B"], dtype=np.float64)  # [r, C_out]
        w = np.asarray(out.get(name), dtype=np.float64)  # [1, C_in, C_out], wte [V, C]
        if w.shape[-2:] != (a.shape[0], b.shape[1]) or w.ndim != (2 if target == lora.WTE else 3):
            raise Npgpt2Error(f"adapters: {prefix} is {a.shape[0]}x{b.shape[1]} but the base's "
                              f"{name} is {w.shape}")
        out[name] = (w + cfg.scaling(i, target) * (a @ b)).astype(dtype)  # the tied wte: lookup and head alike
    return out


# ---------------------------------------------------------------- npgpt2 convert --merge / --to peft
def adapter_source(src, base=None):
    """(LoraAdapters, base folder) of `src`: an npgpt2 LoRA run folder (its adapter.json names and
    checksums its base; lora.py) or a PEFT adapter folder, whose base is `base` (--base DIR)."""
    src = Path(src)
    if lora.is_run_dir(src):
        if base is not None:
            raise Npgpt2Error(f"--base: {src} is an npgpt2 LoRA run folder, which names its own base; "
                              f"leave --base out")
        adapters, _ = lora.read_run_adapters(src)
        return adapters, Path(lora.find_base(src, adapters.base))
    if is_peft_dir(src):
        if base is None:
            raise Npgpt2Error(f"--base: {src} is a PEFT adapter folder; name the model it adapts with --base DIR")
        return read_peft_adapter(src, base_hparams(base)), Path(base)
    raise Npgpt2Error(f"{src}: not a LoRA adapter folder (neither an npgpt2 run's adapter.json nor a PEFT "
                      f"adapter_config.json)")


def base_hparams(base):
    """hparams of the model at `base` (any layout convert reads, or an int8 folder), without its weights."""
    from .convert import detect_format, hparams_from_config, read_model
    from .model import read_hparams
    fmt = detect_format(base)  # a model folder or .npz, else one line
    if fmt == "npz":
        return read_model(base, fmt)[0]
    return read_hparams(base) if fmt == "tf" else hparams_from_config(Path(base) / "config.json")


def read_base(base_dir):
    """(hparams, float32 params, tokenizer files) of the base: convert.read_model's, or an int8 folder's
    (quant.json) dequantised as load_model gives it, the weights an int8-trained adapter saw."""
    from .convert import TOKENIZER_FILES, read_model
    from .model import load_model
    if not (Path(base_dir).is_dir() and quant.read_quant_info(base_dir) is not None):
        return read_model(base_dir)
    model = load_model(base_dir)  # float32: dequantised
    tok = {n: Path(base_dir) / n for n in TOKENIZER_FILES}
    return model.hparams, dict(model.params), tok if all(p.is_file() for p in tok.values()) else {}


def is_adapter_source(path):
    """Does `path` hold LoRA adapters (an npgpt2 run folder or a PEFT folder)?"""
    return Path(path).is_dir() and (lora.is_run_dir(path) or is_peft_dir(path))




def convert_adapter(src, dst, merge=False, fmt=None, base=None, force=False, dtype="float32"):
    """`npgpt2 convert <run> <out> --merge`: the base with the adapters merged in (W + alpha/r * A @ B),
    an OpenAI-layout float32 folder by default (fmt "hf"/"npz" as convert writes them, dtype "int8"
    for 8-bit weights); `--to peft`: the adapters as a PEFT folder. Nothing is written on failure."""
    from . import convert as cv
    src, dst = Path(src), Path(dst)
    if not is_adapter_source(src):
        raise Npgpt2Error(f"{src}: not a LoRA adapter folder (neither an npgpt2 run's adapter.json nor a PEFT "
                          f"adapter_config.json); --merge, --to peft and --base are for adapters")
    if merge == (fmt == "peft"):
        raise Npgpt2Error(f"{src}: holds LoRA adapters: write a full model with --merge, or a PEFT adapter "
                          f"folder with --to peft" if not merge else "--merge and --to peft: choose one")
    if quant.check_dtype(dtype) == "int8" and fmt not in (None, "tf"):
        raise Npgpt2Error(f"--dtype int8: written as a merged OpenAI-layout folder only, not --to {fmt}")
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise Npgpt2Error(f"{dst}: is the source itself; write the conversion somewhere else")
    adapters, base_dir = adapter_source(src, base)
    if merge:
        fmt = fmt or ("npz" if dst.suffix == ".npz" else "tf")
        cv._check_destination(dst, fmt, force)
        hparams, params, tok = read_base(base_dir)
        params = merged_params(params, adapters)
        write = {"tf": cv.write_int8 if dtype == "int8" else cv.write_tf, "hf": cv.write_hf}.get(fmt)
    else:
        _check_peft_destination(dst, force)
        write = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if merge and fmt == "npz":
            cv.write_npz(dst, hparams, params)
        elif merge:
            cv._write_folder(dst, lambda tmp: write(tmp, hparams, params, tok))
        else:
            cv._write_folder(dst, lambda tmp: write_peft_adapter(adapters, tmp, hf_base_name(base_dir)))
    except OSError as e:
        raise Npgpt2Error(f"{dst}: cannot write ({e.strerror or e})") from None
    return dst


def _check_peft_destination(dst, force):
    """--to peft may write into a missing or empty folder, or replace a PEFT folder with --force."""
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        return
    if not dst.is_dir():
        raise Npgpt2Error(f"{dst}: is a file; a PEFT adapter is written as a folder")
    if not force:
        raise Npgpt2Error(f"{dst}: is not empty (use --force to replace a PEFT adapter there)")
    others = sorted(e.name for e in dst.iterdir() if e.name not in (CONFIG_FILE, WEIGHTS_FILE, "README.md"))
    if others or not is_peft_dir(dst):
        raise Npgpt2Error(f"{dst}: holds {others[0] if others else 'no adapter_config.json'}, not only a PEFT "
                          f"adapter; refusing to replace it, even with --force")
