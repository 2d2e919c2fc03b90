"""Early stopping and the best validation checkpoint: `--early_stop N`, `--keep_best`,
`--restore_from best`.

The validation losses are in the run's history (saved in every train state), so "best so
far" and "validations since" are recomputed from it and a resumed run stops exactly where an
uninterrupted one would. An improvement is a validation loss strictly below every earlier one.

With --keep_best, each improvement saves the weights as `model-best-<step>` (TF checkpoint,
index + data) with `train_state-best-<step>.npz` beside them, then `best.json` naming them,
then removes the previous best's files (index first). `best.json` is the commit point: at
every instant it names a complete best checkpoint, as the `checkpoint` file does for the
latest one. The best files do not match `model-<digits>`, so `--max_to_keep` never prunes
them and `latest_checkpoint` never takes them for the latest.
"""
import json
import logging
from pathlib import Path

import numpy as np

from .checkpoint import write_checkpoint
from .errors import Npgpt2Error
from .fsutil import atomic_write, read_json

log = logging.getLogger(__name__)

BEST_FILE = "best.json"  # {"checkpoint": "model-best-<step>", "step", "val_loss"}


def best_so_far(history):
    """(best validation loss, its step, validations after it) from a run's history; None when
    the run has not validated yet."""
    losses = history["val_loss"]
    if not losses:
        return None
    i = int(np.argmin(losses))  # the first of equal minima: a tie is no improvement
    return float(losses[i]), int(history["val_step"][i]), len(losses) - 1 - i


def check_flags(cfg):
    if cfg.early_stop < 0:
        raise Npgpt2Error(f"--early_stop must be >= 0 (0 = off), got {cfg.early_stop}")
    for flag, on in (("--early_stop", cfg.early_stop), ("--keep_best", cfg.keep_best)):
        if on and not cfg.val_every:
            raise Npgpt2Error(f"{flag} needs validation: give --val_every N (and --val_dataset)")
    if (cfg.keep_best or cfg.restore_from == "best") and cfg.lora:
        # model-best-<step> holds full weights; a LoRA run folder's checkpoints are adapters (lora.py)
        raise Npgpt2Error("--keep_best / --restore_from best: not supported with --lora yet (--early_stop is)")


class BestKeeper:
    """What every rank does after a validation step: agree on whether the loss improved
    (rank 0 alone validates), save the best checkpoint on an improvement (--keep_best), and say
    whether to stop (--early_stop). Collective: every rank calls after_validation."""

    def __init__(self, cfg, comm):
        self.patience, self.keep = cfg.early_stop, cfg.keep_best
        self.comm = comm

    def after_validation(self, progress, checkpointer):
        """-> True when the run should stop now."""
        verdict = None
        if self.comm.is_main:
            best, step, since = best_so_far(progress.history)
            verdict = (since == 0, bool(self.patience) and since >= self.patience)
            if verdict[1]:
                log.info("early stop at step %d: the validation loss has not improved for %d validations "
                         "(best %.4f at step %d)", progress.step, since, best, step)
        improved, stop = self.comm.bcast(verdict)
        if self.keep and improved:
            checkpointer.save(progress, best=True)
        return stop


def save_best(model, run_dir, step, write_state, val_loss):
    """Write model-best-<step> and its train state (write_state(path)), then best.json naming
    them, then remove the previous best. Returns the new prefix."""
    run_dir = Path(run_dir)
    old = read_best(run_dir)
    name = f"model-best-{step}"
    write_state(run_dir / f"train_state-best-{step}.npz")
    write_checkpoint(str(run_dir / name), {k: np.asarray(v, dtype=np.float32) for k, v in model.params.items()})
    with atomic_write(run_dir / BEST_FILE, "w", encoding="utf-8") as f:
        json.dump({"checkpoint": name, "step": step, "val_loss": val_loss}, f, indent=2)
    if old is not None and old["checkpoint"] != name:
        from .model import remove_checkpoint
        remove_checkpoint(run_dir, old["checkpoint"])
        (run_dir / f"train_state-best-{old['step']}.npz").unlink(missing_ok=True)
    log.info("best validation loss %.4f: saved %s", val_loss, run_dir / name)
    return str(run_dir / name)


def read_best(run_dir):
    """best.json of a run as a dict, or None when the run has no best checkpoint."""
    path = Path(run_dir) / BEST_FILE
    try:
        best = read_json(path)
    except FileNotFoundError:
        return None
    if not isinstance(best, dict) or not isinstance(best.get("checkpoint"), str) \
            or not isinstance(best.get("step"), int):
        raise Npgpt2Error(f"{path}: expected {{\"checkpoint\": \"model-best-<step>\", \"step\": int, ...}}")
    return best


def best_prefix(run_dir):
    """The prefix path of a run's best checkpoint (--restore_from best)."""
    best = read_best(run_dir)
    if best is None:
        raise Npgpt2Error(f"{Path(run_dir) / BEST_FILE}: missing; the run kept no best checkpoint "
                          f"(train with --keep_best and --val_every)")
    return str(Path(run_dir) / best["checkpoint"])
