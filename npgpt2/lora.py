"""LoRA adapters: low-rank updates to a frozen GPT-2's matrices (Hu et al. 2021).

A target matrix W (C_in, C_out) of a block (one of TARGETS) is used as

    y = x @ W + b + scaling * (x @ A) @ B        A: (C_in, r), B: (r, C_out), scaling = alpha / r

W and b stay frozen; only A and B are trained. A starts random and B at zero, so the
adapted model starts equal to the base. Parameter names follow the base's TF names:
`model/h{i}/attn/c_attn/lora_A` (C, r) and `model/h{i}/attn/c_attn/lora_B` (r, 3C).

Hugging Face PEFT stores the same two matrices transposed (`lora_A.weight` (r, C_in),
`lora_B.weight` (C_out, r), GPT-2's Conv1D with fan_in_fan_out): A = lora_A.weight.T,
B = lora_B.weight.T (adapter_files.py reads and writes that layout).

A model with adapters (`attach(model, adapters)`; `model.lora`) runs layers.lora_forward /
lora_backward for the adapted matrices; its base weights are frozen (float32, or int8 from
`load_model(dtype="int8")`), so training computes and updates the adapters alone.

The run folder of `npgpt2 train --lora R` holds the adapters, not the base:

    adapter.json            {"format": "npgpt2-lora", "version": 1, "base": {"path", "relative",
                             "checksum"}, "r", "alpha", "targets", "rank_pattern", "alpha_pattern",
                             "dtype"}: the base's folder (absolute, and relative to the run folder)
                             and a checksum of its checkpoint (base_checksum), the adapters' shape,
                             and the base dtype they were trained on
    model-<step>.index/.data-*   the adapter arrays (TF checkpoint, names as above), the
                             `checkpoint` file and train_state-<step>.npz exactly as a full run's
    hparams.json, encoder.json, vocab.bpe   the base's, so the folder loads like a model folder
"""
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from .errors import Npgpt2Error
from .fsutil import atomic_write, read_json

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.json"
FORMAT = "npgpt2-lora"

# a block's four matrices, as `--lora_targets` names them (the default)
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# the tied token embedding / output head (V, C), one matrix for the whole model: one adapter,
# W + scaling * A @ B with A (V, r), B (r, C), used by the lookup and the head alike
WTE = "wte"
ALL_TARGETS = TARGETS + (WTE,)


def module_prefix(layer, target):
    """(3, "attn.c_attn") -> "model/h3/attn/c_attn": the TF name of the module whose /w is adapted;
    (None, "wte") -> "model/wte" (the model's one token embedding)."""
    if target == WTE:
        return "model/wte"
    return f"model/h{layer}/{target.replace('.', '/')}"


def adapted_modules(n_layer, targets):
    """[(layer, target)] of every adapted matrix: the block targets in each layer, then (None, "wte")."""
    return [(i, t) for i in range(n_layer) for t in targets if t != WTE] + [(None, WTE)] * (WTE in targets)


@dataclasses.dataclass
class LoraConfig:
    """r and alpha of every adapted matrix.

    targets: which of TARGETS carry adapters (in every layer). rank_pattern / alpha_pattern:
    exceptions keyed by module_prefix(layer, target), as PEFT's patterns resolve to.
    """
    r: int
    alpha: float
    targets: tuple = TARGETS
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    def rank(self, layer, target):
        return int(self.rank_pattern.get(module_prefix(layer, target), self.r))

    def scaling(self, layer, target):
        """alpha / r for this matrix (PEFT's `scaling`)."""
        return float(self.alpha_pattern.get(module_prefix(layer, target), self.alpha)) / self.rank(layer, target)

    def check(self):
        """Raise Npgpt2Error naming the flag for a rank, alpha or target out of range."""
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r < 1:
            raise Npgpt2Error(f"--lora must be a whole number >= 1, got {self.r!r}")
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise Npgpt2Error(f"--lora_alpha must be a finite number > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets:
            raise Npgpt2Error(f"--lora_targets: unknown target {unknown[0] if unknown else '(none given)'!r}; "
                              f"choose from {','.join(ALL_TARGETS)}")


@dataclasses.dataclass
class LoraAdapters:
    """A LoraConfig and its arrays {module_prefix + "/lora_A": (C_in, r), ... "/lora_B": (r, C_out)}.

    base: {"path", "relative", "checksum"} of the base model they belong to (adapter.json's),
    or None when unknown (a PEFT folder names its base by a Hub id only).
    """
    config: LoraConfig
    params: dict
    base: dict = None


def parse_targets(text, flag="--lora_targets"):
    """"attn.c_attn, mlp.c_fc, wte" -> ("attn.c_attn", "mlp.c_fc", "wte") in ALL_TARGETS' order;
    unknown -> Npgpt2Error."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    for t in names:
        if t not in ALL_TARGETS:
            raise Npgpt2Error(f"{flag}: unknown target {t!r}; choose from {','.join(ALL_TARGETS)}")
    if not names:
        raise Npgpt2Error(f"{flag}: no target given; choose from {','.join(ALL_TARGETS)}")
    return tuple(t for t in ALL_TARGETS if t in names)


def config_from_train(cfg):
    """The LoraConfig that TrainConfig's lora, lora_alpha (None = 2 * lora) and lora_targets ask for."""
    r = cfg.lora
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    alpha = 2 * r if cfg.lora_alpha is None else cfg.lora_alpha
    config = LoraConfig(r=r, alpha=alpha, targets=parse_targets(cfg.lora_targets))
    config.check()
    return config


def check_train_flags(cfg):
    """The LoRA flags of a TrainConfig, checked before anything is loaded or written."""
    if cfg.dtype not in ("float32", "int8"):
        raise Npgpt2Error(f"--dtype: unknown dtype {cfg.dtype!r} (choose float32 or int8)")
    if not cfg.lora:
        if cfg.dtype == "int8":
            raise Npgpt2Error("--dtype int8: an 8-bit model trains only as a frozen base under LoRA "
                              "adapters; add --lora R (e.g. --lora 8)")
        if cfg.lora_alpha is not None:
            raise Npgpt2Error("--lora_alpha: give --lora R too")
        return
    if cfg.only_train_transformer_layers:
        raise Npgpt2Error("--only_train_transformer_layers: with --lora only the adapters train; "
                          "give one or the other")
    config_from_train(cfg)


# ---------------------------------------------------------------- the arrays
def matrix_shapes(hparams):
    """{target: (C_in, C_out)} of a block's four matrices and of wte ((V, C): its "input" is a token's one-hot)."""
    C = hparams["n_embd"]
    return {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C),
            WTE: (hparams["n_vocab"], C)}


def init_adapters(hparams, config, seed=0, dtype=np.float32):
    """Fresh adapters for every layer's config.targets, as PEFT initialises them: A uniform in
    +-1/sqrt(C_in) (kaiming_uniform with a=sqrt(5)), B zero, so the model starts as its base;
    wte as PEFT's Embedding LoRA: A zero, B standard normal (the product is zero all the same)."""
    config.check()
    rng = np.random.default_rng(seed)
    shapes = matrix_shapes(hparams)
    params = {}
    for i, target in adapted_modules(hparams["n_layer"], config.targets):
        c_in, c_out = shapes[target]
        r, bound = config.rank(i, target), 1.0 / np.sqrt(c_in)
        name = module_prefix(i, target)
        if target == WTE:
            params[name + "/lora_A"] = np.zeros((c_in, r), dtype=dtype)
            params[name + "/lora_B"] = rng.standard_normal((r, c_out)).astype(dtype)
        else:
            params[name + "/lora_A"] = rng.uniform(-bound, bound, (c_in, r)).astype(dtype)
            params[name + "/lora_B"] = np.zeros((r, c_out), dtype=dtype)
    return LoraAdapters(config, params)


def attach(model, adapters, source="adapters"):
    """Give model these adapters (model.lora): their arrays, cast to the model's float dtype,
    join each block's views (`attn/c_attn/lora_A`, `/lora_B`, `/lora_scaling`), where
    model._block_forward and its backward find them (the wte target: model.wte_lora). Raises
    Npgpt2Error naming `source` when an array is missing or does not fit its matrix."""
    dtype = np.float32 if model.weight_dtype == "int8" else model.dtype
    config = adapters.config
    modules = adapted_modules(len(model.blocks), config.targets)
    expected = {f"{module_prefix(i, t)}/{leaf}" for i, t in modules for leaf in ("lora_A", "lora_B")}
    extra = sorted(set(adapters.params) - expected)
    if extra:
        raise Npgpt2Error(f"{source}: adapter tensor '{extra[0]}' belongs to no adapted matrix of this model "
                          f"(targets {','.join(config.targets)}, {len(model.blocks)} layers)")
    arrays = {}  # everything is checked before the model changes: a refusal leaves it as it was
    for i, target in modules:
        name, r = module_prefix(i, target), config.rank(i, target)
        c_in, c_out = (model._params["model/wte"] if target == WTE
                       else model.blocks[i][target.replace(".", "/") + "/w"]).shape
        for leaf, shape in (("lora_A", (c_in, r)), ("lora_B", (r, c_out))):
            a = adapters.params.get(f"{name}/{leaf}")
            if a is None or tuple(a.shape) != shape:
                got = "missing" if a is None else f"shape {tuple(a.shape)}"
                raise Npgpt2Error(f"{source}: adapter tensor '{name}/{leaf}' is {got}, expected {shape}")
            a = np.ascontiguousarray(a, dtype=dtype)
            if not a.flags.writeable:  # e.g. read from a memory map: the optimizer updates it in place
                a = a.copy()
            arrays[f"{name}/{leaf}"] = a
    adapters.params.update(arrays)
    for blk in model.blocks:
        for key in [k for k in blk if "/lora_" in k]:  # adapters attached before (other targets) go
            del blk[key]
    for i, target in modules:
        if target == WTE:
            continue
        short, name, blk = target.replace(".", "/"), module_prefix(i, target), model.blocks[i]
        blk[short + "/lora_A"], blk[short + "/lora_B"] = arrays[name + "/lora_A"], arrays[name + "/lora_B"]
        blk[short + "/lora_scaling"] = config.scaling(i, target)
    model.wte_lora = None if WTE not in config.targets else (  # GPT2._embed and _head use it
        arrays["model/wte/lora_A"], arrays["model/wte/lora_B"], config.scaling(None, WTE))
    model.lora = adapters
    return model


# ---------------------------------------------------------------- the base a run belongs to
def base_checksum(base_dir):
    """"sha256:<hex of the checkpoint's .index>:<bytes of its data files>" of the checkpoint
    base_dir loads. The index holds every tensor's crc32c, so it changes with any weight;
    reading it (and the data files' sizes) is cheap even for 1558M."""
    from .checkpoint import latest_checkpoint
    prefix = Path(latest_checkpoint(base_dir))
    index = Path(str(prefix) + ".index")
    try:
        digest = hashlib.sha256(index.read_bytes()).hexdigest()
        size = sum(p.stat().st_size for p in prefix.parent.glob(prefix.name + ".data-*"))
    except OSError as e:
        raise Npgpt2Error(f"{index}: cannot read ({e.strerror or e})") from None
    return f"sha256:{digest}:{size}"


def base_record(base_dir):
    """What adapter.json says of the base: {"path", "relative" (filled in when saved), "checksum"}."""
    return {"path": str(Path(base_dir).resolve()), "relative": None, "checksum": base_checksum(base_dir)}


def is_run_dir(path):
    """Does this folder hold npgpt2 LoRA adapters (an adapter.json)?"""
    return (Path(path) / ADAPTER_FILE).is_file()


def read_adapter_info(run_dir):
    """adapter.json of a LoRA run folder, checked; -> (LoraConfig, base dict, dtype)."""
    path = Path(run_dir) / ADAPTER_FILE
    info = read_json(path)
    try:
        if info["format"] != FORMAT or info["version"] != 1:
            raise ValueError
        base = info["base"]
        if not isinstance(base, dict) or not isinstance(base["path"], str) or not isinstance(base["checksum"], str):
            raise ValueError
        config = LoraConfig(r=info["r"], alpha=float(info["alpha"]), targets=tuple(info["targets"]),
                            rank_pattern=dict(info.get("rank_pattern") or {}),
                            alpha_pattern=dict(info.get("alpha_pattern") or {}))
        config.check()
    except (KeyError, TypeError, ValueError, Npgpt2Error):
        raise Npgpt2Error(f"{path}: not an {FORMAT} version 1 description (see lora.py)") from None
    return config, base, str(info.get("dtype", "float32"))


def find_base(run_dir, base):
    """The base folder adapter.json names, checked against its checksum; Npgpt2Error in one line
    when it is missing or its checkpoint is not the one the adapters were trained on."""
    where = Path(run_dir) / ADAPTER_FILE
    folder = Path(base["path"])
    if not folder.is_dir() and base.get("relative"):  # the run and its base moved together
        folder = Path(run_dir) / base["relative"]
    if not folder.is_dir():
        raise Npgpt2Error(f"{where}: its base model {base['path']} is missing (the adapters only work on "
                          f"the model they were trained on)")
    if base_checksum(folder) != base["checksum"]:
        raise Npgpt2Error(f"{where}: the base model {folder} is not the one the adapters were trained on "
                          f"(its checkpoint's checksum differs)")
    return folder


# ---------------------------------------------------------------- the run folder
def save_adapters(model, run_dir, step=None, keep=None):
    """train.save_run's save_model for a model with adapters: the base's hparams and tokenizer
    files, adapter.json, then the adapters as checkpoint `model-<step>` with the same
    write / `checkpoint` file / prune order as save_model (model.write_step_checkpoint)."""
    from .model import write_model_files, write_step_checkpoint
    adapters = model.lora
    run_dir = Path(run_dir)
    write_model_files(model, run_dir)
    base = dict(adapters.base)
    base["relative"] = os.path.relpath(base["path"], run_dir.resolve())
    c = adapters.config
    info = {"format": FORMAT, "version": 1, "base": base, "r": int(c.r), "alpha": float(c.alpha),
            "targets": list(c.targets), "rank_pattern": c.rank_pattern, "alpha_pattern": c.alpha_pattern,
            "dtype": model.weight_dtype}
    with atomic_write(run_dir / ADAPTER_FILE, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return write_step_checkpoint(run_dir, adapters.params, step, keep)


def read_run_adapters(run_dir):
    """The adapters of a LoRA run folder (its newest checkpoint), their base record, and the
    dtype of the base they were trained on."""
    from .checkpoint import latest_checkpoint, read_checkpoint
    config, base, dtype = read_adapter_info(run_dir)
    params = read_checkpoint(latest_checkpoint(run_dir))
    return LoraAdapters(config, dict(params), base), dtype


def load_adapters(path, hparams):
    """LoraAdapters from a folder: an npgpt2 LoRA run folder (adapter.json) or a Hugging Face
    PEFT folder (adapter_config.json; adapter_files.read_peft_adapter)."""
    path = Path(path)
    if not path.is_dir():
        raise Npgpt2Error(f"{path}: adapter folder not found (--adapter)")
    if is_run_dir(path):
        return read_run_adapters(path)[0]
    from . import adapter_files  # the Hugging Face PEFT reader
    if adapter_files.is_peft_dir(path):
        return adapter_files.read_peft_adapter(path, hparams)
    raise Npgpt2Error(f"{path}: not an adapter folder (no {ADAPTER_FILE} or adapter_config.json) (--adapter)")


def load_with_adapters(model_dir, dtype=np.float32, verify=True, mmap=False, adapter=None):
    """model.load_model for a LoRA run folder, or with adapter=DIR: the base model, loaded as
    dtype says, with the adapters attached. A run folder's base is the folder its adapter.json
    names (refused when missing or changed); adapter DIR's base, when it names one, must be
    model_dir's checkpoint."""
    from .model import load_model
    model_dir = Path(model_dir)
    if is_run_dir(model_dir):
        if adapter is not None:
            raise Npgpt2Error(f"--adapter: {model_dir} already holds adapters (a LoRA run folder); "
                              f"load its base with --adapter instead, or merge it first (npgpt2 convert --merge)")
        adapters, trained_on = read_run_adapters(model_dir)
        base_dir = find_base(model_dir, adapters.base)
        where = str(model_dir / "model-*")
    else:
        base_dir, where, trained_on = model_dir, str(adapter), None
    model = load_model(base_dir, dtype, verify, mmap)
    if model.lora is not None:  # (train --lora refuses such a base: adapters do not stack)
        raise Npgpt2Error(f"{base_dir}: a LoRA run folder as the base of other adapters; merge it first "
                          f"(npgpt2 convert --merge)")
    if adapter is not None:
        adapters = load_adapters(adapter, model.hparams)
        if adapters.base is not None:
            if adapters.base["checksum"] != base_checksum(base_dir):
                raise Npgpt2Error(f"{Path(adapter) / ADAPTER_FILE}: its adapters were trained on "
                                  f"{adapters.base['path']}, not on {base_dir} (their checkpoints differ)")
    if trained_on is not None and trained_on != model.weight_dtype:
        log.info("%s: the adapters were trained on a base of %s weights, loaded here as %s (--dtype %s loads it "
                 "as trained)", model_dir, trained_on, model.weight_dtype, trained_on)
    attach(model, adapters, where)
    if adapters.base is None:
        adapters.base = base_record(base_dir)
    model.source_dir = model_dir
    return model


# ---------------------------------------------------------------- training
def prepare_training(model, cfg, source, run_dir):
    """The model train.restore loaded from `source`, readied for cfg's --lora: fresh adapters
    (seeded by --seed, else 0) on a base; a LoRA run folder continuing (run_dir itself) keeps
    its adapters, if cfg asks for the same ones. Without --lora, a LoRA run is refused."""
    resuming = Path(source).resolve() == Path(run_dir).resolve()
    if not cfg.lora:
        if model.lora is not None:
            c = model.lora.config
            raise Npgpt2Error(f"{source}: holds LoRA adapters (r={c.r}); continue with --lora {c.r}"
                              f"{'' if resuming else ' (it trains new adapters on its base), or merge it first'}")
        return model
    config = config_from_train(cfg)
    if resuming:
        if model.lora is None:
            raise Npgpt2Error(f"{run_dir}: already holds a full fine-tune; train LoRA adapters on it under a new "
                              f"--run_name (with --models_dir/--model_name naming it)")
        have = model.lora.config
        if (have.r, have.alpha, have.targets) != (config.r, config.alpha, config.targets):
            raise Npgpt2Error(f"--lora {config.r} --lora_alpha {config.alpha:g} --lora_targets "
                              f"{','.join(config.targets)}: the run {run_dir} has r={have.r}, alpha={have.alpha:g}, "
                              f"targets={','.join(have.targets)}; continue with those")
        return model
    if model.lora is not None:
        raise Npgpt2Error(f"{source}: already holds LoRA adapters; merge them first (npgpt2 convert --merge) "
                          f"to train new ones on top")
    adapters = init_adapters(model.hparams, config, seed=cfg.seed or 0,
                             dtype=np.float32 if model.weight_dtype == "int8" else model.dtype)
    adapters.base = base_record(source)
    return attach(model, adapters)
