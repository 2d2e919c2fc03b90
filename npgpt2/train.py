"""Fine-tuning on a CPU: the training loop, checkpoints with exact resume, evaluation.

    cfg = TrainConfig(dataset="corpus.npz", model_name="124M", run_name="run1", steps=500)
    result = train(cfg)

The run folder `<checkpoint_dir>/<run_name>/` is an OpenAI-layout model folder
(hparams.json, encoder.json, vocab.bpe, `checkpoint`, `model-<step>.*`), so it loads
wherever a released model loads. Beside each `model-<step>` sits `train_state-<step>.npz`:
the optimizer's moments and step count, the batch sampler's RNG state, the running loss
average and the loss history, so `--restore_from latest` continues exactly as if never
stopped. The state file is written before the `checkpoint` file names the new step, and
every write is atomic, so a crash at any point leaves the previous complete checkpoint.

The library logs (logger "npgpt2.train"); the caller can also pass on_step to see every
step (the CLI drives its progress bar with it).
"""
import dataclasses
import json
import logging
import math
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np

from . import optim
from .data import Sampler, check_tokens, eval_windows, load_dataset
from .errors import Npgpt2Error
from .fsutil import atomic_write

log = logging.getLogger(__name__)

STATE_FORMAT = 1
LOGIT_BUDGET = 1 << 23  # logits computed at once when only losses are needed (32 MB float32)


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; field names are the CLI's flags (OpenAI's train.py names)."""
    dataset: str = None
    model_name: str = "124M"
    models_dir: str = "weights"
    combine: int = 50000
    encoding: str = "utf-8"
    batch_size: int = 1
    learning_rate: float = 2e-5
    accumulate_gradients: int = 1
    optimizer: str = "adam"
    only_train_transformer_layers: bool = False
    run_name: str = "run1"
    restore_from: str = "latest"
    checkpoint_dir: str = "checkpoint"
    sample_dir: str = "samples"
    sample_every: int = 100
    sample_length: int = 128
    sample_num: int = 1
    save_every: int = 1000
    max_to_keep: int = 5
    val_dataset: str = None
    val_every: int = 0
    val_batch_size: int = 2
    val_batch_count: int = 40
    top_k: int = 40
    top_p: float = 1.0
    steps: int = 0                 # updates in this invocation; 0 = until Ctrl-C
    context: int = 0               # tokens per sequence; 0 = the model's n_ctx
    seed: int = None               # batch order; None = a random one (logged and saved)
    weight_decay: float = 0.0      # AdamW's decoupled decay, on matrices only
    warmup: int = 0
    lr_schedule: str = "constant"  # or "cosine"
    lr_decay_steps: int = 0        # cosine reaches min_lr_ratio * lr here; 0 = the last step
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0         # global-norm clipping; 0 = off
    plot: bool = True              # loss-curve PNG in the run folder (needs matplotlib)
    log_every: int = 1             # a log line every N steps


# ---------------------------------------------------------------- checking the config
def check_config(cfg, n_ctx):
    """Raise Npgpt2Error naming the flag for a value out of range; returns the context T."""
    positive = ["batch_size", "accumulate_gradients", "val_batch_size", "val_batch_count", "max_to_keep",
                "combine", "log_every"]
    non_negative = ["steps", "sample_every", "save_every", "val_every", "warmup", "lr_decay_steps", "context",
                    "top_k", "sample_num"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise Npgpt2Error(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise Npgpt2Error(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.learning_rate > 0:
        raise Npgpt2Error(f"--learning_rate must be > 0, got {cfg.learning_rate}")
    if not cfg.weight_decay >= 0:
        raise Npgpt2Error(f"--weight_decay must be >= 0, got {cfg.weight_decay}")
    if not cfg.grad_clip >= 0:
        raise Npgpt2Error(f"--grad_clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    if not 0 < cfg.top_p <= 1:
        raise Npgpt2Error(f"--top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.optimizer not in ("adam", "sgd"):
        raise Npgpt2Error(f"--optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise Npgpt2Error(f"--lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    if not re.fullmatch(r"[\w.+-]+", cfg.run_name or ""):
        raise Npgpt2Error(f"--run_name must be a plain folder name (letters, digits, . _ + -), got {cfg.run_name!r}")
    T = cfg.context or n_ctx
    if T > n_ctx:
        raise Npgpt2Error(f"--context {T} is longer than the model's n_ctx = {n_ctx}")
    return T


# ---------------------------------------------------------------- saving and restoring
def state_path(run_dir, step):
    return Path(run_dir) / f"train_state-{step}.npz"


def make_run_dir(run_dir):
    """Create the run folder, or say in one line why it cannot be (checked before training)."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Npgpt2Error(f"{run_dir}: cannot make the run folder (--checkpoint_dir/--run_name): "
                          f"{e.strerror or e}") from None


def save_run(model, run_dir, step, opt, sampler, avg, history, keep=None, extra=None):
    """Write train_state-<step>.npz, then model-<step> and the `checkpoint` file naming it.

    Removes train states whose model-<step> save_model pruned. Returns the model prefix.
    """
    from .model import save_model
    run_dir = Path(run_dir)
    make_run_dir(run_dir)
    arrays = {f"opt/{k}": v for k, v in opt.state_dict().items()}
    arrays.update({
        "format": np.array(STATE_FORMAT), "step": np.array(step, dtype=np.int64),
        "sampler": np.array(sampler.get_state()), "avg": np.array(avg, dtype=np.float64),
        "extra": np.array(json.dumps(extra or {})),
    })
    for k, v in history.items():
        arrays[f"history/{k}"] = np.asarray(v, dtype=np.float64)
    with atomic_write(state_path(run_dir, step)) as f:
        np.savez(f, **arrays)
    prefix = save_model(model, run_dir, step=step, keep=keep)
    kept = {int(p.name[6:-6]) for p in run_dir.glob("model-*.index") if p.name[6:-6].isdigit()}
    for p in run_dir.glob("train_state-*.npz"):
        s = p.name[len("train_state-"):-len(".npz")]
        if s.isdigit() and int(s) not in kept:
            p.unlink()
    return prefix


def load_train_state(run_dir, prefix):
    """The train state saved with checkpoint `prefix` (a `model-<step>` name): a dict of
    arrays; just {"step"} when the state file is missing; None for other checkpoint names."""
    m = re.fullmatch(r"model-(\d+)", Path(prefix).name)
    if not m:
        return None
    path = state_path(run_dir, int(m.group(1)))
    if not path.exists():
        log.warning("%s: not found; starting the optimizer and batch order afresh", path)
        return {"step": np.array(int(m.group(1)))}
    try:
        with np.load(path) as z:
            state = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise Npgpt2Error(f"{path}: unreadable train state ({e}); use --restore_from fresh or an older checkpoint") from None
    if int(state.get("format", -1)) != STATE_FORMAT or int(state["step"]) != int(m.group(1)):
        raise Npgpt2Error(f"{path}: not a train state of format {STATE_FORMAT} for step {m.group(1)}")
    state["_path"] = str(path)
    return state


def has_checkpoint(folder):
    return (Path(folder) / "checkpoint").is_file()


def restore(cfg, run_dir):
    """(model, train state or None) as --restore_from says: 'latest' continues the run (or
    starts from the base model when the run has no checkpoint), 'fresh' starts from the base
    model, a PATH starts from that model folder."""
    from .model import load_model, resolve_model_dir
    run_dir = Path(run_dir)
    if cfg.restore_from == "latest" and has_checkpoint(run_dir):
        source = run_dir
    else:
        if cfg.restore_from in ("latest", "fresh"):
            source = resolve_model_dir(cfg.models_dir, cfg.model_name)
        else:
            source = Path(cfg.restore_from)
            if not source.is_dir():
                raise Npgpt2Error(f"{source}: model folder not found (--restore_from)")
        if has_checkpoint(run_dir) and source.resolve() != run_dir.resolve():
            # its model-<step> files would mix with (and be pruned against) the new run's
            raise Npgpt2Error(f"{run_dir}: already holds a run; use --restore_from latest to continue it, "
                              f"or pick a new --run_name")
    model = load_model(source)
    state = None
    if has_checkpoint(source) and source.resolve() == run_dir.resolve():
        from .checkpoint import latest_checkpoint
        state = load_train_state(run_dir, latest_checkpoint(run_dir))
    log.info("restored %s%s", source, f" at step {int(state['step'])}" if state else "")
    return model, state


# ---------------------------------------------------------------- losses without gradients
def forward_losses(model, inputs, targets):
    """Per-position cross-entropy (B, T) float64 from a forward pass (no gradients kept)."""
    B, T = targets.shape
    out = np.empty((B, T), dtype=np.float64)
    rows = max(1, LOGIT_BUDGET // (T * model.hparams["n_vocab"]))  # bound the (rows, T, V) logits
    for b in range(0, B, rows):
        logits = model.forward(inputs[b:b + rows])
        top = logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(axis=-1, dtype=np.float64)) + top[..., 0]
        out[b:b + rows] = lse - np.take_along_axis(logits, targets[b:b + rows, :, None], -1)[..., 0]
    return out


def evaluate(model, tokens, context=None, batch_size=16, progress=None):
    """Mean loss (nats per token) over every token of `tokens` after the first, each
    predicted once with up to `context` tokens before it in its window. Deterministic.
    progress(done, total) is called after each batch of windows.
    Returns (mean loss, number of tokens predicted)."""
    T = context or model.hparams["n_ctx"]
    windows = eval_windows(tokens.size, T)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        # windows of equal length go through together (only the last one can be shorter)
        for n in sorted({n for _, n in group}, reverse=True):
            starts = np.array([s for s, m in group if m == n])
            seqs = tokens[starts[:, None] + np.arange(n + 1)].astype(np.int64)
            total += float(forward_losses(model, seqs[:, :-1], seqs[:, 1:]).sum())
            count += n * len(starts)
        if progress:
            progress(min(i + batch_size, len(windows)), len(windows))
    return total / max(count, 1), count


# ---------------------------------------------------------------- Ctrl-C
class StopFlag:
    """The first SIGINT asks the loop to save and stop after the current step; a second one
    interrupts at once (KeyboardInterrupt). Only installed in the main thread."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: saving after this step (Ctrl-C again to quit without saving)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ---------------------------------------------------------------- samples
def write_samples(model, tokenizer, cfg, step, run_name):
    """cfg.sample_num unconditional samples (after <|endoftext|>), logged and written to
    <sample_dir>/<run>/samples-<step> in OpenAI's train.py format."""
    from .sampling import generate_stream
    length = min(cfg.sample_length, model.hparams["n_ctx"] - 1)
    start = tokenizer.eot_token if tokenizer.eot_token is not None else 0
    # a generator of its own, keyed by the step: sampling never disturbs the batch order
    rng = np.random.default_rng([cfg.seed or 0, step])
    rows = [[] for _ in range(cfg.sample_num)]
    for tokens in generate_stream(model, [start], length, 1.0, cfg.top_k, cfg.top_p,
                                  batch_size=cfg.sample_num, rng=rng):
        for r, t in zip(rows, tokens):
            r.append(int(t))
    texts = [tokenizer.decode(r) for r in rows]
    out = Path(cfg.sample_dir) / run_name
    out.mkdir(parents=True, exist_ok=True)
    body = "\n".join("======== SAMPLE {} ========\n{}\n".format(i + 1, t) for i, t in enumerate(texts))
    with atomic_write(out / f"samples-{step}", "w", encoding="utf-8") as f:
        f.write(body)
    log.info("samples at step %d (%s):\n%s", step, out / f"samples-{step}", body)
    return texts


def check_train_memory(model, cfg, T):
    """Refuse, with the figure, a --batch_size or --sample_num whose arrays cannot fit in memory."""
    from .memory import check_memory, training_bytes
    from .sampling import check_batch_memory
    check_memory(training_bytes(model.hparams, cfg.batch_size, T, model.dtype), f"--batch_size {cfg.batch_size}",
                 "use a smaller --batch_size (with --accumulate_gradients for as many tokens per update)")
    if cfg.sample_every and cfg.sample_num:
        check_batch_memory(model.hparams, cfg.sample_num, 1, cfg.sample_length, model.dtype, name="--sample_num")


# ---------------------------------------------------------------- the loop
def fit(model, tokens, cfg, run_dir=None, tokenizer=None, val_tokens=None, state=None, on_step=None):
    """Train `model` in place on the 1-D token array `tokens` as `cfg` says.

    run_dir: where checkpoints go (None = nowhere). state: a train state from restore()
    to continue from. on_step(info) is called after every update with a dict: step,
    loss, avg, secs, tok_s, lr, grad_norm (and val_loss when validated).
    Returns a dict: step, loss, avg, history, interrupted, checkpoint (last prefix saved).
    """
    T = check_config(cfg, model.hparams["n_ctx"])
    check_tokens(tokens, model.hparams["n_vocab"], T, cfg.dataset or "dataset")
    check_train_memory(model, cfg, T)
    names = [k for k in model.params if "/h" in k] if cfg.only_train_transformer_layers else list(model.params)
    decay = {k: (cfg.weight_decay if model.params[k].ndim >= 2 else 0.0) for k in names}
    opt = optim.make_optimizer(cfg.optimizer, {k: model.params[k] for k in names}, cfg.learning_rate, decay)
    seed = cfg.seed if cfg.seed is not None else int(np.random.SeedSequence().entropy % (1 << 63))
    sampler = Sampler(tokens, T + 1, seed)
    history = {"step": [], "loss": [], "val_step": [], "val_loss": []}
    step, avg = 0, (0.0, 0.0)
    if state is not None and "sampler" in state:
        opt.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("opt/")}, state["_path"])
        sampler.set_state(str(state["sampler"]))
        step, avg = int(state["step"]), tuple(float(x) for x in state["avg"])
        history = {k: state[f"history/{k}"].tolist() for k in history}
    elif state is not None:  # weights without a train state: keep counting from their step
        step = int(state["step"])
        log.info("batch order seed %d", seed)
    else:
        log.info("batch order seed %d", seed)

    val_batches = []
    if cfg.val_every:
        vt = val_tokens if val_tokens is not None else tokens
        check_tokens(vt, model.hparams["n_vocab"], T, cfg.val_dataset or cfg.dataset or "dataset", "--val_dataset")
        vs = Sampler(vt, T + 1, seed=1)  # fixed batches, as OpenAI's train.py
        val_batches = [vs.sample(cfg.val_batch_size) for _ in range(cfg.val_batch_count)]
    end = step + cfg.steps if cfg.steps else None
    decay_steps = cfg.lr_decay_steps or (end or 0)
    run_name = Path(run_dir).name if run_dir is not None else cfg.run_name
    tokens_per_step = cfg.batch_size * T * cfg.accumulate_gradients
    extra = {"config": {k: v for k, v in dataclasses.asdict(cfg).items()}, "seed": seed}
    saved_step, prefix, loss = step, None, float("nan")
    start_time = time.time()

    def save():
        nonlocal saved_step, prefix
        if run_dir is not None:
            prefix = save_run(model, run_dir, step, opt, sampler, avg, history, cfg.max_to_keep, extra)
            log.info("saved %s", prefix)
            if cfg.plot:
                from .plot import plot_losses
                plot_losses(history, Path(run_dir) / "loss.png", title=run_name)
        saved_step = step

    with StopFlag() as stop:
        while end is None or step < end:
            lr = optim.learning_rate(step, cfg.learning_rate, cfg.warmup, cfg.lr_schedule,
                                     decay_steps, cfg.min_lr_ratio)
            t0 = time.time()
            total, loss = None, 0.0
            for _ in range(cfg.accumulate_gradients):
                batch = sampler.sample(cfg.batch_size)
                micro_loss, grads = model.loss_and_grads(batch[:, :-1], batch[:, 1:])
                loss += micro_loss / cfg.accumulate_gradients
                if total is None:
                    # copied when more micro-batches follow: loss_and_grads may reuse its buffers
                    total = {k: grads[k] if cfg.accumulate_gradients == 1 else grads[k].copy() for k in names}
                else:
                    optim.accumulate(total, grads, names)
                del grads
            optim.scale_(total, 1.0 / cfg.accumulate_gradients)
            if not math.isfinite(loss):
                raise Npgpt2Error(f"loss became {loss} at step {step + 1}; lower --learning_rate "
                                  f"(now {cfg.learning_rate}) or raise --warmup")
            grad_norm = optim.clip_grad_norm(total, cfg.grad_clip)
            opt.step(total, lr)
            del total
            step += 1
            secs = time.time() - t0
            avg = (avg[0] * 0.99 + loss, avg[1] * 0.99 + 1)  # OpenAI's decaying average
            history["step"].append(step)
            history["loss"].append(loss)
            info = dict(step=step, loss=loss, avg=avg[0] / avg[1], secs=secs, lr=lr,
                        tok_s=tokens_per_step / max(secs, 1e-9), grad_norm=grad_norm)
            if step % cfg.log_every == 0:
                log.info("[%d | %.2f] loss=%.4f avg=%.4f tok/s=%.0f", step, time.time() - start_time,
                         loss, info["avg"], info["tok_s"])
            if val_batches and step % cfg.val_every == 0:
                val = float(np.mean([forward_losses(model, b[:, :-1], b[:, 1:]).mean() for b in val_batches]))
                history["val_step"].append(step)
                history["val_loss"].append(val)
                info["val_loss"] = val
                log.info("[%d | %.2f] validation loss = %.4f", step, time.time() - start_time, val)
            if on_step is not None:
                on_step(info)
            if cfg.sample_every and step % cfg.sample_every == 0 and tokenizer is not None:
                write_samples(model, tokenizer, cfg, step, run_name)
            if cfg.save_every and step % cfg.save_every == 0:
                save()
            if stop.requested:
                break
        if step != saved_step:
            save()
    return dict(step=step, loss=loss, avg=avg[0] / avg[1] if avg[1] else float("nan"),
                history=history, interrupted=stop.requested, checkpoint=prefix)


def train(cfg, on_step=None):
    """Everything `npgpt2 train` does: restore the model (see restore()), load the tokenizer
    and datasets, and run fit() into <checkpoint_dir>/<run_name>. Returns fit()'s dict."""
    from .tokenizer import load_tokenizer
    if not cfg.dataset:
        raise Npgpt2Error("--dataset is required")
    run_dir = Path(cfg.checkpoint_dir) / cfg.run_name
    make_run_dir(run_dir)
    check_config(cfg, 1 << 30)  # flag ranges before anything slow; context checked again later
    model, state = restore(cfg, run_dir)
    tokenizer = load_tokenizer(model.source_dir)
    tokens = load_dataset(cfg.dataset, tokenizer, cfg.encoding, cfg.combine, "--dataset")
    val = load_dataset(cfg.val_dataset, tokenizer, cfg.encoding, cfg.combine, "--val_dataset") \
        if cfg.val_dataset else None
    if tokenizer.n_vocab != model.hparams["n_vocab"]:
        log.warning("the tokenizer has %d ids but the model %d; samples are off", tokenizer.n_vocab,
                    model.hparams["n_vocab"])
        tokenizer = None
    log.info("dataset: %d tokens%s", tokens.size, f", validation: {val.size} tokens" if val is not None else "")
    return fit(model, tokens, cfg, run_dir, tokenizer, val, state, on_step)
