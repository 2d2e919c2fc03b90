"""npgpt2: GPT-2 written by hand in NumPy.

    import npgpt2
    model = npgpt2.load_model("weights/124M")
    enc = npgpt2.load_tokenizer("weights/124M")
    ids = npgpt2.generate(model, enc.encode("Hello"), length=20, top_k=40, seed=1)
    print(enc.decode(ids))

The names below are imported when first used, so `import npgpt2` (and the `npgpt2` command,
before it parses its flags) loads neither NumPy nor Numba: a Ctrl-C then lands in the CLI's
own handler, not in the middle of an import, and `npgpt2 --help` is instant.
"""
import importlib

from . import blas_idle
from .errors import Npgpt2Error

# OpenBLAS's idle threads sleep right after a call instead of spinning ~0.1 s (blas_idle.py):
# OpenBLAS reads this when NumPy loads it, so before any npgpt2 module imports NumPy (when
# NumPy came first, threads.py restarts OpenBLAS's workers at its first BLAS decision).
blas_idle.set_default_env()

__version__ = "0.1.0"

_EXPORTS = {"ChatSession": "chat", "GPT2": "model", "init_model": "model", "load_model": "model",
            "save_model": "model", "generate": "sampling", "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
            "input_gradient": "interp", "logit_lens": "interp", "Server": "server", "example_dir": "examples",
            "generate_batch": "batch_decode"}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:  # `npgpt2.model` and the other modules, as after an eager import
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # a module of ours that failed to import: say so
                raise
            raise AttributeError(f"module 'npgpt2' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["ChatSession", "GPT2", "Npgpt2Error", "Server", "Tokenizer", "example_dir", "generate", "generate_batch",
           "init_model", "input_gradient", "load_model", "load_tokenizer", "logit_lens", "save_model"]
