"""The loss curve as a PNG (matplotlib, the optional extra `plot`: pip install npgpt2[plot])."""
import logging
from pathlib import Path

import numpy as np

from .fsutil import atomic_write

log = logging.getLogger(__name__)
_warned = False


def smooth(values, weight=0.99):
    """OpenAI train.py's decaying average of a loss series (bias-corrected from the start)."""
    out, num, den = [], 0.0, 0.0
    for v in values:
        num, den = num * weight + v, den * weight + 1.0
        out.append(num / den)
    return out


def plot_losses(history, out_png, title="", reference=None):
    """Draw training loss (raw and averaged) and validation loss against step into out_png.

    history: dict of lists step, loss, val_step, val_loss; reference: optional
    (label, value) drawn as a dashed horizontal line. Returns the path written, or
    None when matplotlib is not installed (logged once) or there is nothing to draw.
    """
    global _warned
    if not history.get("step"):
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            log.info("matplotlib is not installed: no loss-curve PNG (pip install 'npgpt2[plot]')")
            _warned = True
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = np.asarray(history["step"])
    ax.plot(steps, history["loss"], color="#9ecae1", linewidth=0.8, label="train loss")
    ax.plot(steps, smooth(history["loss"]), color="#08519c", linewidth=1.5, label="train (average)")
    if history.get("val_step"):
        ax.plot(history["val_step"], history["val_loss"], "o-", color="#e6550d", markersize=3,
                label="validation loss")
    if reference is not None:
        ax.axhline(reference[1], color="gray", linestyle="--", linewidth=1,
                   label=f"{reference[0]} ({reference[1]:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_write(out_png) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out_png
