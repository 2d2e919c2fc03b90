"""AdamW, clipping and SGD against torch.optim trajectories (tests/fixtures/adamw_reference.npz,
made by tools/make_fixtures.py with torch 2.13; never by npgpt2)."""
import math
from pathlib import Path

import numpy as np
import pytest

from npgpt2 import optim
from npgpt2.errors import Npgpt2Error

REF = np.load(Path(__file__).parent / "fixtures" / "adamw_reference.npz")
STEPS = int(REF["steps"])


def start():
    return {"p": REF["p0"].copy(), "pb": REF["p0b"].copy()}


def grads(t):
    return {"p": REF[f"g{t}"].copy(), "pb": REF[f"gb{t}"].copy()}


def assert_close(params, prefix, t, rtol=1e-12):
    np.testing.assert_allclose(params["p"], REF[f"{prefix}p{t}"], rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(params["pb"], REF[f"{prefix}pb{t}"], rtol=rtol, atol=1e-14)


@pytest.fixture(params=["plain", "default"])
def impl(request, monkeypatch):
    """AdamW on the NumPy rule and on whatever kernels.adamw_update provides (if any)."""
    if request.param == "plain":
        monkeypatch.setenv("NPGPT2_PLAIN", "1")
    else:
        monkeypatch.delenv("NPGPT2_PLAIN", raising=False)


def test_adamw_matches_torch(impl):
    params = start()
    ids = {k: id(v) for k, v in params.items()}
    opt = optim.AdamW(params, lr=float(REF["lr"]), betas=(float(REF["beta1"]), float(REF["beta2"])),
                      eps=float(REF["eps"]), weight_decay=float(REF["weight_decay"]))
    for t in range(1, STEPS + 1):
        opt.step(grads(t))
        assert_close(params, "", t)
    assert {k: id(v) for k, v in params.items()} == ids  # updated in place


def test_adamw_with_clipping_matches_torch(impl):
    params = start()
    opt = optim.AdamW(params, lr=float(REF["lr"]), weight_decay=float(REF["clip/weight_decay"]))
    clipped_some = False
    for t in range(1, STEPS + 1):
        g = grads(t)
        norm = optim.clip_grad_norm(g, float(REF["clip/max_norm"]))
        assert norm == pytest.approx(float(REF[f"clip/norm{t}"]), rel=1e-13)
        after = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
        assert after == pytest.approx(float(REF[f"clip/clipped_norm{t}"]), rel=1e-13)
        clipped_some |= after < norm
        opt.step(g)
        assert_close(params, "clip/", t)
    assert clipped_some


def test_sgd_matches_torch():
    params = start()
    opt = optim.SGD(params, lr=float(REF["sgd/lr"]))
    for t in range(1, STEPS + 1):
        opt.step(grads(t))
        assert_close(params, "sgd/", t, rtol=1e-14)


def test_adamw_state_round_trip_continues_exactly():
    kw = dict(lr=float(REF["lr"]), weight_decay=float(REF["weight_decay"]))
    params = start()
    opt = optim.AdamW(params, **kw)
    for t in (1, 2, 3):
        opt.step(grads(t))
    saved = {k: np.array(v, copy=True) for k, v in opt.state_dict().items()}
    params2 = {k: v.copy() for k, v in params.items()}
    opt2 = optim.AdamW(params2, **kw)
    opt2.load_state_dict(saved)
    for t in range(4, STEPS + 1):
        opt2.step(grads(t))
    assert_close(params2, "", STEPS)


def test_state_from_other_optimizer_is_a_clear_error():
    saved = optim.SGD(start(), lr=0.1).state_dict()
    with pytest.raises(Npgpt2Error, match="sgd optimizer"):
        optim.AdamW(start()).load_state_dict(saved, "train_state-5.npz")


def test_only_named_params_change_and_float32_stays_float32():
    p = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    opt = optim.AdamW({"a": p["a"]}, lr=0.1)
    opt.step({"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)})
    assert p["a"].dtype == np.float32 and np.all(p["a"] < 1) and np.all(p["b"] == 1)
    # first Adam step moves every coordinate by lr (m/sqrt(v) = sign(g) after bias correction)
    np.testing.assert_allclose(p["a"], 0.9, rtol=1e-6)


def test_clip_off_and_norm_in_float64():
    g = {"x": np.full(4_000_000, 1e-3, dtype=np.float32)}
    norm = optim.clip_grad_norm(g, 0)
    assert norm == pytest.approx(math.sqrt(4_000_000) * float(np.float32(1e-3)), rel=1e-12)
    assert np.all(g["x"] == np.float32(1e-3))


def test_accumulate_and_scale():
    total = {"w": np.ones(3)}
    optim.accumulate(total, {"w": np.full(3, 2.0), "unused": np.zeros(1)}, names=["w"])
    optim.scale_(total, 0.5)
    np.testing.assert_array_equal(total["w"], 1.5)


def test_learning_rate_schedule():
    lr = 1e-3
    assert [optim.learning_rate(s, lr, warmup=4) for s in range(5)] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]
    cos = [optim.learning_rate(s, lr, warmup=0, schedule="cosine", decay_steps=10) for s in range(12)]
    assert cos[0] == lr
    assert cos[5] == pytest.approx(lr * 0.1 + 0.5 * (lr - lr * 0.1))  # half way: the mean
    assert cos[10] == cos[11] == pytest.approx(lr * 0.1)
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    with pytest.raises(Npgpt2Error, match="--lr_schedule"):
        optim.learning_rate(0, lr, schedule="linear")


def test_flag_choices_have_one_definition():
    """--optimizer and --lr_schedule are checked by optim's one rule, wherever they come from."""
    optim.check_choice("--optimizer", "sgd", list(optim.OPTIMIZERS))
    with pytest.raises(Npgpt2Error, match=r"^--optimizer must be 'adam' or 'sgd', got 'adagrad'$"):
        optim.make_optimizer("adagrad", {"p": np.zeros(2)}, 0.1)
    # the schedule is refused even during warmup, where it is not used yet
    with pytest.raises(Npgpt2Error, match=r"^--lr_schedule must be 'constant' or 'cosine', got 'linear'$"):
        optim.learning_rate(0, 0.1, warmup=5, schedule="linear")


def test_all_finite():
    ok = {"a": np.ones((3, 4), np.float32), "b": np.full(5, 3e37, np.float32)}
    assert optim.all_finite(ok)
    for bad in (np.nan, np.inf, -np.inf):
        t = {"a": np.ones((3, 4), np.float32), "b": np.zeros(5)}
        t["b"][2] = bad
        assert not optim.all_finite(t)
