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


def test_sigint_saves_a_loadable_checkpoint(tmp_path):
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
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    step = int(re.search(r"Interrupted at step (\d+)", out).group(1))
    assert step >= 3
    run = tmp_path / "ck" / "r"
    model = npgpt2.load_model(run)
    assert model.hparams["n_vocab"] == 96
    assert (run / f"train_state-{step}.npz").exists() and (run / f"model-{step}.index").exists()
    _, state = restore(tiny_cfg(tmp_path, checkpoint_dir=str(tmp_path / "ck")), run)
    assert int(state["step"]) == step
