"""`train --noise P`: each input token (never a target) replaced by a uniformly random token
with probability P; seeded, saved in the train state, resumed exactly; `--noise 0` is the run
without the flag bit for bit; a P outside [0, 1) is one line naming --noise, nothing written.
The expected rates come from the binomial and chi-square laws, not from npgpt2.
"""
import math

import numpy as np
import pytest
from test_train import FIX, run_cli, run_fit, tiny_cfg, tiny_tokens

import npgpt2
from npgpt2.errors import Npgpt2Error
from npgpt2.noise import STATE_KEY, TokenNoise
from npgpt2.train import train


def test_each_input_token_is_replaced_with_probability_p_by_a_uniform_token():
    p, V, token = 0.25, 50, 7
    inputs = np.full((400, 500), token, dtype=np.int64)
    out = TokenNoise(p, V, seed=0).apply(inputs)
    assert np.all(inputs == token)  # the caller's batch is not changed in place
    assert out.shape == inputs.shape and np.issubdtype(out.dtype, np.integer)
    assert out.min() >= 0 and out.max() < V
    n = inputs.size
    # a replaced token differs from the original unless the draw picks it back (1/V)
    changed, q = int((out != token).sum()), p * (1 - 1 / V)
    assert abs(changed - n * q) <= 5 * math.sqrt(n * q * (1 - q)), changed
    # the other V-1 ids are equally likely: chi-square with V-2 degrees of freedom, far tail
    counts = np.bincount(out[out != token], minlength=V)
    counts = np.delete(counts, token)
    expected = changed / (V - 1)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = V - 2
    assert chi2 < dof + 6 * math.sqrt(2 * dof), chi2
    # seeded: the same seed draws the same, another seed other positions
    assert np.array_equal(TokenNoise(p, V, seed=0).apply(inputs), out)
    assert not np.array_equal(TokenNoise(p, V, seed=1).apply(inputs), out)


def test_state_round_trip_continues_the_same_draws():
    a = TokenNoise(0.5, 96, seed=3)
    a.apply(np.zeros((4, 8), dtype=np.int64))
    b = TokenNoise(0.5, 96, seed=99)
    b.set_state(a.get_state())
    x = np.arange(64).reshape(8, 8)
    assert np.array_equal(a.apply(x), b.apply(x))
    with pytest.raises(Npgpt2Error, match="noise state: damaged|noise state is for"):
        b.set_state('{"bit_generator": "MT19937", "state": 1}')


def test_targets_are_never_noised(tmp_path, monkeypatch):
    """What train.batch_gradients hands loss_and_grads: noisy inputs, the sampled targets."""
    seen = []
    original = npgpt2.model.GPT2.loss_and_grads

    def recording(self, inputs, targets, **kw):
        seen.append((np.array(inputs), np.array(targets)))
        return original(self, inputs, targets, **kw)

    monkeypatch.setattr(npgpt2.model.GPT2, "loss_and_grads", recording)
    tokens = tiny_tokens()  # mostly the repeating pattern 0..39: target = input + 1 (mod 40)
    run_fit(tiny_cfg(tmp_path, steps=20, noise=0.5, batch_size=4), tokens)
    inputs = np.concatenate([i for i, _ in seen])
    targets = np.concatenate([t for _, t in seen])
    # the targets are windows of the corpus itself: each follows the one before it in the stream
    assert np.mean(targets[:, 1:] == (targets[:, :-1] + 1) % 40) > 0.85
    # the inputs are the targets shifted right, except where noise replaced them (about half)
    kept = np.mean(inputs[:, 1:] == targets[:, :-1])
    assert 0.45 < kept < 0.6, kept


def test_noise_zero_is_the_run_without_the_flag_bit_for_bit(tmp_path):
    tokens = tiny_tokens()
    a = run_fit(tiny_cfg(tmp_path, run_name="none", steps=5, accumulate_gradients=2), tokens)
    b = run_fit(tiny_cfg(tmp_path, run_name="zero", steps=5, accumulate_gradients=2, noise=0.0), tokens)
    c = run_fit(tiny_cfg(tmp_path, run_name="some", steps=5, accumulate_gradients=2, noise=0.3), tokens)
    assert a["history"]["loss"] == b["history"]["loss"]
    assert c["history"]["loss"] != a["history"]["loss"]  # the flag does something when it is on
    pa, pb = (npgpt2.load_model(tmp_path / "checkpoint" / r).params for r in ("none", "zero"))
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    with np.load(tmp_path / "checkpoint" / "zero" / "train_state-5.npz") as z:
        assert STATE_KEY not in z.files
    with np.load(tmp_path / "checkpoint" / "some" / "train_state-5.npz") as z:
        assert STATE_KEY in z.files


def test_resumed_noisy_run_equals_a_straight_one(tmp_path):
    tokens = tiny_tokens()
    kw = dict(noise=0.2, accumulate_gradients=2, lr_schedule="cosine", warmup=2, lr_decay_steps=8)
    straight = run_fit(tiny_cfg(tmp_path, run_name="straight", steps=8, **kw), tokens)
    run_fit(tiny_cfg(tmp_path, run_name="split", steps=4, **kw), tokens)
    second = run_fit(tiny_cfg(tmp_path, run_name="split", steps=4, **kw), tokens)
    assert second["history"]["loss"] == straight["history"]["loss"]
    assert len(set(straight["history"]["loss"])) == 8
    a, b = (npgpt2.load_model(tmp_path / "checkpoint" / r).params for r in ("straight", "split"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_train_state_without_noise_still_loads(tmp_path):
    """A state saved before --noise existed (or without it) resumes with a fresh noise stream."""
    tokens = tiny_tokens()
    run_fit(tiny_cfg(tmp_path, steps=2, noise=0.2), tokens)
    path = tmp_path / "checkpoint" / "r" / "train_state-2.npz"
    with np.load(path) as z:
        old = {k: z[k] for k in z.files if k != STATE_KEY}
    np.savez(path, **old)
    r = run_fit(tiny_cfg(tmp_path, steps=2, noise=0.2), tokens)
    assert r["step"] == 4 and all(math.isfinite(x) for x in r["history"]["loss"])
    with np.load(tmp_path / "checkpoint" / "r" / "train_state-4.npz") as z:
        assert STATE_KEY in z.files


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_noise_outside_0_1_is_one_line_and_writes_nothing(tmp_path, value):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    r = run_cli("train", "--dataset", tmp_path / "a.txt", "--models_dir", FIX, "--model_name", "full",
                "--steps", "1", "--context", "8", "--checkpoint_dir", tmp_path / "ck",
                "--sample_dir", tmp_path / "samples", "--noise", value)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--noise must be in [0, 1)" in r.stderr, r.stderr
    assert not (tmp_path / "ck").exists() and not (tmp_path / "samples").exists()
    with pytest.raises(Npgpt2Error, match=r"--noise must be in \[0, 1\)"):
        train(tiny_cfg(tmp_path, dataset=str(tmp_path / "a.txt"), noise=float(value)))
    assert not (tmp_path / "checkpoint").exists()
