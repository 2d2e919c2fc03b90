"""The training loop end to end: loss falls, run folders load like released models, resume is
exact, Ctrl-C saves, errors are one line; evaluation against HF's loss; the demo learns.

Models: tests/fixtures/tiny (vocab 96, token data built directly) and tests/fixtures/full
(GPT-2's real vocabulary, width 8), both written by real TensorFlow.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import npgpt2
from npgpt2.errors import Npgpt2Error
from npgpt2.train import TrainConfig, evaluate, fit, forward_losses, restore, train

FIX = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent
STEP_LINE = re.compile(r"\[(\d+) \| [\d.]+\] loss=([\d.]+) avg=([\d.]+) tok/s=\d+")


def run_cli(*args, stdin=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO), NPGPT2_PLAIN="1")
    return subprocess.run([sys.executable, "-m", "npgpt2.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env)


def tiny_tokens(n=4000, seed=0):
    """A learnable stream for the 96-token model: a repeating pattern with some noise."""
    rng = np.random.default_rng(seed)
    t = np.tile(np.arange(40, dtype=np.uint16), n // 40 + 1)[:n]
    noise = rng.random(n) < 0.05
    t[noise] = rng.integers(0, 96, noise.sum())
    return t


def tiny_cfg(tmp_path, **kw):
    base = dict(models_dir=str(FIX), model_name="tiny", checkpoint_dir=str(tmp_path / "checkpoint"),
                run_name="r", context=8, batch_size=2, learning_rate=1e-2, seed=5, sample_every=0,
                save_every=0, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def run_fit(cfg, tokens, val=None):
    run_dir = Path(cfg.checkpoint_dir) / cfg.run_name
    model, state = restore(cfg, run_dir)
    return fit(model, tokens, cfg, run_dir, val_tokens=val, state=state)


# ---------------------------------------------------------------- in process
def test_resume_is_exact(tmp_path):
    """N steps, stop, resume, N steps == 2N steps straight (Adam moments, batch order, step,
    running average and history all restored)."""
    tokens, val = tiny_tokens(), tiny_tokens(500, seed=1)
    kw = dict(accumulate_gradients=2, val_every=2, val_batch_count=2, lr_schedule="cosine",
              warmup=2, lr_decay_steps=8, weight_decay=0.1, max_to_keep=2)
    straight = run_fit(tiny_cfg(tmp_path, run_name="straight", steps=8, **kw), tokens, val)
    first = run_fit(tiny_cfg(tmp_path, run_name="split", steps=4, **kw), tokens, val)
    assert first["step"] == 4
    second = run_fit(tiny_cfg(tmp_path, run_name="split", steps=4, **kw), tokens, val)
    assert second["step"] == 8
    assert second["history"]["loss"] == straight["history"]["loss"]
    assert second["history"]["val_loss"] == straight["history"]["val_loss"]
    assert second["avg"] == straight["avg"]
    a = npgpt2.load_model(tmp_path / "checkpoint" / "straight")
    b = npgpt2.load_model(tmp_path / "checkpoint" / "split")
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    # the loss really changes, so equal histories mean something
    assert len(set(straight["history"]["loss"])) == 8
    # keep=2: model-4 and model-8 remain in "split", each with its train state
    names = sorted(os.listdir(tmp_path / "checkpoint" / "split"))
    assert [n for n in names if n.startswith("train_state")] == ["train_state-4.npz", "train_state-8.npz"]


def test_loss_falls_and_only_transformer_layers(tmp_path):
    tokens = tiny_tokens()
    before = npgpt2.load_model(FIX / "tiny")
    r = run_fit(tiny_cfg(tmp_path, steps=30, only_train_transformer_layers=True, optimizer="sgd",
                         learning_rate=0.3, batch_size=4), tokens)
    losses = r["history"]["loss"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    after = npgpt2.load_model(tmp_path / "checkpoint" / "r")
    for k in before.params:
        same = np.array_equal(before.params[k], after.params[k])
        assert same == (k in ("model/wte", "model/wpe", "model/ln_f/g", "model/ln_f/b")), k


def test_restore_latest_falls_back_and_fresh_refuses_to_mix(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=1)
    model, state = restore(cfg, tmp_path / "checkpoint" / "r")  # no run yet: the base model
    assert state is None and Path(model.source_dir) == FIX / "tiny"
    run_fit(cfg, tiny_tokens())
    model, state = restore(cfg, tmp_path / "checkpoint" / "r")
    assert int(state["step"]) == 1 and Path(model.source_dir) == tmp_path / "checkpoint" / "r"
    with pytest.raises(Npgpt2Error, match="already holds a run"):
        restore(tiny_cfg(tmp_path, restore_from="fresh"), tmp_path / "checkpoint" / "r")
    with pytest.raises(Npgpt2Error, match="model folder not found"):
        restore(tiny_cfg(tmp_path, model_name="nope"), tmp_path / "checkpoint" / "other")
    # weights whose train state is gone: training goes on from their step number
    (tmp_path / "checkpoint" / "r" / "train_state-1.npz").unlink()
    r = run_fit(tiny_cfg(tmp_path, steps=2), tiny_tokens())
    assert r["step"] == 3 and r["history"]["step"] == [2, 3]


def test_one_line_errors(tmp_path):
    tok = tmp_path / "short.npz"
    np.savez(tok, np.arange(8, dtype=np.uint16))
    with pytest.raises(Npgpt2Error, match=r"8 tokens, fewer than --context \+ 1 = 9"):
        train(tiny_cfg(tmp_path, dataset=str(tok), steps=1))
    with pytest.raises(Npgpt2Error, match="--context 99 is longer than the model's n_ctx = 16"):
        train(tiny_cfg(tmp_path, dataset=str(tok), steps=1, context=99))
    with pytest.raises(Npgpt2Error, match="--accumulate_gradients must be >= 1"):
        train(tiny_cfg(tmp_path, dataset=str(tok), accumulate_gradients=0))


def test_forward_losses_match_hf():
    """The loss used by eval/validation against HF's float32 and float64 loss."""
    ref = np.load(FIX / "tiny_reference.npz")
    for dtype, key, tol in [(np.float64, "loss_f64", 1e-12), (np.float32, "loss_f32", 1e-6)]:
        model = npgpt2.load_model(FIX / "tiny", dtype=dtype)
        losses = forward_losses(model, ref["tokens"], ref["targets"])
        assert float(losses.mean()) == pytest.approx(float(ref[key]), rel=tol)


def test_evaluate_covers_every_token_deterministically():
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    tokens = tiny_tokens(50)
    loss, n = evaluate(model, tokens, context=16, batch_size=2)
    assert n == 49
    # by hand: windows [0..16], [16..32], [32..48], [48..49]
    per = [forward_losses(model, tokens[None, s:s + m].astype(np.int64), tokens[None, s + 1:s + m + 1].astype(np.int64))
           for s, m in [(0, 16), (16, 16), (32, 16), (48, 1)]]
    assert loss == pytest.approx(sum(p.sum() for p in per) / 49, rel=1e-12)
    assert evaluate(model, tokens, context=16, batch_size=3) == (loss, n)


def test_plot_written_when_matplotlib_present(tmp_path):
    pytest.importorskip("matplotlib")
    run_fit(tiny_cfg(tmp_path, steps=3, plot=True), tiny_tokens())
    png = tmp_path / "checkpoint" / "r" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_quick_learns():
    from npgpt2.demo import run_demo
    r = run_demo(quick=True, steps=30, sample_num=1, sample_length=8)
    vocab = r["hparams"]["n_vocab"]
    assert 19000 < vocab < 20000 and 7.0 < r["unigram_entropy"] < 7.5
    # from a uniform guess (ln V = 9.9) most of the way down to the unigram entropy in 30 steps
    assert r["val_loss"] < np.log(vocab) - 1.2
    assert r["history"]["loss"][-1] < r["history"]["loss"][0] - 1.0
    assert len(r["samples"]) == 1 and r["samples"][0].startswith("hacker:")


# ---------------------------------------------------------------- the CLI, as a user runs it
def test_cli_encode_train_prompt_eval(tmp_path):
    text = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 3
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    r = run_cli("encode", tmp_path / "corpus.txt", tmp_path / "corpus.npz",
                "--models_dir", FIX, "--model_name", "full")
    assert r.returncode == 0, r.stderr
    assert re.search(r"Wrote \d+ tokens from 1 file", r.stdout)

    r = run_cli("train", "--dataset", tmp_path / "corpus.npz", "--models_dir", FIX, "--model_name", "full",
                "--checkpoint_dir", tmp_path / "checkpoint", "--run_name", "fox", "--steps", 12,
                "--context", 32, "--batch_size", 4, "--learning_rate", 0.03, "--sample_every", 12,
                "--sample_length", 6, "--sample_num", 2, "--sample_dir", tmp_path / "samples", "--seed", 1)
    assert r.returncode == 0, r.stderr
    losses = [float(m.group(2)) for m in STEP_LINE.finditer(r.stderr)]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    assert "Done at step 12" in r.stdout
    samples = (tmp_path / "samples" / "fox" / "samples-12").read_text(encoding="utf-8")
    assert samples.startswith("======== SAMPLE 1 ========\n") and "======== SAMPLE 2 ========" in samples

    run = tmp_path / "checkpoint" / "fox"
    assert {"hparams.json", "encoder.json", "vocab.bpe", "checkpoint", "model-12.index",
            "model-12.data-00000-of-00001", "train_state-12.npz"} <= set(os.listdir(run))
    model = npgpt2.load_model(run)
    base = npgpt2.load_model(FIX / "full")
    assert not np.array_equal(model.params["model/h0/mlp/c_fc/w"], base.params["model/h0/mlp/c_fc/w"])

    r = run_cli("prompt", "--models_dir", tmp_path / "checkpoint", "--model_name", "fox", "--length", 5,
                "--seed", 3, stdin="The quick\n")
    assert r.returncode == 0, r.stderr
    assert "SAMPLE 1" in r.stdout

    r = run_cli("eval", "--dataset", tmp_path / "corpus.txt", "--models_dir", tmp_path / "checkpoint",
                "--model_name", "fox", "--context", 32)
    assert r.returncode == 0, r.stderr
    fine = float(re.search(r"loss ([\d.]+) nats/token", r.stdout).group(1))
    r = run_cli("eval", "--dataset", tmp_path / "corpus.npz", "--models_dir", FIX, "--model_name", "full",
                "--context", 32)
    before = float(re.search(r"loss ([\d.]+) nats/token", r.stdout).group(1))
    assert fine < before - 0.5


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 " * 10)
    r = run_cli("encode", tmp_path / "latin.txt", tmp_path / "o.npz", "--models_dir", FIX, "--model_name", "full")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "latin.txt: not valid utf-8 text at byte 3" in r.stderr
    r = run_cli("train", "--dataset", tmp_path / "latin.txt", "--models_dir", tmp_path, "--model_name", "gone")
    assert r.returncode == 2 and "model folder not found" in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_cli_output_and_flag_mistakes_are_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "out").mkdir()
    r = run_cli("encode", tmp_path / "a.txt", tmp_path / "out", "--models_dir", FIX, "--model_name", "full")
    assert r.returncode == 2 and "out: is a folder" in r.stderr and "Traceback" not in r.stderr
    common = ["--dataset", tmp_path / "a.txt", "--models_dir", FIX, "--model_name", "full", "--steps", "1",
              "--context", "8"]
    r = run_cli("train", *common, "--checkpoint_dir", FIX / "full" / "hparams.json")
    assert r.returncode == 2 and "cannot make the run folder" in r.stderr and "Traceback" not in r.stderr
    assert not STEP_LINE.search(r.stderr)  # refused before any training
    r = run_cli("train", *common, "--checkpoint_dir", tmp_path / "ck", "--grad_clip", "-1")
    assert r.returncode == 2 and "--grad_clip must be >= 0" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_saves_a_loadable_checkpoint(tmp_path, sig):
    """Ctrl-C, and SIGTERM (kill, systemd, schedulers), save after the current step and exit 0."""
    np.savez(tmp_path / "tok.npz", tiny_tokens())
    env = dict(os.environ, PYTHONPATH=str(REPO), NPGPT2_PLAIN="1")
    proc = subprocess.Popen([sys.executable, "-m", "npgpt2.cli", "train", "--dataset", str(tmp_path / "tok.npz"),
                             "--models_dir", str(FIX), "--model_name", "tiny", "--checkpoint_dir",
                             str(tmp_path / "ck"), "--run_name", "r", "--steps", "0", "--context", "8",
                             "--sample_every", "0", "--save_every", "0", "--seed", "2"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        seen = 0
        deadline = time.time() + 60
        for line in proc.stderr:  # wait until it is really training
            seen += bool(STEP_LINE.search(line))
            if seen >= 3 or time.time() > deadline:
                break
        assert seen >= 3
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"{sig.name}: saving after this step" in err
    step = int(re.search(r"Interrupted at step (\d+)", out).group(1))
    assert step >= 3
    run = tmp_path / "ck" / "r"
    model = npgpt2.load_model(run)
    assert model.hparams["n_vocab"] == 96
    assert (run / f"train_state-{step}.npz").exists() and (run / f"model-{step}.index").exists()
    _, state = restore(tiny_cfg(tmp_path, checkpoint_dir=str(tmp_path / "ck")), run)
    assert int(state["step"]) == step


# ---------------------------------------------------------------- crash safety and stopping
class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even atomic_write's cleanup."""


def kill_at(monkeypatch, k):
    """Make the k-th os.replace / os.unlink call (and every file operation after it) die."""
    calls = [0]
    real = {"replace": os.replace, "unlink": os.unlink}

    def wrap(name):
        def op(*a, **kw):
            calls[0] += 1
            if calls[0] >= k:
                raise Killed(f"killed at file operation {calls[0]} ({name})")
            return real[name](*a, **kw)
        return op
    for name in real:
        monkeypatch.setattr(os, name, wrap(name))
    return calls


def named_checkpoint_is_complete(run):
    """The `checkpoint` file names a model-<step> whose index and data exist (no fallback)."""
    text = (run / "checkpoint").read_text()
    name = re.search(r'model_checkpoint_path: "([^"]+)"', text).group(1)
    return (run / f"{name}.index").is_file() and (run / f"{name}.data-00000-of-00001").is_file()


def test_a_kill_at_any_file_operation_of_a_save_leaves_an_exactly_resumable_run(tmp_path, monkeypatch):
    """--save_every 1 --max_to_keep 1: kill the save of step 3 at each of its file operations;
    the `checkpoint` file still names a complete checkpoint, and resuming to step 4 gives the
    weights of an uninterrupted run, bit for bit."""
    tokens = tiny_tokens()
    kw = dict(save_every=1, max_to_keep=1)
    run_fit(tiny_cfg(tmp_path, run_name="straight", steps=4, **kw), tokens)
    want = npgpt2.load_model(tmp_path / "checkpoint" / "straight").params
    k = 1
    while True:
        name = f"k{k}"
        run = tmp_path / "checkpoint" / name
        run_fit(tiny_cfg(tmp_path, run_name=name, steps=2, **kw), tokens)
        with monkeypatch.context() as m:
            kill_at(m, k)
            try:
                run_fit(tiny_cfg(tmp_path, run_name=name, steps=1, **kw), tokens)
                finished = True
            except Killed:
                finished = False
        assert named_checkpoint_is_complete(run), f"killed at operation {k}"
        cfg = tiny_cfg(tmp_path, run_name=name, **kw)
        model, state = restore(cfg, run)
        done = int(state["step"])
        assert done in (2, 3)
        cfg.steps = 4 - done
        fit(model, tokens, cfg, run, state=state)
        got = npgpt2.load_model(run).params
        assert all(np.array_equal(got[p], want[p]) for p in want), f"killed at operation {k}"
        if finished:
            break
        k += 1
    assert k >= 6  # the save really went through its writes, pointing and pruning


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    from npgpt2.checkpoint import latest_checkpoint
    run_fit(tiny_cfg(tmp_path, steps=3, save_every=1, max_to_keep=3), tiny_tokens())
    run = tmp_path / "checkpoint" / "r"
    for f in run.glob("model-3.*"):
        f.unlink()
    (run / "model-2.data-00000-of-00001").unlink()  # model-2 is incomplete too
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(run) == str(run / "model-1")
    assert "names checkpoint 'model-3', which is missing" in caplog.text
    model, state = restore(tiny_cfg(tmp_path), run)
    assert int(state["step"]) == 1


def test_run_name_dot_and_dotdot_are_refused(tmp_path):
    for bad in (".", "..", "a/b", ""):
        with pytest.raises(Npgpt2Error, match="--run_name must be a plain folder name"):
            train(tiny_cfg(tmp_path, dataset="x.npz", run_name=bad, steps=1))
    assert not (tmp_path / "checkpoint").exists()


def test_non_finite_training_stops_before_saving(tmp_path, monkeypatch):
    np.savez(tmp_path / "tok.npz", tiny_tokens())
    with pytest.raises(Npgpt2Error, match="--learning_rate must be a finite number > 0, got inf"):
        train(tiny_cfg(tmp_path, dataset=str(tmp_path / "tok.npz"), learning_rate=float("inf")))
    # a finite learning rate whose SGD update overflows float32
    cfg = tiny_cfg(tmp_path, steps=3, save_every=1, optimizer="sgd", learning_rate=1e300, grad_clip=0)
    with pytest.raises(Npgpt2Error, match=r"the update at step 1 .* made the weights non-finite"):
        run_fit(cfg, tiny_tokens())
    assert not (tmp_path / "checkpoint" / "r" / "checkpoint").exists()
    # gradients that are NaN while the loss is finite (after a good step 1 is saved)
    run_fit(tiny_cfg(tmp_path, run_name="g", steps=1, save_every=1), tiny_tokens())
    from npgpt2.model import GPT2
    real = GPT2.loss_and_grads

    def nan_grads(self, inputs, targets, **kw):
        loss, grads = real(self, inputs, targets, **kw)
        grads["model/wte"][0, 0] = np.nan
        return loss, grads
    monkeypatch.setattr(GPT2, "loss_and_grads", nan_grads)
    with pytest.raises(Npgpt2Error, match="the gradients' norm became nan at step 2"):
        run_fit(tiny_cfg(tmp_path, run_name="g", steps=2, save_every=1), tiny_tokens())
    run = tmp_path / "checkpoint" / "g"
    assert sorted(p.name for p in run.glob("model-*.index")) == ["model-1.index"]
    assert all(np.isfinite(v).all() for v in npgpt2.load_model(run).params.values())


def test_a_failure_writing_samples_saves_first(tmp_path, monkeypatch):
    import npgpt2.train as train_mod

    def broken(model, tokenizer, cfg, step, run_name):
        raise PermissionError(13, "Permission denied", str(tmp_path / "samples" / "r" / f"samples-{step}"))
    monkeypatch.setattr(train_mod, "write_samples", broken)
    cfg = tiny_cfg(tmp_path, steps=5, sample_every=2)
    run_dir = Path(cfg.checkpoint_dir) / cfg.run_name
    model, state = restore(cfg, run_dir)
    with pytest.raises(Npgpt2Error, match=r"cannot write samples at step 2 \(.*samples-2: Permission denied\); "
                                          r"the run was saved at that step"):
        fit(model, tiny_tokens(), cfg, run_dir, tokenizer=npgpt2.load_tokenizer(), state=state)
    _, state = restore(cfg, run_dir)
    assert int(state["step"]) == 2 and "sampler" in state


def test_inputs_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    import npgpt2.train as train_mod

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(train_mod, "restore", no_load)
    with pytest.raises(Npgpt2Error, match=r"missing\.npz: no such file.*\(--dataset\)"):
        train(tiny_cfg(tmp_path, dataset=str(tmp_path / "missing.npz"), steps=1))
    np.savez(tmp_path / "tok.npz", tiny_tokens())
    with pytest.raises(Npgpt2Error, match=r"gone\.txt: no such file.*\(--val_dataset\)"):
        train(tiny_cfg(tmp_path, dataset=str(tmp_path / "tok.npz"), val_dataset=str(tmp_path / "gone.txt")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(Npgpt2Error, match=r"cannot make the samples folder \(--sample_dir\)"):
        train(tiny_cfg(tmp_path, dataset=str(tmp_path / "tok.npz"), sample_every=1, sample_dir=str(tmp_path / "file")))


# ---------------------------------------------------------------- progress on a terminal, the demo's folder
def run_cli_tty(*args, cwd=None, timeout=300):
    """Run the CLI with stderr on a pseudo-terminal; returns (returncode, stdout, terminal text)."""
    import fcntl
    import pty
    import struct
    import termios
    import threading
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    env = dict(os.environ, PYTHONPATH=str(REPO), NPGPT2_PLAIN="1", COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "npgpt2.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL, cwd=cwd, env=env, text=True)
    os.close(slave)
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other end closed
                return
            if not data:
                return
            chunks.append(data)
    reader = threading.Thread(target=drain)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
        os.close(master)
    return proc.returncode, out, b"".join(chunks).decode("utf-8", "replace")


BAR = re.compile(r"\d+%\|.*\| *(\d+)/(\d+) \[[\d:]+<[\d:?]+, ")  # tqdm: percent, count/total, elapsed<ETA


def test_train_and_eval_show_a_progress_bar_on_a_terminal(tmp_path):
    np.savez(tmp_path / "tok.npz", tiny_tokens(600))
    rc, out, tty = run_cli_tty("train", "--dataset", tmp_path / "tok.npz", "--models_dir", FIX, "--model_name",
                               "tiny", "--checkpoint_dir", tmp_path / "ck", "--steps", 6, "--context", 8,
                               "--sample_every", 0, "--seed", 1)
    assert rc == 0, tty
    counts = [(int(a), int(b)) for a, b in BAR.findall(tty)]
    assert (6, 6) in counts and "tok/s=" in tty and ("step/s" in tty or "s/step" in tty)
    assert STEP_LINE.search(tty)  # the log lines still print, above the bar
    rc, out, tty = run_cli_tty("eval", "--dataset", tmp_path / "tok.npz", "--models_dir", tmp_path / "ck",
                               "--model_name", "run1", "--context", 8)
    assert rc == 0, tty
    assert (75, 75) in [(int(a), int(b)) for a, b in BAR.findall(tty)] and "window" in tty  # 599 / 8 windows
    assert "loss " in out


def test_eval_logs_plain_progress_without_a_terminal(tmp_path):
    np.savez(tmp_path / "tok.npz", tiny_tokens(600))
    r = run_cli("eval", "--dataset", tmp_path / "tok.npz", "--models_dir", FIX, "--model_name", "tiny",
                "--context", 8)
    assert r.returncode == 0, r.stderr
    assert "eval: 16 of 75 windows" in r.stderr and "\r" not in r.stderr


def test_demo_folder_loads_for_prompt_and_its_tokens_round_trip(tmp_path):
    """demo --quick writes its default folder (announced at the start and the end), which
    loads as a model folder: its tokenizer speaks the compact ids, and `prompt` generates."""
    from npgpt2.compact_vocab import CompactTokenizer
    rc, out, tty = run_cli_tty("demo", "--quick", "--steps", 6, cwd=tmp_path)
    assert rc == 0, tty
    run = tmp_path / "checkpoint" / "demo"
    assert out.startswith("Training a small GPT-2 on the bundled Jargon File; the run goes to checkpoint/demo/")
    assert (6, 6) in [(int(a), int(b)) for a, b in BAR.findall(tty)]
    assert "npgpt2 explain --models_dir checkpoint --model_name demo" in out
    assert {"checkpoint", "model-6.index", "compact_vocab.npy", "samples.txt"} <= set(os.listdir(run))
    assert "======== SAMPLE 1 ========\nhacker:" in (run / "samples.txt").read_text(encoding="utf-8")
    model, tok = npgpt2.load_model(run), npgpt2.load_tokenizer(run)
    assert isinstance(tok, CompactTokenizer) and tok.n_vocab == model.hparams["n_vocab"]
    gpt2 = npgpt2.load_tokenizer()
    text = "hacker: a person who enjoys exploring the details of programmable systems"
    ids = tok.encode(text)
    assert max(ids) < tok.n_vocab and tok.decode(ids) == text
    # the compact ids name the same tokens as GPT-2's ids (tiktoken-checked elsewhere)
    assert [int(tok.vocab[i]) for i in ids] == gpt2.encode(text)
    with pytest.raises(Npgpt2Error, match=r"compact_vocab\.npy: the text has the token .* \(GPT-2 id \d+\), "
                                          r"which is not among this model's \d+ tokens"):
        tok.encode("Ωμέγα 漢字")
    r = run_cli("prompt", "--models_dir", tmp_path / "checkpoint", "--model_name", "demo", "--length", 5,
                "--seed", 1, stdin="kludge:\n")
    assert r.returncode == 0, r.stderr
    assert "SAMPLE 1" in r.stdout and len(r.stdout.split("SAMPLE 1")[1].strip("= \n")) > 0
    r = run_cli("prompt", "--models_dir", tmp_path / "checkpoint", "--model_name", "demo", stdin="漢字\n")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not among this model's" in r.stderr
    r = run_cli("generate", "--models_dir", tmp_path / "checkpoint", "--model_name", "demo", "--length", 5)
    assert r.returncode == 2 and "vocabulary has no <|endoftext|> token" in r.stderr and "Traceback" not in r.stderr


def test_demo_refuses_an_out_folder_holding_another_model(tmp_path):
    from npgpt2.demo import run_demo
    run_fit(tiny_cfg(tmp_path, steps=1), tiny_tokens())
    run = tmp_path / "checkpoint" / "r"
    with pytest.raises(Npgpt2Error, match="holds a model that is not a demo run; give another --out"):
        run_demo(quick=True, steps=1, out_dir=run)
    assert (run / "model-1.index").exists()


def test_demo_says_it_replaces_an_earlier_demo_run(tmp_path, caplog):
    """A second `demo` into the same folder replaced the first run's model (say, a 4-minute
    full run by a 40-step --quick one) without a word; it says so before training."""
    from npgpt2.demo import run_demo
    out = tmp_path / "demo"
    run_demo(quick=True, steps=2, out_dir=out, sample_num=1, sample_length=2)
    assert (out / "model-2.index").exists()
    with caplog.at_level("WARNING"):
        run_demo(quick=True, steps=1, out_dir=out, sample_num=1, sample_length=2)
    assert f"{out}: replacing the demo run there (model-2)" in caplog.text
