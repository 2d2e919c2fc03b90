"""Convert GPT-2 weights between three layouts, exactly (float32 in, the same bits out).

  tf   OpenAI's folder: hparams.json, encoder.json, vocab.bpe, `checkpoint` and a TF checkpoint
       `model.ckpt.index` + `model.ckpt.data-00000-of-00001` (no `.meta`: nothing here needs
       the TF graph). Tensor names and shapes as in HACKING.md (`model/h0/attn/c_attn/w` is
       (1, C, 3C)).
  npz  one NumPy `.npz`: each parameter under its TF name and shape, plus `__hparams__`, a 0-d
       unicode array holding hparams.json's text. Loads with np.load(allow_pickle=False).
  hf   a Hugging Face GPT-2 folder: config.json + model.safetensors as GPT2LMHeadModel saves
       them (`transformer.h.0.attn.c_attn.weight` is (C, 3C), i.e. the TF tensor without its
       leading 1; layernorm g/b are weight/bias; lm_head is tied to wte and not stored), plus
       vocab.json + merges.txt (the same files as encoder.json + vocab.bpe).

`--dtype int8` writes the tf layout with 8-bit weights (quant.py; the format is in HACKING.md):
each matmul weight NAME is stored as NAME/q8 (int8) + NAME/scale (float32), plus quant.json.

Formats are told apart by content. A folder is written under a temporary name beside the
destination and renamed into place at the end, so a half-written folder never looks complete.
"""
import json
import logging
import os
import re
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np

from . import quant
from .checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint, write_checkpoint_state
from .errors import Npgpt2Error
from .fsutil import atomic_write, parse_json, read_json_object
from .model import ASSETS, check_download_finished, check_hparams, param_shapes, read_hparams
from .safetensors_io import read_safetensors, write_safetensors

log = logging.getLogger(__name__)

FORMATS = ("tf", "npz", "hf")
HPARAMS_KEY = "__hparams__"
TF_PREFIX = "model.ckpt"
# OpenAI's tokenizer files and their Hugging Face names (same contents).
TOKENIZER_FILES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}
# Buffers older transformers versions saved with the weights: the causal mask and -1e4.
HF_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# What --force may delete when it replaces a model folder: the files of an OpenAI or Hugging
# Face GPT-2 model. Anything else (a run's train_state-*.npz, samples, notes) is the user's.
MODEL_FILE = re.compile(
    r"hparams\.json|checkpoint|encoder\.json|vocab\.bpe"
    r"|[^/]+\.(index|meta|data-\d{5}-of-\d{5})"
    r"|config\.json|generation_config\.json|model\.safetensors|vocab\.json|merges\.txt"
    r"|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|pytorch_model\.bin"
    r"|quant\.json")


def expected_shapes(hparams):
    """{TF name: shape} of every GPT-2 parameter for these hparams (no arrays are made)."""
    return param_shapes(hparams)


def count_params(hparams):
    """Number of parameters (wte counted once: the output layer shares it)."""
    return sum(int(np.prod(s)) for s in expected_shapes(hparams).values())


# ---------------------------------------------------------------- detection
def detect_format(path):
    """'tf', 'npz' or 'hf' for the model at `path`, judged by content; else Npgpt2Error."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive: .npz
            return "npz"
        if p.name in ("model.safetensors", "config.json", "hparams.json", "checkpoint") \
                or p.name.startswith(TF_PREFIX) or p.suffix in (".safetensors", ".index"):
            raise Npgpt2Error(f"{p}: is one file of a model; pass the folder that holds it")
        raise Npgpt2Error(f"{p}: not a model (expected a model folder or a .npz file)")
    if not p.is_dir():
        raise Npgpt2Error(f"{p}: no such file or folder")
    tf = any((p / n).is_file() for n in ("hparams.json", "checkpoint")) or any(p.glob("*.index"))
    hf = any((p / n).is_file() for n in ("config.json", "model.safetensors",
                                          "model.safetensors.index.json", "pytorch_model.bin"))
    if tf and hf:
        raise Npgpt2Error(f"{p}: holds both an OpenAI model (hparams.json/checkpoint) and a "
                          f"Hugging Face one (config.json/model.safetensors); say which with --from")
    if tf:
        return "tf"
    if hf:
        return "hf"
    raise Npgpt2Error(f"{p}: not a model folder (neither hparams.json + checkpoint nor "
                      f"config.json + model.safetensors)")


# ---------------------------------------------------------------- reading
def read_model(src, fmt=None):
    """(hparams, params, tokenizer) from `src`; params are TF-named float32 arrays.

    tokenizer maps 'encoder.json'/'vocab.bpe' to the source's files when it has both, else {}.
    """
    fmt = fmt or detect_format(src)
    if fmt not in FORMATS:
        raise Npgpt2Error(f"--from: unknown format '{fmt}' (choose one of {', '.join(FORMATS)})")
    return {"tf": _read_tf, "npz": _read_npz, "hf": _read_hf}[fmt](Path(src))


def _read_tf(folder):
    if not folder.is_dir():
        raise Npgpt2Error(f"{folder}: an OpenAI model is a folder, not a file")
    check_download_finished(folder)
    from .compact_vocab import VOCAB_FILE
    if (folder / VOCAB_FILE).is_file():  # no other format can carry its token numbering
        raise Npgpt2Error(f"{folder / VOCAB_FILE}: this model numbers its tokens 0..K-1, not as GPT-2 does; "
                          "converted, it would load with GPT-2's ids and give other text: use the folder as it is")
    hparams = read_hparams(folder)
    prefix = latest_checkpoint(folder)
    tensors = read_checkpoint(prefix, verify=True, mmap=True)
    # Training checkpoints may also hold optimizer slots; they are not part of the model.
    dropped = [n for n in tensors if not n.startswith("model/")]
    if dropped:
        log.info("%s: leaving out %d tensors that are not model parameters", prefix, len(dropped))
    params = {n: a for n, a in tensors.items() if n.startswith("model/")}
    params = _checked(hparams, params, prefix + ".index")
    tok = {n: folder / n for n in TOKENIZER_FILES}
    return hparams, params, tok if all(p.is_file() for p in tok.values()) else {}


def _read_npz(path):
    if not path.is_file():
        raise Npgpt2Error(f"{path}: a .npz model is a file, not a folder")
    try:
        with np.load(path, allow_pickle=False) as z:
            if HPARAMS_KEY not in z.files:
                raise Npgpt2Error(f"{path}: no '{HPARAMS_KEY}' entry (not an npgpt2 .npz model)")
            arrays = {n: z[n] for n in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise Npgpt2Error(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray):  # np.load hands back the raw bytes of such members
            raise Npgpt2Error(f"{path}: member '{name}' is not a .npy array")
    raw = arrays.pop(HPARAMS_KEY)
    if raw.shape != () or raw.dtype.kind != "U":
        raise Npgpt2Error(f"{path}: '{HPARAMS_KEY}' is not a JSON string")
    hparams = parse_json(str(raw[()]), f"{path}:{HPARAMS_KEY}")
    check_hparams(hparams, f"{path}:{HPARAMS_KEY}")
    return hparams, _checked(hparams, arrays, str(path)), {}


def _read_hf(folder):
    if not folder.is_dir():
        raise Npgpt2Error(f"{folder}: a Hugging Face model is a folder, not a file")
    hparams = hparams_from_config(folder / "config.json")
    st = folder / "model.safetensors"
    if not st.is_file():
        if (folder / "model.safetensors.index.json").is_file():
            raise Npgpt2Error(f"{folder}: sharded safetensors (model.safetensors.index.json) are "
                              f"not supported; save the model as one model.safetensors")
        other = " (only pytorch_model.bin, which npgpt2 cannot read: re-save it with " \
                "save_pretrained(..., safe_serialization=True))" \
            if (folder / "pytorch_model.bin").is_file() else ""
        raise Npgpt2Error(f"{st}: missing{other}")
    tensors, _ = read_safetensors(st, mmap=True)
    shapes = expected_shapes(hparams)
    to_tf = {hf_name(n): n for n in shapes}
    params = {}
    lm_head = None
    for name, arr in tensors.items():
        short = name[len("transformer."):] if name.startswith("transformer.") else name
        if HF_BUFFER.fullmatch(short):
            continue
        if name == "lm_head.weight":
            lm_head = arr
            continue
        tf = to_tf.get("transformer." + short)
        if tf is None:
            raise Npgpt2Error(f"{st}: unexpected tensor '{name}' (not a GPT2LMHeadModel with the "
                              f"sizes in config.json?)")
        if len(shapes[tf]) == 3 and arr.ndim == 2:  # Conv1D weight: TF keeps a leading 1
            arr = arr[None]
        params[tf] = arr
    params = _checked(hparams, params, str(st))
    if lm_head is not None and not np.array_equal(lm_head, params["model/wte"]):
        raise Npgpt2Error(f"{st}: lm_head.weight differs from transformer.wte.weight; npgpt2's "
                          f"GPT-2 ties them, so this model cannot be converted")
    tok = {tf: folder / hf for tf, hf in TOKENIZER_FILES.items()}
    return hparams, params, tok if all(p.is_file() for p in tok.values()) else {}


def hf_name(tf_name):
    """'model/h3/attn/c_attn/w' -> 'transformer.h.3.attn.c_attn.weight' (and so on)."""
    parts = tf_name.split("/")[1:]
    if parts[0].startswith("h") and parts[0][1:].isdigit():
        parts[0] = "h." + parts[0][1:]
    leaf = {"g": "weight", "b": "bias", "w": "weight"}
    parts[-1] = leaf.get(parts[-1], parts[-1])
    if len(parts) == 1:  # wte, wpe
        parts.append("weight")
    return "transformer." + ".".join(parts)


def hparams_from_config(path):
    """npgpt2 hparams from a Hugging Face GPT-2 config.json; refuses variants npgpt2 can't run."""
    cfg = read_json_object(path, "not a Hugging Face model folder?")
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise Npgpt2Error(f"{path}: model_type is '{cfg.get('model_type')}', not 'gpt2'")
    hparams = {"n_vocab": cfg.get("vocab_size"), "n_ctx": cfg.get("n_positions", cfg.get("n_ctx")),
               "n_embd": cfg.get("n_embd"), "n_head": cfg.get("n_head"),
               "n_layer": cfg.get("n_layer")}
    check_hparams(hparams, str(path))
    # What npgpt2's forward pass computes; anything else would convert to a different model.
    same = {"activation_function": "gelu_new", "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
            "tie_word_embeddings": True}
    for key, want in same.items():
        if cfg.get(key, want) != want:
            raise Npgpt2Error(f"{path}: {key} is {cfg[key]!r}; npgpt2 supports only {want!r}")
    if cfg.get("n_inner") not in (None, 4 * hparams["n_embd"]):
        raise Npgpt2Error(f"{path}: n_inner is {cfg['n_inner']}; npgpt2 supports only 4 * n_embd")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    try:  # NaN fails the <= test; an int like 10**400 cannot become a float
        ok = (isinstance(eps, (int, float)) and not isinstance(eps, bool)
              and abs(float(eps) - 1e-5) <= 1e-12)
    except OverflowError:
        ok = False
    if not ok:
        raise Npgpt2Error(f"{path}: layer_norm_epsilon is {repr(eps)[:40]}; npgpt2 supports only 1e-05")
    return hparams


def hf_config(hparams):
    """A config.json dict that transformers' GPT2LMHeadModel.from_pretrained accepts."""
    V, T, C, H, L = (hparams[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"))
    eos = min(50256, V - 1)  # <|endoftext|>; a smaller test vocabulary ends with it
    return {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1, "bos_token_id": eos, "embd_pdrop": 0.1, "eos_token_id": eos,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
        "n_ctx": T, "n_embd": C, "n_head": H, "n_inner": None, "n_layer": L, "n_positions": T,
        "reorder_and_upcast_attn": False, "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "tie_word_embeddings": True,
        "torch_dtype": "float32", "use_cache": True, "vocab_size": V,
    }


def _checked(hparams, params, source):
    """params restricted to exactly the expected names and shapes, as float32."""
    shapes = expected_shapes(hparams)
    for name in params:
        if name not in shapes:
            raise Npgpt2Error(f"{source}: unexpected tensor '{name}' (hparams say "
                              f"n_layer={hparams['n_layer']})")
    out = {}
    for name, shape in shapes.items():
        if name not in params:
            raise Npgpt2Error(f"{source}: tensor '{name}' is missing")
        arr = params[name]
        if tuple(arr.shape) != shape:
            raise Npgpt2Error(f"{source}: tensor '{name}' has shape {tuple(arr.shape)}, "
                              f"but the hparams imply {shape}")
        if arr.dtype.kind != "f":
            raise Npgpt2Error(f"{source}: tensor '{name}' has dtype {arr.dtype}, not a float")
        out[name] = np.asarray(arr, dtype=np.float32)  # no copy when already float32
    return out


# ---------------------------------------------------------------- writing
def _tokenizer_sources(tok):
    return {n: tok.get(n, ASSETS / n) for n in TOKENIZER_FILES}


def write_tf(folder, hparams, params, tok=None):
    """Write an OpenAI-layout model folder (into an existing, empty `folder`)."""
    folder = Path(folder)
    with atomic_write(folder / "hparams.json", "w", encoding="utf-8") as f:
        json.dump(hparams, f, indent=2)
    for name, src in _tokenizer_sources(tok or {}).items():
        shutil.copyfile(src, folder / name)
    write_checkpoint(str(folder / TF_PREFIX), params)
    write_checkpoint_state(folder, TF_PREFIX, [TF_PREFIX])


def write_hf(folder, hparams, params, tok=None):
    """Write a Hugging Face GPT-2 folder (into an existing, empty `folder`)."""
    folder = Path(folder)
    with atomic_write(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(hf_config(hparams), f, indent=2)
    tensors = {hf_name(n): (a[0] if a.ndim == 3 else a) for n, a in params.items()}
    write_safetensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    for name, src in _tokenizer_sources(tok or {}).items():
        shutil.copyfile(src, folder / TOKENIZER_FILES[name])


def write_int8(folder, hparams, params, tok=None):
    """Write an OpenAI-layout folder with int8 weights (quantised here, tensor by tensor)."""
    params = quant.quantize_params(params)
    write_tf(folder, hparams, quant.checkpoint_tensors(params), tok)
    quant.write_quant_info(folder, params)


def write_npz(path, hparams, params):
    """Write the single-file .npz layout atomically."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **{HPARAMS_KEY: np.array(json.dumps(hparams))}, **params)


def convert(src, dst, fmt=None, src_fmt=None, force=False, dtype="float32", merge=False, base=None):
    """Convert the model at `src` into format `fmt` at `dst`; returns Path(dst).

    fmt: 'tf', 'npz' or 'hf'; by default 'npz' when dst ends in .npz, else 'hf' from an
      OpenAI folder and 'tf' from anything else. src_fmt: the source's format when its
      content is ambiguous (detected otherwise).
    force: replace a model already at `dst` (never a folder that holds anything else).
    dtype: 'int8' writes 8-bit weights in the tf layout (see write_int8).
    merge / fmt 'peft' / base: src holds LoRA adapters (adapter_files.convert_adapter).
    """
    src, dst = Path(src), Path(dst)
    from .adapter_files import convert_adapter, is_adapter_source
    if merge or fmt == "peft" or base is not None or is_adapter_source(src):
        return convert_adapter(src, dst, merge=merge, fmt=fmt, base=base, force=force, dtype=dtype)
    src_fmt = src_fmt or detect_format(src)
    int8 = quant.check_dtype(dtype) == "int8"
    if int8 and fmt not in (None, "tf"):
        raise Npgpt2Error(f"--dtype int8: written as an OpenAI-layout folder only (--to tf), not --to {fmt}")
    if src_fmt == "tf" and Path(src).is_dir() and quant.read_quant_info(src) is not None:
        raise Npgpt2Error(f"{src}: holds int8 weights (quant.json); convert from the float32 model")
    fmt = "tf" if int8 else fmt
    if fmt is None:
        fmt = "npz" if dst.suffix == ".npz" else "hf" if src_fmt == "tf" else "tf"
    if fmt not in FORMATS:
        raise Npgpt2Error(f"--to: unknown format '{fmt}' (choose one of {', '.join(FORMATS)})")
    _recover_killed_writes(dst)  # first: a model a killed run moved aside is the user's again
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise Npgpt2Error(f"{dst}: is the source itself; write the conversion somewhere else")
    _check_destination(dst, fmt, force)

    hparams, params, tok = read_model(src, src_fmt)
    log.info("converting %s (%s) -> %s (%s)", src, src_fmt, dst, fmt)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "npz":
            write_npz(dst, hparams, params)
        else:
            write = write_int8 if int8 else write_tf if fmt == "tf" else write_hf
            _write_folder(dst, lambda tmp: write(tmp, hparams, params, tok))
    except OSError as e:
        raise Npgpt2Error(f"{dst}: cannot write ({e.strerror or e})") from None
    return dst


def _check_destination(dst, fmt, force):
    if not dst.exists():
        if dst.parent.exists() and not dst.parent.is_dir():
            raise Npgpt2Error(f"{dst.parent}: is a file, not a folder")
        return
    if fmt == "npz":
        if dst.is_dir():
            raise Npgpt2Error(f"{dst}: is a folder; a .npz model is a single file")
        if not force:
            raise Npgpt2Error(f"{dst}: already exists (use --force to replace it)")
        return
    if not dst.is_dir():
        raise Npgpt2Error(f"{dst}: is a file; this format is written as a folder")
    if not any(dst.iterdir()):
        return
    if not force:
        raise Npgpt2Error(f"{dst}: is not empty (use --force to replace a model there)")
    try:
        detect_format(dst)
    except Npgpt2Error:
        raise Npgpt2Error(f"{dst}: is not empty and holds no model; refusing to replace it, "
                          f"even with --force") from None
    others = sorted(e.name for e in dst.iterdir() if not (e.is_file() and MODEL_FILE.fullmatch(e.name)))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise Npgpt2Error(f"{dst}: also holds {shown}, which are not model files; refusing to "
                          f"replace it, even with --force (write the conversion to a new folder)")


def _recover_killed_writes(dst):
    """Clean up after a conversion to `dst` that was killed: its `.NAME.PID.tmp` folder is
    removed; its `.NAME.PID.old` folder (the previous model, moved aside) is put back when
    `dst` is missing (killed between the two renames), else removed. Folders of a process that
    is still running are left alone."""
    pattern = re.compile(re.escape(f".{dst.name}.") + r"(\d+)\.(tmp|old)")
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return
    for p in sorted(entries):
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir() or p.is_symlink() or _pid_alive(int(m.group(1))):
            continue
        if m.group(2) == "old" and not dst.exists():
            os.replace(p, dst)
            log.warning("%s: restored the model a killed conversion had moved aside to %s", dst, p.name)
        else:
            shutil.rmtree(p, ignore_errors=True)
            log.info("%s: removed %s, left by a killed conversion", dst.parent, p.name)


def _pid_alive(pid):
    if pid == os.getpid():
        return False  # ours from an earlier call in this process that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process (or a number we cannot judge): leave it
    return True


def _write_folder(dst, write):
    """Run write(tmp) in a fresh hidden folder beside dst, then put it in dst's place."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    old = dst.parent / f".{dst.name}.{os.getpid()}.old"
    tmp.mkdir()
    try:
        write(tmp)
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dst.exists():
            os.replace(old, dst)  # put the user's model back
        if isinstance(e, (Npgpt2Error, OSError)):  # name the destination, not our hidden temp folder
            where = f"{e.filename}: {e.strerror or e}" if isinstance(e, OSError) and e.filename else str(e)
            raise Npgpt2Error(where.replace(str(tmp), str(dst))) from None
        raise
    shutil.rmtree(old, ignore_errors=True)
