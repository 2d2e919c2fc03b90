"""The forward pass against HF transformers' GPT-2 on checkpoints written by real TensorFlow.

Reference logits come from tools/make_fixtures.py (transformers 4.57.6, torch 2.13), never
from npgpt2. Both the Numba path and the plain NumPy path (NPGPT2_PLAIN=1) are checked.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import npgpt2
from npgpt2.errors import Npgpt2Error
from npgpt2.model import GPT2, init_model, param_shapes, resolve_model_dir

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_ref():
    return np.load(FIX / "tiny_reference.npz")


@pytest.fixture(scope="module")
def full_ref():
    return np.load(FIX / "full_reference.npz")


def test_tiny_logits_float64_match_hf(path, tiny_ref):
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    logits = model.forward(tiny_ref["tokens"])
    assert logits.dtype == np.float64
    assert np.abs(logits - tiny_ref["logits_f64"]).max() <= 1e-9


def test_tiny_logits_float32_match_hf(path, tiny_ref):
    model = npgpt2.load_model(FIX / "tiny")
    logits = model.forward(tiny_ref["tokens"])
    assert logits.dtype == np.float32
    assert np.abs(logits - tiny_ref["logits_f32"]).max() <= 5e-5
    # and against HF's float64 too: float32 rounding only
    assert np.abs(logits - tiny_ref["logits_f64"]).max() <= 5e-5


def test_full_vocab_logits_match_hf(path, full_ref):
    m64 = npgpt2.load_model(FIX / "full", dtype=np.float64)
    m32 = npgpt2.load_model(FIX / "full")
    tokens = full_ref["tokens"]
    assert np.abs(m64.forward(tokens)[:, -2:] - full_ref["logits_f64_last2"]).max() <= 1e-9
    assert np.abs(m32.forward(tokens)[:, -2:] - full_ref["logits_f32_last2"]).max() <= 5e-5
    # a batch of two different sequences
    got = m64.forward(full_ref["tokens_b"])[:, -1]
    assert np.abs(got - full_ref["logits_f64_b_last"]).max() <= 1e-9
    # last_only gives the same last row
    last = m64.forward(full_ref["tokens_b"], last_only=True)
    assert last.shape == (2, 1, 50257)
    np.testing.assert_allclose(last[:, 0], full_ref["logits_f64_b_last"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_kv_cache_decode_equals_recompute(path, tiny_ref, dtype, tol):
    model = npgpt2.load_model(FIX / "tiny", dtype=dtype)
    tokens = tiny_ref["tokens"]
    full = model.forward(tokens)
    cache = model.new_cache(batch_size=2)
    parts = [model.forward(tokens[:, :5], cache=cache)]
    for t in range(5, tokens.shape[1]):
        parts.append(model.forward(tokens[:, t:t + 1], cache=cache))
    assert cache.length == tokens.shape[1]
    assert np.abs(np.concatenate(parts, axis=1) - full).max() <= tol
    # a truncated cache recomputes the dropped positions identically
    cache.truncate(9)
    again = model.forward(tokens[:, 9:12], cache=cache)
    assert np.abs(again - full[:, 9:12]).max() <= tol


def test_context_overflow_is_an_error(tiny_ref):
    model = npgpt2.load_model(FIX / "tiny")
    with pytest.raises(ValueError, match="n_ctx"):
        model.forward(np.zeros((1, 17), dtype=np.int64))


def test_hparams_disagreeing_with_checkpoint(tmp_path):
    import shutil
    dst = tmp_path / "m"
    shutil.copytree(FIX / "tiny", dst)
    hp = json.loads((dst / "hparams.json").read_text())
    hp["n_embd"] = 48
    (dst / "hparams.json").write_text(json.dumps(hp))
    with pytest.raises(Npgpt2Error, match=r"model/wte.*\(96, 24\).*\(96, 48\)"):
        npgpt2.load_model(dst)


def test_bad_hparams_json(tmp_path):
    import shutil
    dst = tmp_path / "m"
    shutil.copytree(FIX / "tiny", dst)
    (dst / "hparams.json").write_text("{not json")
    with pytest.raises(Npgpt2Error, match="hparams.json: not valid JSON"):
        npgpt2.load_model(dst)
    (dst / "hparams.json").write_text(json.dumps({"n_vocab": 96, "n_ctx": 16, "n_embd": 24, "n_head": 5, "n_layer": 2}))
    with pytest.raises(Npgpt2Error, match="not divisible"):
        npgpt2.load_model(dst)
    (dst / "hparams.json").unlink()
    with pytest.raises(Npgpt2Error, match="hparams.json: missing"):
        npgpt2.load_model(dst)


def test_model_dir_aliases(tmp_path):
    (tmp_path / "124M").mkdir()
    assert resolve_model_dir(tmp_path, "117M") == tmp_path / "124M"
    (tmp_path / "345M").mkdir()
    assert resolve_model_dir(tmp_path, "355M") == tmp_path / "345M"
    with pytest.raises(Npgpt2Error, match="774M: model folder not found.*npgpt2 download 774M"):
        resolve_model_dir(tmp_path, "774M")


def test_init_model_statistics():
    hp = dict(n_vocab=500, n_ctx=64, n_embd=64, n_head=4, n_layer=3)
    model = init_model(hp, seed=3)
    assert {k: v.shape for k, v in model.params.items()} == param_shapes(hp)
    p = model.params
    assert abs(p["model/wte"].std() - 0.02) < 0.001
    assert abs(p["model/wpe"].std() - 0.01) < 0.001
    assert abs(p["model/h0/mlp/c_proj/w"].std() - 0.02 / np.sqrt(6)) < 0.001
    assert np.all(p["model/h1/ln_2/g"] == 1) and np.all(p["model/h1/attn/c_attn/b"] == 0)
    assert init_model(hp, seed=3).params["model/wte"].tobytes() == p["model/wte"].tobytes()
    # an untrained model predicts close to uniform: loss near log(V)
    loss = model.loss_and_grads(np.arange(32).reshape(2, 16), np.arange(1, 33).reshape(2, 16))[0]
    assert abs(loss - np.log(500)) < 0.05


def test_save_then_load_roundtrip(tmp_path):
    model = npgpt2.load_model(FIX / "tiny")
    npgpt2.save_model(model, tmp_path / "run", step=3)
    npgpt2.save_model(model, tmp_path / "run", step=5, keep=1)
    assert sorted(p.name for p in (tmp_path / "run").glob("model-*.index")) == ["model-5.index"]
    again = npgpt2.load_model(tmp_path / "run")
    for k, v in model.params.items():
        assert again.params[k].tobytes() == v.tobytes(), k
    values = np.load(FIX / "tiny_values.npz")
    assert again.params["model/h1/mlp/c_fc/w"].tobytes() == values["model/h1/mlp/c_fc/w"].tobytes()


def test_gpt2_rejects_inconsistent_hparams():
    with pytest.raises(Npgpt2Error, match="n_layer"):
        GPT2(dict(n_vocab=5, n_ctx=4, n_embd=4, n_head=2, n_layer=0), {})


def test_plain_forward_is_the_papers(monkeypatch, tiny_ref):
    """NPGPT2_PLAIN=1 without a cache runs layers.attention_forward (not the cached variant),
    the same code as run_with_cache; with a cache, the cached variant."""
    from npgpt2 import layers
    monkeypatch.setenv("NPGPT2_PLAIN", "1")
    calls = []
    for name in ("attention_forward", "attention_forward_cached"):
        real = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    tokens = tiny_ref["tokens"]
    logits = model.forward(tokens)
    assert calls == ["attention_forward"] * 2
    assert np.array_equal(logits, model.run_with_cache(tokens)[0])
    assert np.abs(model.forward(tokens, last_only=True) - logits[:, -1:]).max() <= 1e-12  # BLAS rounding
    calls.clear()
    model.forward(tokens, cache=model.new_cache(2))
    assert calls == ["attention_forward_cached"] * 2


def test_params_keep_their_names_and_shapes_views_follow_in_place_updates(tiny_ref):
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    tokens = tiny_ref["tokens"]
    for name, value in (("model/wte", np.zeros((96, 25))), ("model/new", np.zeros(3))):
        with pytest.raises(Npgpt2Error):  # a new shape or name (item assignment copies in place: test_hardening2)
            model.params[name] = value
    # an optimizer updates the arrays in place: the block views see it
    w = model.params["model/h1/mlp/c_fc/w"]
    w *= 0.5
    fresh = GPT2(model.hparams, {k: v.copy() for k, v in model.params.items()}, np.float64)
    assert np.array_equal(model.forward(tokens), fresh.forward(tokens))
    assert np.shares_memory(model.blocks[1]["mlp/c_fc/w"], w)
    # set_params replaces every array and rebuilds the views
    model.set_params(npgpt2.load_model(FIX / "tiny", dtype=np.float64).params)
    assert np.abs(model.forward(tokens) - tiny_ref["logits_f64"]).max() <= 1e-9


def test_forward_with_saves_keeps_the_documented_tensors(path, tiny_ref):
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    B, T, C = 2, 16, 24
    logits, saved = model.forward_with_saves(tiny_ref["tokens"])
    assert np.abs(logits - tiny_ref["logits_f64"]).max() <= 1e-9
    # ln_1, ln_2 and mlp.post are not kept: backward recomputes them
    block = {"resid_pre": (B, T, C), "attn.qkv": (B, T, 3 * C), "attn.z": (B, T, C), "resid_mid": (B, T, C),
             "mlp.pre": (B, T, 4 * C)}
    assert len(saved["blocks"]) == 2
    for act in saved["blocks"]:
        assert {k: v.shape for k, v in act.items() if k != "attn.att"} == block
        assert "attn.att" in act
    assert {k: np.shape(saved[k]) for k in ("resid_final", "ln_f", "ln_f.mean", "ln_f.rstd", "tokens")} == {
        "resid_final": (B, T, C), "ln_f": (B, T, C), "ln_f.mean": (B, T), "ln_f.rstd": (B, T), "tokens": (B, T)}


def test_backward_from_any_dlogits_matches_finite_differences(path, tiny_ref):
    """dembed from backward() against central differences of sum(R * logits), the embedding
    perturbed through a run_with_hooks hook (float64)."""
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    tokens = tiny_ref["tokens"]
    R = np.random.default_rng(0).standard_normal((2, 16, 96))
    logits, saved = model.forward_with_saves(tokens)
    grads, dembed = model.backward(R, saved)
    assert dembed.shape == (2, 16, 24) and set(grads) == set(model.params)
    assert saved["blocks"] == []  # consumed

    def f(idx, h):
        def bump(x):
            x = x.copy()
            x[idx] += h
            return x
        return float((R * model.run_with_hooks(tokens, {"embed": bump})).sum())

    for idx in [(0, 0, 0), (0, 7, 13), (1, 15, 23), (1, 3, 5)]:
        numeric = (f(idx, 1e-5) - f(idx, -1e-5)) / 2e-5
        assert abs(numeric - dembed[idx]) <= 1e-6 * max(1.0, abs(numeric)), idx


def test_loss_and_grads_never_holds_the_whole_logits(path):
    """Training's largest arrays are the logits: loss_and_grads makes them HEAD_ROWS positions
    at a time, one buffer for logits, probabilities and their gradient (NumPy reports its
    arrays to tracemalloc). Here the whole (B*T, V) logits are 10.5 MB, a chunk 2.6 MB."""
    import tracemalloc

    from npgpt2.model import HEAD_ROWS
    hp = dict(n_vocab=5000, n_ctx=512, n_embd=8, n_head=2, n_layer=1)
    model = npgpt2.init_model(hp, seed=0)
    tokens = np.random.default_rng(0).integers(0, hp["n_vocab"], (2, 257))
    model.loss_and_grads(tokens[:, :-1], tokens[:, 1:])  # compile / warm up outside the trace
    whole = 2 * 256 * hp["n_vocab"] * 4
    chunk = HEAD_ROWS * hp["n_vocab"] * 4
    tracemalloc.start()
    try:
        model.loss_and_grads(tokens[:, :-1], tokens[:, 1:])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    params = sum(p.nbytes for p in model.params.values())  # the gradients
    assert peak < params + 1.5 * chunk < whole, (peak, params, chunk, whole)
