"""Memory estimates checked before a big allocation, so a flag like `--batch_size 10**12`
is refused with the figure instead of dying of MemoryError (or the OOM killer) later.

The estimates are of the arrays whose size grows with the batch; they are "about" figures
(within a small factor), good for refusing what cannot fit, not for fine tuning.
"""
import os

import numpy as np

from .errors import Npgpt2Error


def available_bytes():
    """Memory the system can still give this process (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human(n):
    """1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def generation_bytes(hparams, batch_size, prompt_len=1, length=None, dtype=np.float32):
    """About the memory generating `batch_size` rows at once takes: the key/value cache rows
    that prompt + `length` new tokens fill (np.zeros leaves the rest of n_ctx untouched), the
    prompt's prefill activations and the float64 logits and probabilities sampling works on."""
    L, C, T, V = (int(hparams[k]) for k in ("n_layer", "n_embd", "n_ctx", "n_vocab"))
    item = np.dtype(dtype).itemsize
    positions = min(T, int(prompt_len) + (T if length is None else int(length)))
    per_row = 2 * L * positions * C * item     # k and v: (n_layer, B, NH, n_ctx, hs) each
    per_row += int(prompt_len) * 8 * C * item  # prefill: residual, qkv, MLP hidden
    per_row += 4 * V * 8                       # logits (model dtype and float64), probs, cdf
    return int(batch_size) * per_row


def training_bytes(hparams, batch_size, context, dtype=np.float32, memory_saving=False):
    """About the memory one training micro-batch takes beyond the parameters: the
    activations saved for the backward pass, and the logits (one buffer per position for the
    logits, then the probabilities, then their gradient; an upper bound, since
    model.loss_and_grads makes them HEAD_ROWS positions at a time). memory_saving
    (--memory_saving_gradients): every layer keeps only its input, and one layer at a time
    holds the rest, for memsave.chunk_rows batch rows at a time."""
    from .memsave import chunk_rows
    L, C, NH, V = (int(hparams[k]) for k in ("n_layer", "n_embd", "n_head", "n_vocab"))
    item = np.dtype(dtype).itemsize
    B, T = int(batch_size), int(context)
    block = 10 * C + 2 * NH * T  # a layer's saves a token: residuals, qkv, attn, MLP input
    if memory_saving:  # every block's input, and one block re-run on a chunk of rows
        blocks = B * T * L * C + chunk_rows(B, T) * T * block
    else:
        blocks = B * T * L * block
    return (blocks + B * T * V) * item  # then the head


def validation_bytes(hparams, batch_size, batch_count, context, dtype=np.float32):
    """About the memory validation takes: its fixed batches, drawn once and kept (int64
    tokens), and one batch's forward pass (activations as training's, an upper bound)."""
    T = int(context)
    kept = int(batch_count) * (int(batch_size) * (T + 1) * 8 + 128)  # + each small array's own overhead
    return kept + training_bytes(hparams, batch_size, T, dtype)


class NotEnoughMemory(Npgpt2Error):
    """check_memory's refusal (the server answers it 503: the request is fine, the machine is full)."""


def check_memory(need, what, advice):
    """Raise NotEnoughMemory (an Npgpt2Error) naming `what` when `need` bytes exceed the memory available."""
    have = available_bytes()
    if have is not None and need > have:
        raise NotEnoughMemory(f"{what} needs about {human(need)} of memory, more than the "
                          f"{human(have)} available; {advice}")
