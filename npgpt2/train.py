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
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np

from . import dist, early_stop, lora, optim, quant
from .data import Sampler, check_tokens, eval_windows, expand_paths
from .dist import SingleProcess  # noqa: F401  (re-exported: fit's default communicator)
from .errors import Npgpt2Error
from .fsutil import atomic_write
from .noise import STATE_KEY as NOISE_STATE_KEY
from .noise import check_noise, run_noise
from .sampling import check_sampling_args

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
    keep_crlf: bool = False        # text inputs: keep \r\n and \r (default: read them as \n)
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
    shared_stream: bool = False    # data-parallel test hook: rank r takes micro-batch r of one stream
    # memory and regularisation (nshepperd's flags): keep only each block's input and recompute
    # the block in the backward (same gradients, one more forward of the layers); replace each input token
    # by a uniformly random one with probability noise (the targets stay; noise.py)
    memory_saving_gradients: bool = False
    noise: float = 0.0
    # LoRA (lora.py): adapters of rank `lora` (0 = off: full fine-tune) on a frozen base
    lora: int = 0
    lora_alpha: float = None       # None = 2 * lora
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"
    dtype: str = "float32"         # the base's weights: float32, or int8 (only with --lora)
    # chat (issue 18): the loss mask of conversation datasets (chat_data.py) and early stopping (early_stop.py)
    train_on: str = None           # assistant | all; None = assistant when the dataset has a loss mask
    early_stop: int = 0            # stop when validation has not improved for N validations; 0 = off
    keep_best: bool = False        # keep the best validation checkpoint (model-best-<step>, best.json)


# ---------------------------------------------------------------- checking the config
def check_config(cfg, n_ctx):
    """Raise Npgpt2Error naming the flag for a value out of range; returns the context T."""
    positive = ["batch_size", "accumulate_gradients", "val_batch_size", "val_batch_count", "max_to_keep",
                "combine", "log_every", "sample_length"]
    non_negative = ["steps", "sample_every", "save_every", "val_every", "warmup", "lr_decay_steps",
                    "sample_num"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise Npgpt2Error(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise Npgpt2Error(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.learning_rate < math.inf:
        raise Npgpt2Error(f"--learning_rate must be a finite number > 0, got {cfg.learning_rate}")
    if not cfg.weight_decay >= 0:
        raise Npgpt2Error(f"--weight_decay must be >= 0, got {cfg.weight_decay}")
    if not cfg.grad_clip >= 0:
        raise Npgpt2Error(f"--grad_clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    lora.check_train_flags(cfg)
    check_sampling_args(top_k=cfg.top_k, top_p=cfg.top_p)
    check_noise(cfg.noise)
    if cfg.train_on is not None:
        optim.check_choice("--train_on", cfg.train_on, ["assistant", "all"])
    early_stop.check_flags(cfg)
    optim.check_choice("--optimizer", cfg.optimizer, list(optim.OPTIMIZERS))
    optim.check_choice("--lr_schedule", cfg.lr_schedule, optim.SCHEDULES)
    if not re.fullmatch(r"[\w.+-]+", cfg.run_name or "") or cfg.run_name in (".", ".."):
        # "." or ".." would put the run's files in --checkpoint_dir itself or its parent
        raise Npgpt2Error(f"--run_name must be a plain folder name (letters, digits, . _ + -; "
                          f"not . or ..), got {cfg.run_name!r}")
    return context_length(cfg.context, n_ctx)


def context_length(context, n_ctx):
    """The tokens per sequence that --context asks for (0 = the model's n_ctx), checked."""
    if context < 0:
        raise Npgpt2Error(f"--context must be >= 0 (0 = the model's n_ctx), got {context}")
    T = context or n_ctx
    if T > n_ctx:
        raise Npgpt2Error(f"--context {T} is longer than the model's n_ctx = {n_ctx}")
    return T


# ---------------------------------------------------------------- saving and restoring
def state_path(run_dir, step):
    return Path(run_dir) / f"train_state-{step}.npz"


def check_can_make(folder, what):
    """Raise Npgpt2Error unless `folder` is a folder or could be made (without making it):
    its nearest existing ancestor must be a writable folder."""
    folder = Path(folder)
    if folder.is_dir():
        if not os.access(folder, os.W_OK | os.X_OK):
            raise Npgpt2Error(f"{folder}: {what}: not writable")
        return
    parent = folder
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link: mkdir would fail on it
            raise Npgpt2Error(f"{parent}: {what}: a broken symbolic link")
        parent = parent.parent
    parent = parent if str(parent) else Path(".")
    if not parent.is_dir():
        raise Npgpt2Error(f"{parent}: {what}: not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Npgpt2Error(f"{parent}: {what}: permission denied")


def make_run_dir(run_dir):
    """Create the run folder, or say in one line why it cannot be (checked before training)."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Npgpt2Error(f"{run_dir}: cannot make the run folder (--checkpoint_dir/--run_name): "
                          f"{e.strerror or e}") from None


def save_run(model, run_dir, step, opt, sampler, avg, history, keep=None, extra=None, rank_samplers=None,
             noise_states=None, best=False):
    """Write train_state-<step>.npz, then model-<step> and the `checkpoint` file naming it.

    rank_samplers: in a data-parallel run, every rank's sampler state (rank 0's is `sampler`'s).
    noise_states: with --noise, every rank's noise.TokenNoise state.
    best: save the best validation checkpoint instead (early_stop.save_best: model-best-<step>).

    Removes train states whose model-<step> save_model pruned. Returns the model prefix.
    """
    from .model import save_model
    run_dir = Path(run_dir)
    make_run_dir(run_dir)

    def write_state(path):
        write_train_state(path, step, opt, sampler, avg, history, extra, rank_samplers, noise_states)
    if best:
        return early_stop.save_best(model, run_dir, step, write_state, history["val_loss"][-1])
    write_state(state_path(run_dir, step))
    save = save_model if model.lora is None else lora.save_adapters  # LoRA: the adapters, not the base
    prefix = save(model, run_dir, step=step, keep=keep)
    kept = {int(p.name[6:-6]) for p in run_dir.glob("model-*.index") if p.name[6:-6].isdigit()}
    for p in run_dir.glob("train_state-*.npz"):
        s = p.name[len("train_state-"):-len(".npz")]
        if s.isdigit() and int(s) not in kept:
            p.unlink()
    return prefix


def write_train_state(path, step, opt, sampler, avg, history, extra=None, rank_samplers=None, noise_states=None):
    """The optimizer's state, the sampler's, the noise's, the loss average and history, atomically to path."""
    arrays = {f"opt/{k}": v for k, v in opt.state_dict().items()}
    arrays.update({
        "format": np.array(STATE_FORMAT), "step": np.array(step, dtype=np.int64),
        "sampler": np.array(sampler.get_state()), "avg": np.array(avg, dtype=np.float64),
        "extra": np.array(json.dumps(extra or {})),
    })
    if rank_samplers is not None:
        arrays["rank_samplers"] = np.array(json.dumps(rank_samplers))
    if noise_states is not None:
        arrays[NOISE_STATE_KEY] = np.array(json.dumps(noise_states))
    for k, v in history.items():
        arrays[f"history/{k}"] = np.asarray(v, dtype=np.float64)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_train_state(run_dir, prefix):
    """The train state saved with checkpoint `prefix` (a `model-<step>` or `model-best-<step>`
    name): a dict of arrays; just {"step"} when the state file is missing; None for other names."""
    m = re.fullmatch(r"model-(best-)?(\d+)", Path(prefix).name)
    if not m:
        return None
    step = int(m.group(2))
    path = Path(run_dir) / f"train_state-{m.group(1) or ''}{step}.npz"
    if not path.exists():
        log.warning("%s: not found; starting the optimizer and batch order afresh", path)
        return {"step": np.array(step)}
    try:
        with np.load(path) as z:
            state = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise Npgpt2Error(f"{path}: unreadable train state ({e}); "
                          f"use --restore_from fresh or an older checkpoint") from None
    if int(state.get("format", -1)) != STATE_FORMAT or int(state["step"]) != step:
        raise Npgpt2Error(f"{path}: not a train state of format {STATE_FORMAT} for step {step}")
    state["_path"] = str(path)
    return state


def has_checkpoint(folder):
    return (Path(folder) / "checkpoint").is_file()


def restore(cfg, run_dir):
    """(model, train state or None) as --restore_from says: 'latest' continues the run (or
    starts from the base model when the run has no checkpoint), 'fresh' starts from the base
    model, 'best' continues the run from its best validation checkpoint (--keep_best), a PATH
    starts from that model folder."""
    from .model import load_model, resolve_model_dir
    run_dir = Path(run_dir)
    if cfg.restore_from == "best":
        prefix = early_stop.best_prefix(run_dir)
        model, state = load_model(run_dir, checkpoint=prefix), load_train_state(run_dir, prefix)
        log.info("restored %s at step %d (the best validation loss)", prefix, int(state["step"]))
        return model, state
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
    model = lora.prepare_training(load_model(source, dtype=cfg.dtype), cfg, source, run_dir)
    if cfg.dtype != "int8" and quant.read_quant_info(source) is not None:  # an int8 folder trains dequantised
        log.warning("%s: an int8 folder: training its weights dequantised to float32 (the 8-bit rounding stays "
                    "in them); the run is saved in float32", source)
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


def evaluate(model, tokens, context=None, batch_size=16, progress=None, mask=None):
    """Mean loss (nats per token) over every token of `tokens` after the first, each
    predicted once with up to `context` tokens before it in its window. Deterministic.
    progress(done, total) is called after each batch of windows. mask: a loss mask like
    tokens (chat_data.py): only the tokens where it is 1 are scored (still seen as context).
    Returns (mean loss, number of tokens scored)."""
    T = context or model.hparams["n_ctx"]
    windows = eval_windows(tokens.size, T)
    # each window's sum, added exactly at the end (math.fsum): the result does not depend on
    # how the windows were batched (a running float total rounds differently per batching)
    sums, count = [], 0
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        # windows of equal length go through together (only the last one can be shorter)
        for n in sorted({n for _, n in group}, reverse=True):
            starts = np.array([s for s, m in group if m == n])
            where = starts[:, None] + np.arange(n + 1)  # [W, n + 1] positions in the stream
            seqs = tokens[where].astype(np.int64)
            losses = forward_losses(model, seqs[:, :-1], seqs[:, 1:])  # [W, n]
            if mask is None:
                count += n * len(starts)
            else:
                scored = mask[where[:, 1:]]  # [W, n] the targets' mask
                losses = losses * scored
                count += int(scored.sum())
            sums.extend(losses.sum(axis=1))
        if progress:
            progress(min(i + batch_size, len(windows)), len(windows))
    return math.fsum(sums) / max(count, 1), count


# ---------------------------------------------------------------- Ctrl-C and SIGTERM
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; kill, systemd, batch schedulers


class StopFlag:
    """The first SIGINT or SIGTERM asks the loop to save and stop after the current step; a
    second one interrupts at once (KeyboardInterrupt). Only installed in the main thread."""

    def __init__(self, signals=STOP_SIGNALS):
        self.requested = False
        self.signals = signals
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s: saving after this step (again to quit without saving)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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
    """Refuse, with the figure, a --batch_size, --sample_num or validation set (--val_batch_size x
    --val_batch_count) whose arrays cannot fit in memory."""
    from .memory import check_memory, training_bytes
    from .sampling import check_batch_memory
    need = training_bytes(model.hparams, cfg.batch_size, T, model.dtype, cfg.memory_saving_gradients)
    check_memory(need, f"--batch_size {cfg.batch_size}",
                 "use a smaller --batch_size (with --accumulate_gradients for as many tokens per update)"
                 + ("" if cfg.memory_saving_gradients else ", or --memory_saving_gradients"))
    if cfg.val_every:
        from .memory import validation_bytes
        check_memory(validation_bytes(model.hparams, cfg.val_batch_size, cfg.val_batch_count, T, model.dtype),
                     f"--val_batch_size {cfg.val_batch_size} x --val_batch_count {cfg.val_batch_count}",
                     "use smaller validation batches or fewer of them")
    if cfg.sample_every and cfg.sample_num:
        check_batch_memory(model.hparams, cfg.sample_num, 1, cfg.sample_length, model.dtype, name="--sample_num")


# ---------------------------------------------------------------- one step
def trained_names(model, cfg):
    """The parameters the optimizer updates (--only_train_transformer_layers keeps wte, wpe, ln_f;
    a model with LoRA adapters trains them alone)."""
    if model.lora is not None:
        return list(model.lora.params)
    return [k for k in model.params if "/h" in k] if cfg.only_train_transformer_layers else list(model.params)


def make_run_optimizer(model, names, cfg):
    """cfg.optimizer over `names`; weight decay on matrices only (not biases and gains)."""
    params = model.lora.params if model.lora is not None else model.params  # LoRA: the adapters alone
    decay = {k: (cfg.weight_decay if params[k].ndim >= 2 else 0.0) for k in names}
    return optim.make_optimizer(cfg.optimizer, {k: params[k] for k in names}, cfg.learning_rate, decay)


def batch_gradients(model, sampler, names, batch_size, micro_batches, noise=None, memory_saving=False):
    """(mean loss, {name: mean gradient}, weight) over `micro_batches` batches drawn from sampler.

    With a loss mask the mean is over the masked target positions of all micro-batches
    together: each micro-batch's own masked mean weighted by its count of them. weight is
    that count (what dist's allreduce_mean weights the ranks by), None without a mask.
    noise: a noise.TokenNoise for the inputs (--noise); memory_saving: --memory_saving_gradients.
    """
    total, loss, weight = None, 0.0, 0
    for _ in range(micro_batches):
        batch, mask = sampler.sample_masked(batch_size)                     # [B, T+1], [B, T] or None
        inputs = batch[:, :-1] if noise is None else noise.apply(batch[:, :-1])  # [B, T]; targets as sampled
        micro_loss, grads = model.loss_and_grads(inputs, batch[:, 1:], mask=mask, memory_saving=memory_saving)
        w = 1 if mask is None else int(mask.sum())  # the caller's mean over positions: each weighs 1
        loss, weight = loss + micro_loss * w, weight + w
        if micro_batches > 1:
            optim.scale_(grads, w)
        if total is None:
            # copied when more micro-batches follow: loss_and_grads may reuse its buffers
            total = {k: grads[k] if micro_batches == 1 else grads[k].copy() for k in names}
        else:
            optim.accumulate(total, grads, names)
        del grads
    scale = 1.0 if micro_batches == 1 else 1.0 / weight
    return loss / weight, optim.scale_(total, scale), None if mask is None else weight


def train_step(model, opt, sampler, names, cfg, lr, step, comm, noise=None):
    """One update (number step + 1): gradients, all-reduce, clip, optimizer step.

    Raises Npgpt2Error, before anything is saved, when the loss, the gradients or the updated
    weights are not finite. Returns (loss, gradient norm before clipping).
    """
    # an overflow or NaN is reported below in one line: NumPy's warnings would only repeat it
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        loss, grads, weight = batch_gradients(model, sampler, names, cfg.batch_size, cfg.accumulate_gradients,
                                              noise, cfg.memory_saving_gradients)
        loss = comm.allreduce_mean(grads, loss, weight)
        hint = f"lower --learning_rate (now {cfg.learning_rate}) or raise --warmup"
        if not math.isfinite(loss):
            raise Npgpt2Error(f"loss became {loss} at step {step + 1}; {hint}")
        grad_norm = optim.clip_grad_norm(grads, cfg.grad_clip)
        if not math.isfinite(grad_norm):
            raise Npgpt2Error(f"the gradients' norm became {grad_norm} at step {step + 1}; {hint}")
        opt.step(grads, lr)
        if not optim.all_finite(opt.params):
            raise Npgpt2Error(f"the update at step {step + 1} (learning rate {lr}) made the weights non-finite; "
                              f"nothing was saved from it; {hint}")
    return loss, grad_norm


# ---------------------------------------------------------------- the run
class Progress:
    """What a run carries from step to step and saves in its train state: the step count,
    OpenAI's decaying loss average (numerator, denominator) and the loss history."""

    def __init__(self, step=0, avg=(0.0, 0.0), history=None):
        self.step, self.avg = step, avg
        self.history = history or {"step": [], "loss": [], "val_step": [], "val_loss": []}

    @classmethod
    def resume(cls, state, opt, sampler, comm=None, seed=0):
        """Progress from a train state (restore()), loading opt and sampler; fresh for None.

        In a data-parallel run each rank takes its own saved sampler state; a run saved by a
        different number of processes resumes weights and optimizer, with new batch streams.
        """
        if state is None:
            return cls()
        if "sampler" not in state:  # weights without a train state: keep counting from their step
            return cls(int(state["step"]))
        comm = comm or SingleProcess()
        opt.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("opt/")}, state["_path"])
        saved = (json.loads(str(state["rank_samplers"])) if "rank_samplers" in state
                 else [str(state["sampler"])])
        if len(saved) == comm.world_size:
            sampler.set_state(saved[comm.rank])
        else:
            if comm.is_main:
                log.warning("the run was saved by %d process(es) and continues with %d: weights and optimizer "
                            "state resume, but the order of the batches changes", len(saved), comm.world_size)
            fresh = np.random.default_rng([seed, int(state["step"]), comm.rank])
            sampler.set_state(json.dumps(fresh.bit_generator.state))
        history = {k: state[f"history/{k}"].tolist() for k in ("step", "loss", "val_step", "val_loss")}
        return cls(int(state["step"]), tuple(float(x) for x in state["avg"]), history)

    def record(self, loss):
        self.step += 1
        self.avg = (self.avg[0] * 0.99 + loss, self.avg[1] * 0.99 + 1)
        self.history["step"].append(self.step)
        self.history["loss"].append(loss)

    def record_val(self, val):
        self.history["val_step"].append(self.step)
        self.history["val_loss"].append(val)

    @property
    def mean(self):
        return self.avg[0] / self.avg[1] if self.avg[1] else float("nan")


class Checkpointer:
    """Saves the run into run_dir (nowhere when None) and remembers the last step saved."""

    def __init__(self, model, run_dir, opt, sampler, cfg, extra, step, comm=None, noise=None, template=None):
        self.model, self.run_dir, self.opt, self.sampler, self.noise = model, run_dir, opt, sampler, noise
        self.cfg, self.extra = cfg, extra
        self.comm = comm or SingleProcess()
        self.saved_step, self.prefix = step, None
        self.template = template  # the chat template of a conversation dataset: <run>/chat.json

    def save(self, progress, best=False):
        """Every rank calls it (it gathers their sampler states); only a rank with a run_dir writes.
        best: the best validation checkpoint (early_stop.py) instead of model-<step>."""
        states = self.comm.gather(self.sampler.get_state())
        noise_states = self.comm.gather(self.noise.get_state()) if self.noise is not None else None
        if self.run_dir is not None:
            if self.template is not None:
                from .chat import write_template
                make_run_dir(self.run_dir)
                write_template(self.run_dir, self.template)
            prefix = save_run(self.model, self.run_dir, progress.step, self.opt, self.sampler, progress.avg,
                              progress.history, self.cfg.max_to_keep, self.extra,
                              rank_samplers=states if self.comm.world_size > 1 else None,
                              noise_states=noise_states, best=best)
            if best:
                return
            self.prefix = prefix
            log.info("saved %s", self.prefix)
            if self.cfg.plot:
                from .plot import plot_losses
                plot_losses(progress.history, Path(self.run_dir) / "loss.png", title=Path(self.run_dir).name)
        self.saved_step = progress.step


def validation_batches(cfg, tokens, val_tokens, T, n_vocab, val_mask=None):
    """The fixed validation batches (OpenAI's train.py draws them once, with seed 1): a list of
    (tokens (B, T+1), the targets' loss mask (B, T) or None)."""
    if not cfg.val_every:
        return []
    vt = val_tokens if val_tokens is not None else tokens
    check_tokens(vt, n_vocab, T, cfg.val_dataset or cfg.dataset or "dataset", "--val_dataset")
    vs = Sampler(vt, T + 1, seed=1, mask=val_mask)
    return [vs.sample_masked(cfg.val_batch_size) for _ in range(cfg.val_batch_count)]


def validate(model, batches):
    """Mean loss over the validation batches; with masks, over all their masked positions."""
    losses = [(forward_losses(model, b[:, :-1], b[:, 1:]), m) for b, m in batches]
    if batches[0][1] is None:
        return float(np.mean([x.mean() for x, _ in losses]))
    return float(sum((x * m).sum() for x, m in losses) / sum(m.sum() for _, m in losses))


def samples_or_save(model, tokenizer, cfg, progress, run_name, checkpointer):
    """write_samples; when that fails, save the run first, then stop with a one-line error."""
    try:
        write_samples(model, tokenizer, cfg, progress.step, run_name)
    except (OSError, Npgpt2Error) as e:
        checkpointer.save(progress)
        what = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        raise Npgpt2Error(f"cannot write samples at step {progress.step} ({what}); the run was saved "
                          f"at that step (check --sample_dir, or --sample_every 0)") from None


def fit(model, tokens, cfg, run_dir=None, tokenizer=None, val_tokens=None, state=None, on_step=None,
        comm=None, mask=None, val_mask=None, template=None):
    """Train `model` in place on the 1-D token array `tokens` as `cfg` says.

    run_dir: where checkpoints go (None = nowhere). state: a train state from restore()
    to continue from. on_step(info) is called after every update with a dict: step,
    loss, avg, secs, tok_s, lr, grad_norm (and val_loss when validated). comm: the
    communicator of a data-parallel run (default SingleProcess()). mask, val_mask: loss
    masks like tokens and val_tokens (chat_data.py; None = every token is a target); template:
    the chat template to record in <run_dir>/chat.json.
    Returns a dict: step, loss, avg, history, interrupted, early_stopped, checkpoint (last prefix saved).
    """
    comm = comm or SingleProcess()
    T = check_config(cfg, model.hparams["n_ctx"])
    if model.weight_dtype == "int8" and model.lora is None:  # before any optimizer state
        raise Npgpt2Error("training an int8 model: its weights are for generation only; load it as float32 "
                          "(the default, which dequantises an int8 folder) to train it, or train LoRA adapters on it")
    check_tokens(tokens, model.hparams["n_vocab"], T, cfg.dataset or "dataset")
    if mask is not None and not mask.any():
        raise Npgpt2Error(f"{cfg.dataset or 'dataset'}: the loss mask has no 1s: no token to train on "
                          f"(--train_on all trains on every token)")
    check_train_memory(model, cfg, T)
    names = trained_names(model, cfg)
    opt = make_run_optimizer(model, names, cfg)
    seed = cfg.seed if cfg.seed is not None else int(np.random.SeedSequence().entropy % (1 << 63))
    seed = comm.bcast(seed)  # one --seed for the run; each rank's stream is derived from it
    if cfg.shared_stream:
        sampler = dist.RankSlice(Sampler(tokens, T + 1, seed, mask), comm.rank, comm.world_size)
    else:
        sampler = Sampler(tokens, T + 1, dist.rank_seed(seed, comm.rank), mask)
    progress = Progress.resume(state, opt, sampler, comm, seed)
    noise = run_noise(cfg.noise, model.hparams["n_vocab"], seed, comm, state)
    if (state is None or "sampler" not in state) and comm.is_main:
        log.info("batch order seed %d", seed)
    val_batches = (validation_batches(cfg, tokens, val_tokens, T, model.hparams["n_vocab"],
                                      val_mask if val_tokens is not None else mask) if comm.is_main else [])
    end = progress.step + cfg.steps if cfg.steps else None
    decay_steps = cfg.lr_decay_steps or (end or 0)
    run_name = Path(run_dir).name if run_dir is not None else cfg.run_name
    tokens_per_step = cfg.batch_size * T * cfg.accumulate_gradients * comm.world_size
    extra = {"config": dataclasses.asdict(cfg), "seed": seed}
    checkpointer = Checkpointer(model, run_dir if comm.is_main else None, opt, sampler, cfg, extra, progress.step,
                                comm, noise, template)
    keeper = early_stop.BestKeeper(cfg, comm)
    ranks = f" ranks={comm.world_size}" if comm.world_size > 1 else ""
    loss, start_time, stopped, early = float("nan"), time.time(), False, False

    with StopFlag(dist.stop_signals(comm)) as stop:
        while end is None or progress.step < end:
            lr = optim.learning_rate(progress.step, cfg.learning_rate, cfg.warmup, cfg.lr_schedule,
                                     decay_steps, cfg.min_lr_ratio)
            t0 = time.time()
            loss, grad_norm = train_step(model, opt, sampler, names, cfg, lr, progress.step, comm, noise)
            progress.record(loss)
            secs = time.time() - t0
            info = dict(step=progress.step, loss=loss, avg=progress.mean, secs=secs, lr=lr,
                        tok_s=tokens_per_step / max(secs, 1e-9), grad_norm=grad_norm)
            step = progress.step
            if step % cfg.log_every == 0 and comm.is_main:
                log.info("[%d | %.2f] loss=%.4f avg=%.4f tok/s=%.0f%s", step, time.time() - start_time,
                         loss, info["avg"], info["tok_s"], ranks)
            if val_batches and step % cfg.val_every == 0:
                info["val_loss"] = validate(model, val_batches)
                progress.record_val(info["val_loss"])
                log.info("[%d | %.2f] validation loss = %.4f", step, time.time() - start_time, info["val_loss"])
            if cfg.val_every and step % cfg.val_every == 0 and (cfg.early_stop or cfg.keep_best):
                early = keeper.after_validation(progress, checkpointer)  # every rank
            if on_step is not None:
                on_step(info)
            if cfg.sample_every and step % cfg.sample_every == 0 and tokenizer is not None and comm.is_main:
                samples_or_save(model, tokenizer, cfg, progress, run_name, checkpointer)
            if cfg.save_every and step % cfg.save_every == 0:
                checkpointer.save(progress)
            if early:
                break
            if comm.any(stop.requested):  # every rank stops after the same step
                stopped = True
                break
        if progress.step != checkpointer.saved_step:
            checkpointer.save(progress)
    return dict(step=progress.step, loss=loss, avg=progress.mean, history=progress.history,
                interrupted=stopped, early_stopped=early, checkpoint=checkpointer.prefix)


def check_inputs(cfg):
    """Everything about the run that can be checked before the (slow) model load: flag ranges,
    that the datasets exist, that the run and sample folders can be made. Returns the run folder."""
    if not cfg.dataset:
        raise Npgpt2Error("--dataset is required")
    check_config(cfg, 1 << 30)  # the context is checked against n_ctx once the model is known
    expand_paths(cfg.dataset, "--dataset")
    if cfg.val_dataset:
        expand_paths(cfg.val_dataset, "--val_dataset")
    run_dir = Path(cfg.checkpoint_dir) / cfg.run_name
    # checked now, made when the first checkpoint or sample is written: a run that fails
    # before that leaves no empty folders behind
    check_can_make(run_dir, "cannot make the run folder (--checkpoint_dir/--run_name)")
    if cfg.sample_every:
        check_can_make(Path(cfg.sample_dir) / run_dir.name, "cannot make the samples folder (--sample_dir)")
    return run_dir


def train(cfg, on_step=None, comm=None):
    """Everything `npgpt2 train` does: restore the model (see restore()), load the tokenizer
    and datasets, and run fit() into <checkpoint_dir>/<run_name>. Returns fit()'s dict.

    comm: a data-parallel run's communicator (dist.get_comm()). Only rank 0 reads files:
    the others receive the model, the train state and the tokens from it (share_run), so
    the other machines of a run need npgpt2 but neither the model nor the dataset.
    """
    from .chat_data import load_training_data
    from .tokenizer import load_tokenizer
    comm = comm or SingleProcess()
    if cfg.lora and comm.world_size > 1:
        raise Npgpt2Error("--lora: not supported under mpirun yet; train LoRA adapters in one process")
    model = state = tokens = val = tokenizer = run_dir = mask = val_mask = template = None
    if comm.is_main:
        run_dir = check_inputs(cfg)
        model, state = restore(cfg, run_dir)
        tokenizer = load_tokenizer(model.source_dir)
        tokens, mask, val, val_mask, template = load_training_data(cfg, tokenizer, model.source_dir)
        if tokenizer.n_vocab != model.hparams["n_vocab"]:
            log.warning("the tokenizer has %d ids but the model %d; samples are off", tokenizer.n_vocab,
                        model.hparams["n_vocab"])
            tokenizer = None
        log.info("dataset: %d tokens%s", tokens.size,
                 f", validation: {val.size} tokens" if val is not None else "")
    if comm.world_size > 1:
        model, state, tokens, mask = share_run(comm, model, state, tokens, mask)
    return fit(model, tokens, cfg, run_dir, tokenizer, val, state, on_step, comm, mask, val_mask, template)


def share_run(comm, model, state, tokens, mask=None):
    """Rank 0's model, train state (or None), training tokens and loss mask (or None), on every rank."""
    from .model import GPT2
    meta = comm.bcast(None if not comm.is_main else {
        "hparams": model.hparams,
        "state": None if state is None else {k: v for k, v in state.items() if not isinstance(v, np.ndarray)},
        "state_arrays": state is not None})
    params = comm.bcast_arrays(dict(model.params) if comm.is_main else None)
    arrays = comm.bcast_arrays(None if not comm.is_main else {
        "tokens": tokens, **({"loss_mask": mask} if mask is not None else {}),
        **({k: v for k, v in state.items() if isinstance(v, np.ndarray)} if state else {})})
    if comm.is_main:
        return model, state, tokens, mask
    tokens, mask = arrays.pop("tokens"), arrays.pop("loss_mask", None)
    state = None if meta["state"] is None else {**meta["state"], **arrays}
    return GPT2(meta["hparams"], params), state, tokens, mask
