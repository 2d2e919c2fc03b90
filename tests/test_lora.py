"""LoRA (lora.py, layers.lora_forward/lora_backward): the layer against finite differences,
the adapted model against finite differences and against its merged weights (computed here
in NumPy), training that touches the adapters alone, the run folder, and bad input.

References: npgpt2.gradcheck.numeric_grad (central differences of the forward alone), and
plain NumPy products of the test's own (W + scaling * A @ B).
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npgpt2
from npgpt2 import cli, gradcheck, kernels, layers, lora, quant
from npgpt2.errors import Npgpt2Error
from npgpt2.gradcheck import numeric_grad, rel_error
from npgpt2.model import init_model, load_model
from npgpt2.train import TrainConfig, fit, restore

FIX = Path(__file__).parent / "fixtures"
TOL = 1e-6  # gradcheck.LAYER_TOL
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


# ---------------------------------------------------------------- the layer
@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(1, 3),
       st.integers(0, 2**32 - 1))
def test_lora_layer_gradients_by_finite_differences(B, T, C, OC, r, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C))
    w, b = rng.standard_normal((C, OC)), rng.standard_normal(OC)
    A, Bm = rng.standard_normal((C, r)), rng.standard_normal((r, OC))
    s = 0.75
    dout = rng.standard_normal((B, T, OC))
    out, h = layers.lora_forward(x, w, b, A, Bm, s)
    np.testing.assert_allclose(out, x @ w + b + s * (x @ A) @ Bm, rtol=1e-12, atol=1e-12)
    dx, dA, dB = layers.lora_backward(dout, x, w, A, Bm, s, h)

    def f():
        return float((dout * layers.lora_forward(x, w, b, A, Bm, s)[0]).sum())
    for arr, analytic in ((x, dx), (A, dA), (Bm, dB)):
        assert analytic.shape == arr.shape
        assert rel_error(numeric_grad(f, arr), analytic) <= TOL


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 9), st.integers(1, 6), st.integers(1, 3),
       st.integers(0, 2**32 - 1))
def test_wte_lora_layers_gradients_by_finite_differences(B, T, V, C, r, seed):
    """The tied wte's adapter in its two uses: the lookup (lora_embedding_*, tokens repeat) and the
    head (lora_head_*), each forward against its formula and each backward against central differences."""
    rng = np.random.default_rng(seed)
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((T + 2, C))
    A, Bm, s = rng.standard_normal((V, r)), rng.standard_normal((r, C)), 0.75
    inp = rng.integers(0, V, (B, T))
    inp[0, -1] = inp[0, 0]  # a repeated token: its row of dA sums both positions
    W = wte + s * A @ Bm
    dout = rng.standard_normal((B, T, C))
    np.testing.assert_allclose(layers.lora_embedding_forward(wte, wpe, inp, A, Bm, s, 2), W[inp] + wpe[2:2 + T],
                               rtol=1e-12, atol=1e-12)
    dA, dB = layers.lora_embedding_backward(dout, inp, A, Bm, s)

    def f_embed():
        return float((dout * layers.lora_embedding_forward(wte, wpe, inp, A, Bm, s)).sum())
    for arr, analytic in ((A, dA), (Bm, dB)):
        assert analytic.shape == arr.shape
        assert rel_error(numeric_grad(f_embed, arr), analytic) <= TOL
    x = rng.standard_normal((B, T, C))
    dlogits = rng.standard_normal((B, T, V))
    logits, u = layers.lora_head_forward(x, wte, A, Bm, s)
    np.testing.assert_allclose(logits, x @ W.T, rtol=1e-12, atol=1e-12)
    dx, dA, dB = layers.lora_head_backward(dlogits, x, wte, A, Bm, s, u)

    def f_head():
        return float((dlogits * layers.lora_head_forward(x, wte, A, Bm, s)[0]).sum())
    for arr, analytic in ((x, dx), (A, dA), (Bm, dB)):
        assert analytic.shape == arr.shape
        assert rel_error(numeric_grad(f_head, arr), analytic) <= TOL


def test_gradcheck_covers_lora():
    rows = {r.name: r for r in gradcheck.check_layers()}
    assert rows["lora"].ok and rows["lora"].worst in ("dinp", "dA", "dB")


def test_lora_through_an_int8_weight_is_the_dequantised_matrix():
    """A frozen int8 base: forward and input gradient are those of its dequantised float32
    matrix (built here from q and scale by NumPy), and .T of the int8 rows multiplies too."""
    rng = np.random.default_rng(0)
    C, OC, r = 16, 12, 3
    qw = quant.quantize(rng.standard_normal((OC, C)).astype(np.float32)).T  # (C, OC) view of (OC, C) rows
    W = (qw.q.astype(np.float32) * qw.scale).T  # [C, OC], one scale per output row
    x = rng.standard_normal((2, 5, C)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    A, Bm = (rng.standard_normal(s).astype(np.float32) for s in ((C, r), (r, OC)))
    dout = rng.standard_normal((2, 5, OC)).astype(np.float32)
    out, h = layers.lora_forward(x, qw, b, A, Bm, 2.0)
    np.testing.assert_allclose(out, x @ W + b + 2.0 * (x @ A) @ Bm, rtol=1e-5, atol=1e-5)
    dx, dA, dB = layers.lora_backward(dout, x, qw, A, Bm, 2.0, h)
    np.testing.assert_allclose(dx, dout @ W.T + 2.0 * (dout @ Bm.T) @ A.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dout @ qw.T, dout @ W.T, rtol=1e-5, atol=1e-6)
    with kernels.float_activations():  # as training runs it: the product exact in x
        fast, fh = kernels.lora_forward(x, qw, b, A, Bm, 2.0)
        one, _ = kernels.lora_forward(x[:1, :1], qw, b, A, Bm, 2.0)  # one row: the dequantising GEMV
    np.testing.assert_allclose(fast, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fh.shape, h.shape)
    np.testing.assert_allclose(one, out[:1, :1], rtol=1e-5, atol=1e-5)
    # decoding (model_fast's forward opts in): the activation row is quantised too (int8_dot.py),
    # so the base product is off by about its rounding, |x| max / 254 per entry
    from npgpt2 import quant_kernels
    with quant_kernels.quantised_activations():
        dec, _ = kernels.lora_forward(x[:1, :1], qw, b, A, Bm, 2.0)
    bound = np.abs(x[:1, :1]).max() / 254 * np.abs(W).sum(axis=0) + 1e-5  # (OC,)
    assert (np.abs(dec - out[:1, :1]) <= bound).all()
    assert not np.array_equal(dec, one)  # it really is the other kernel
    # outside any block the product is exact: the dequantising GEMV, as in training
    np.testing.assert_array_equal(kernels.lora_forward(x[:1, :1], qw, b, A, Bm, 2.0)[0], one)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_lora_forward_equals_plain(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 7, 10)).astype(dtype)
    w, b = rng.standard_normal((10, 9)).astype(dtype), rng.standard_normal(9).astype(dtype)
    A, Bm = rng.standard_normal((10, 4)).astype(dtype), rng.standard_normal((4, 9)).astype(dtype)
    want, wh = layers.lora_forward(x, w, b, A, Bm, 0.5)
    got, gh = kernels.lora_forward(x, w, b, A, Bm, 0.5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(gh, wh, rtol=tol, atol=tol)
    assert got.dtype == want.dtype == dtype


# ---------------------------------------------------------------- the adapted model
def tiny_with_adapters(targets=lora.TARGETS, r=2, alpha=3.0, seed=0, dtype=np.float64):
    """gradcheck's tiny float64 model with adapters whose B is nonzero (init gives B = 0)."""
    m = gradcheck.tiny_model(seed)
    ad = lora.init_adapters(m.hparams, lora.LoraConfig(r=r, alpha=alpha, targets=tuple(targets)), seed=1,
                            dtype=dtype)
    rng = np.random.default_rng(seed + 7)
    for k in ad.params:
        ad.params[k][...] = rng.standard_normal(ad.params[k].shape) * 0.4
    return lora.attach(m, ad)


def merged_copy(model):
    """A plain GPT2 whose weights are W + scaling * A @ B, computed here (not by npgpt2)."""
    params = {k: np.array(v) for k, v in model.params.items()}
    c = model.lora.config
    for i in range(model.hparams["n_layer"]):
        for t in c.targets:
            name = lora.module_prefix(i, t)
            delta = model.lora.params[name + "/lora_A"] @ model.lora.params[name + "/lora_B"]
            if t == "wte":  # the tied (V, C) matrix: lookup and head alike
                params[name] = model.params[name] + c.alpha / c.r * delta
            else:
                params[name + "/w"] = params[name + "/w"] + c.alpha / c.r * delta[None]
    return npgpt2.GPT2(model.hparams, params, dtype=model.dtype)


@pytest.mark.parametrize("targets", [lora.TARGETS, ("attn.c_proj", "mlp.c_fc"), ("mlp.c_fc", "wte"), ("wte",)])
def test_model_adapter_gradients_by_finite_differences(path, targets):
    """loss_and_grads of an adapted model: the adapters' gradients alone (no base name at all),
    each against central differences of the loss (gradcheck.check_model), on both paths."""
    model = tiny_with_adapters(targets)
    rng = np.random.default_rng(3)
    _, grads = model.loss_and_grads(rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6)))
    assert set(grads) == set(model.lora.params)
    assert all(grads[k].shape == model.lora.params[k].shape for k in grads)
    rows = gradcheck.check_model(model, entries=3, T=6, B=2)
    assert len(rows) == 2 * len(targets)
    assert all(r.ok for r in rows), [(r.name, r.error) for r in rows if not r.ok]


def test_gradcheck_of_a_float32_model_checks_its_adapters_in_float64():
    model = tiny_with_adapters(("mlp.c_fc",))
    m32 = npgpt2.GPT2(model.hparams, model.params, dtype=np.float32)
    lora.attach(m32, lora.LoraAdapters(model.lora.config, {k: v.copy() for k, v in model.lora.params.items()}))
    rows = gradcheck.check_model(m32, entries=2)
    assert [r.name for r in rows] == ["model/h*/mlp/c_fc/lora_A", "model/h*/mlp/c_fc/lora_B"]
    assert all(r.ok for r in rows)


@pytest.mark.parametrize("targets", [("attn.c_attn", "mlp.c_proj"), ("attn.c_attn", "mlp.c_proj", "wte")])
def test_adapted_forward_equals_merged_weights_on_every_path(path, targets):
    """forward (with and without a KV cache), run_with_cache and forward_with_saves of an
    adapted model = the same calls on W + scaling * A @ B merged in NumPy (wte: one merged
    matrix for the lookup and the head)."""
    model = tiny_with_adapters(targets)
    merged = merged_copy(model)
    tokens = np.random.default_rng(2).integers(0, 13, (2, 7))
    want = merged.forward(tokens)
    np.testing.assert_allclose(model.forward(tokens), want, rtol=1e-12, atol=1e-12)
    logits, acts = model.run_with_cache(tokens, names=["h1.mlp.out"])
    np.testing.assert_allclose(logits, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acts["h1.mlp.out"], merged.run_with_cache(tokens, names=["h1.mlp.out"])[1]["h1.mlp.out"],
                               rtol=1e-12, atol=1e-12)
    cache = model.new_cache(2)
    step1 = model.forward(tokens[:, :4], cache=cache)
    step2 = model.forward(tokens[:, 4:], cache=cache)
    np.testing.assert_allclose(np.concatenate([step1, step2], axis=1), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.forward_with_saves(tokens)[0], want, rtol=1e-12, atol=1e-12)


def test_fresh_adapters_leave_the_model_as_its_base(path):
    base = init_model(dict(n_vocab=11, n_ctx=8, n_embd=8, n_head=2, n_layer=2), seed=1)
    tokens = np.arange(6).reshape(1, 6)
    want = base.forward(tokens)
    lora.attach(base, lora.init_adapters(base.hparams, lora.LoraConfig(r=4, alpha=8)))
    np.testing.assert_array_equal(base.forward(tokens), want)  # B = 0: exactly the base
    ad = lora.init_adapters(base.hparams, lora.LoraConfig(r=4, alpha=8, targets=lora.TARGETS + ("wte",)))
    assert not ad.params["model/wte/lora_A"].any() and ad.params["model/wte/lora_B"].std() > 0.5  # peft's init
    lora.attach(base, ad)
    # wte's A = 0: the base, up to float32 rounding (its head is one (B*T, C) @ (C, V) product, not the
    # decode GEMV the fast path uses for a few rows)
    np.testing.assert_allclose(base.forward(tokens), want, rtol=1e-6, atol=1e-7)


def int8_base(seed=0):
    hp = dict(n_vocab=17, n_ctx=8, n_embd=16, n_head=2, n_layer=2)
    model = init_model(hp, seed=seed)
    for name, p in model.params.items():  # sizeable weights: the adapters' effect is visible
        if name.endswith("/w") or name == "model/wte":
            p *= 10
    q = npgpt2.GPT2(hp, quant.quantize_params(dict(model.params)))
    return q, quant.dequantize_params(dict(q.params))


@pytest.mark.parametrize("targets", [lora.TARGETS, lora.ALL_TARGETS])
def test_int8_base_trains_adapters_like_its_dequantised_float32_twin(path, targets):
    """An int8 base with adapters: loss and adapter gradients equal those of a float32 model
    holding the dequantised weights (float32 rounding), and generation with a cache agrees."""
    q, deq = int8_base()
    f = npgpt2.GPT2(q.hparams, deq)
    ad = lora.init_adapters(q.hparams, lora.LoraConfig(r=2, alpha=4, targets=targets), seed=3)
    rng = np.random.default_rng(0)
    for k in ad.params:
        ad.params[k][...] = rng.standard_normal(ad.params[k].shape) * 0.2
    lora.attach(q, lora.LoraAdapters(ad.config, {k: v.copy() for k, v in ad.params.items()}))
    lora.attach(f, ad)
    inputs, targets = rng.integers(0, 17, (2, 8)), rng.integers(0, 17, (2, 8))
    lq, gq = q.loss_and_grads(inputs, targets)
    lf, gf = f.loss_and_grads(inputs, targets)
    assert abs(lq - lf) < 1e-5 and set(gq) == set(gf) == set(ad.params)
    for k in gf:
        np.testing.assert_allclose(gq[k], gf[k], rtol=1e-3, atol=1e-5)
    def cached():
        cache = q.new_cache(2)
        return np.concatenate([q.forward(inputs[:, :5], cache=cache), q.forward(inputs[:, 5:], cache=cache)], axis=1)
    want = f.forward(inputs)
    if path == "fast":  # the kernels' decode GEMV quantises the activations too, unless told not to
        with kernels.float_activations():
            np.testing.assert_allclose(cached(), want, rtol=1e-4, atol=1e-4)
        print("int8 x int8 decode vs float twin:", np.abs(cached() - want).max())
        np.testing.assert_allclose(cached(), want, rtol=0.05, atol=0.05)
    else:
        np.testing.assert_allclose(cached(), want, rtol=1e-4, atol=1e-4)


def test_attach_refuses_tensors_that_do_not_fit_and_replaces_earlier_adapters():
    model = tiny_with_adapters(("attn.c_attn",))
    ad = lora.init_adapters(model.hparams, lora.LoraConfig(r=2, alpha=2, targets=("mlp.c_fc",)), dtype=np.float64)
    bad = lora.LoraAdapters(ad.config, {**ad.params, "model/h5/mlp/c_fc/lora_A": np.zeros((8, 2))})
    with pytest.raises(Npgpt2Error, match="model/h5/mlp/c_fc/lora_A' belongs to no adapted matrix"):
        lora.attach(model, bad, "x")
    short = lora.LoraAdapters(ad.config, {**ad.params, "model/h1/mlp/c_fc/lora_B": np.zeros((2, 5))})
    with pytest.raises(Npgpt2Error, match=r"x: adapter tensor 'model/h1/mlp/c_fc/lora_B' is shape \(2, 5\), "
                                          r"expected \(2, 32\)"):
        lora.attach(model, short, "x")
    assert all("attn/c_attn/lora_A" in blk for blk in model.blocks)  # a refusal changed nothing
    lora.attach(model, ad)
    assert not any("attn/c_attn/lora" in k for blk in model.blocks for k in blk)
    _, grads = model.loss_and_grads(np.zeros((1, 3), int), np.ones((1, 3), int))
    assert set(grads) == set(ad.params)


def test_int8_without_adapters_still_refuses_training():
    q, _ = int8_base()
    with pytest.raises(Npgpt2Error, match="training an int8 model"):
        q.loss_and_grads(np.zeros((1, 4), int), np.zeros((1, 4), int))


# ---------------------------------------------------------------- training and the run folder
def tokens_for(n_vocab, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.tile(np.arange(min(n_vocab, 40), dtype=np.uint16), n // 40 + 1)[:n]
    noise = rng.random(n) < 0.05
    t[noise] = rng.integers(0, n_vocab, noise.sum())
    return t


@pytest.fixture
def base(tmp_path):
    """A copy of tests/fixtures/tiny (TF-written, vocab 96) to train on and to change."""
    d = tmp_path / "weights" / "tiny"
    shutil.copytree(FIX / "tiny", d)
    return d


def cfg_for(base, tmp_path, **kw):
    args = dict(models_dir=str(base.parent), model_name=base.name, checkpoint_dir=str(tmp_path / "checkpoint"),
                run_name="r", context=8, batch_size=2, learning_rate=1e-2, seed=5, sample_every=0,
                save_every=0, plot=False, lora=4)
    args.update(kw)
    return TrainConfig(**args)


def run_fit(cfg, tokens):
    run_dir = Path(cfg.checkpoint_dir) / cfg.run_name
    model, state = restore(cfg, run_dir)
    return model, fit(model, tokens, cfg, run_dir, state=state)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_training_moves_only_the_adapters(base, tmp_path, dtype):
    """The frozen base stays bit for bit; the optimizer holds the adapters alone; loss falls;
    the run folder holds adapters (small), adapter.json and the base's files, and loads by
    itself as base + adapters."""
    cfg = cfg_for(base, tmp_path, steps=30, dtype=dtype, lora_targets="attn.c_attn,mlp.c_fc")
    run_dir = Path(cfg.checkpoint_dir) / cfg.run_name
    model, state = restore(cfg, run_dir)
    frozen = {k: (v.q.copy() if isinstance(v, quant.QuantizedWeight) else v.copy()) for k, v in model.params.items()}
    result = fit(model, tokens_for(96), cfg, run_dir, state=state)
    for k, v in model.params.items():
        np.testing.assert_array_equal(v.q if isinstance(v, quant.QuantizedWeight) else v, frozen[k])
    h = result["history"]["loss"]
    assert np.mean(h[-5:]) < np.mean(h[:5]) - 0.3
    with np.load(run_dir / "train_state-30.npz") as z:
        moments = {k.split("/", 2)[2] for k in z.files if k.startswith("opt/") and k.count("/") > 2}
    assert moments == set(model.lora.params) and len(moments) == 2 * 2 * 2  # 2 layers x 2 targets x A, B
    stored = npgpt2.checkpoint.list_variables(str(run_dir / "model-30"))
    assert set(stored) == set(model.lora.params)
    info = json.loads((run_dir / "adapter.json").read_text())
    assert (info["r"], info["alpha"], info["targets"], info["dtype"]) == (4, 8.0, ["attn.c_attn", "mlp.c_fc"], dtype)
    assert info["base"]["path"] == str(base.resolve())
    loaded = load_model(run_dir, dtype=dtype)
    assert loaded.lora is not None and loaded.source_dir == run_dir
    tokens = np.arange(8).reshape(1, 8)
    np.testing.assert_array_equal(loaded.forward(tokens), model.forward(tokens))
    again = load_model(base, dtype=dtype, adapter=run_dir)
    np.testing.assert_array_equal(again.forward(tokens), model.forward(tokens))


def test_training_wte_adapter_leaves_wte_bit_unchanged(base, tmp_path):
    """--lora_targets ...,wte: the tied wte (and every base weight) stays bit for bit, AdamW holds the
    adapters alone (wte's A (V, r) and B (r, C) among them), loss falls, the run reloads, and
    convert --merge writes one merged wte whose plain model gives the adapter model's logits."""
    from npgpt2.adapter_files import convert_adapter
    cfg = cfg_for(base, tmp_path, steps=20, lora_targets="mlp.c_fc,wte")
    run_dir = Path(cfg.checkpoint_dir) / cfg.run_name
    model, state = restore(cfg, run_dir)
    frozen = {k: v.copy() for k, v in model.params.items()}
    result = fit(model, tokens_for(96), cfg, run_dir, state=state)
    assert all(np.array_equal(model.params[k], frozen[k]) for k in frozen)
    h = result["history"]["loss"]
    assert np.mean(h[-5:]) < np.mean(h[:5]) - 0.3
    with np.load(run_dir / "train_state-20.npz") as z:
        moments = {k.split("/", 2)[2] for k in z.files if k.startswith("opt/") and k.count("/") > 2}
    assert moments == set(model.lora.params) and {"model/wte/lora_A", "model/wte/lora_B"} <= moments
    assert model.lora.params["model/wte/lora_A"].shape == (96, 4) and model.lora.params["model/wte/lora_A"].any()
    tokens = np.arange(8).reshape(1, 8)
    np.testing.assert_array_equal(load_model(run_dir).forward(tokens), model.forward(tokens))
    convert_adapter(run_dir, tmp_path / "merged", merge=True)
    merged = load_model(tmp_path / "merged")
    assert not np.array_equal(merged.params["model/wte"], frozen["model/wte"])
    np.testing.assert_allclose(merged.forward(tokens), model.forward(tokens), rtol=1e-5, atol=1e-5)
    convert_adapter(run_dir, tmp_path / "peft", fmt="peft")  # --to peft: the tied pair, read back the same
    back = lora.load_adapters(tmp_path / "peft", model.hparams)
    assert back.config.targets == ("mlp.c_fc", "wte")
    assert all(np.array_equal(back.params[k], model.lora.params[k]) for k in model.lora.params)


def test_stopped_and_resumed_lora_run_equals_a_straight_one(base, tmp_path):
    tokens = tokens_for(96)
    kw = dict(accumulate_gradients=2, lr_schedule="cosine", warmup=2, lr_decay_steps=8, weight_decay=0.1,
              max_to_keep=2)
    _, straight = run_fit(cfg_for(base, tmp_path, run_name="straight", steps=8, **kw), tokens)
    run_fit(cfg_for(base, tmp_path, run_name="split", steps=4, **kw), tokens)
    _, second = run_fit(cfg_for(base, tmp_path, run_name="split", steps=4, **kw), tokens)
    assert second["step"] == 8 and second["history"]["loss"] == straight["history"]["loss"]
    assert len(set(straight["history"]["loss"])) == 8
    a = load_model(tmp_path / "checkpoint" / "straight").lora.params
    b = load_model(tmp_path / "checkpoint" / "split").lora.params
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_kill_at_any_file_operation_of_a_lora_save_leaves_a_resumable_run(base, tmp_path, monkeypatch):
    from test_train import Killed, kill_at, named_checkpoint_is_complete
    tokens = tokens_for(96)
    kw = dict(save_every=1, max_to_keep=1)
    run_fit(cfg_for(base, tmp_path, run_name="straight", steps=3, **kw), tokens)
    want = load_model(tmp_path / "checkpoint" / "straight").lora.params
    k = 1
    while True:
        name = f"k{k}"
        run = tmp_path / "checkpoint" / name
        run_fit(cfg_for(base, tmp_path, run_name=name, steps=2, **kw), tokens)
        with monkeypatch.context() as m:
            kill_at(m, k)
            try:
                run_fit(cfg_for(base, tmp_path, run_name=name, steps=1, **kw), tokens)
                finished = True
            except Killed:
                finished = False
        assert named_checkpoint_is_complete(run), f"killed at operation {k}"
        cfg = cfg_for(base, tmp_path, run_name=name, **kw)
        model, state = restore(cfg, run)
        cfg.steps = 3 - int(state["step"])
        if cfg.steps:
            fit(model, tokens, cfg, run, state=state)
        got = load_model(run).lora.params
        assert all(np.array_equal(got[p], want[p]) for p in want), f"killed at operation {k}"
        if finished:
            break
        k += 1
    assert k >= 6


def test_a_missing_or_changed_base_is_refused_in_one_line(base, tmp_path):
    run_fit(cfg_for(base, tmp_path, steps=2), tokens_for(96))
    run = tmp_path / "checkpoint" / "r"
    # another model saved into the base folder: its checkpoint (and checksum) changes
    other = load_model(base)
    other.params["model/wpe"][0, 0] += 1
    npgpt2.save_model(other, base)
    with pytest.raises(Npgpt2Error, match=r"adapter\.json: the base model .* is not the one the adapters were trained on"):
        load_model(run)
    with pytest.raises(Npgpt2Error, match="trained on .*not on"):
        load_model(base, adapter=run)
    shutil.move(str(base), str(tmp_path / "moved"))
    with pytest.raises(Npgpt2Error, match=r"adapter\.json: its base model .*tiny is missing"):
        load_model(run)


@pytest.mark.parametrize("kw, message", [
    (dict(lora=-1), "--lora must be a whole number >= 1"),
    (dict(lora=2.5), "--lora must be a whole number >= 1"),
    (dict(only_train_transformer_layers=True), "--only_train_transformer_layers: with --lora"),
    (dict(lora_targets="attn.c_attn,mlp.fc"), "--lora_targets: unknown target 'mlp.fc'"),
    (dict(lora_targets="wte,lm_head"), "--lora_targets: unknown target 'lm_head'; choose from .*,wte"),
    (dict(lora=0, dtype="int8"), "--dtype int8: .* add --lora R"),
    (dict(lora_alpha=0.0), "--lora_alpha must be a finite number > 0"),
])
def test_bad_lora_flags_are_one_line_and_write_nothing(base, tmp_path, kw, message):
    from npgpt2.train import train
    np.savez(tmp_path / "tok.npz", tokens_for(96))
    cfg = cfg_for(base, tmp_path, dataset=str(tmp_path / "tok.npz"), steps=1, **kw)
    with pytest.raises(Npgpt2Error, match=message) as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "checkpoint").exists()


def test_resuming_with_other_flags_or_over_a_full_run_is_refused(base, tmp_path):
    tokens = tokens_for(96)
    run_fit(cfg_for(base, tmp_path, steps=1), tokens)
    with pytest.raises(Npgpt2Error, match="the run .* has r=4"):
        restore(cfg_for(base, tmp_path, lora=8), tmp_path / "checkpoint" / "r")
    with pytest.raises(Npgpt2Error, match="holds LoRA adapters"):
        restore(cfg_for(base, tmp_path, lora=0), tmp_path / "checkpoint" / "r")
    run_fit(cfg_for(base, tmp_path, run_name="full", lora=0, steps=1), tokens)
    with pytest.raises(Npgpt2Error, match="already holds a full fine-tune"):
        restore(cfg_for(base, tmp_path, run_name="full"), tmp_path / "checkpoint" / "full")


def test_cli_trains_and_every_command_loads_the_run(tmp_path):
    """train --lora on an int8 base, then eval, generate, explain from the run folder alone, and
    generate with --adapter on the base (same text); fixtures/full has GPT-2's vocabulary."""
    from test_train import run_cli
    base = tmp_path / "weights" / "full"
    shutil.copytree(FIX / "full", base)
    np.savez(tmp_path / "tok.npz", tokens_for(96))
    ck = tmp_path / "checkpoint"
    r = run_cli("train", "--dataset", tmp_path / "tok.npz", "--models_dir", base.parent, "--model_name", "full",
                "--checkpoint_dir", ck, "--run_name", "r", "--steps", "3", "--context", "8", "--sample_every", "0",
                "--lora", "2", "--lora_targets", "mlp.c_fc", "--dtype", "int8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads((ck / "r" / "adapter.json").read_text())["dtype"] == "int8"
    r = run_cli("eval", "--dataset", tmp_path / "tok.npz", "--models_dir", ck, "--model_name", "r", "--context", "8")
    assert r.returncode == 0 and "perplexity" in r.stdout, r.stderr
    r = run_cli("generate", "--models_dir", ck, "--model_name", "r", "--length", "4", "--seed", "1")
    assert r.returncode == 0, r.stderr
    r2 = run_cli("generate", "--models_dir", base.parent, "--model_name", "full", "--adapter", ck / "r",
                 "--length", "4", "--seed", "1")
    assert r2.returncode == 0 and r2.stdout == r.stdout, r2.stderr
    r = run_cli("explain", "--models_dir", ck, "--model_name", "r", "ab")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--dataset", tmp_path / "tok.npz", "--models_dir", base.parent, "--model_name", "full",
                "--checkpoint_dir", tmp_path / "ck2", "--lora", "0")
    assert r.returncode == 2 and "argument --lora: must be a whole number >= 1, got '0'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "ck2").exists()
    for bad in ("-2", "2.5", "eight"):  # the same parser rule, without a process each
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be a whole number >= 1, got '{bad}'"):
            cli.lora_rank(bad)
    r = run_cli("generate", "--models_dir", base.parent, "--model_name", "full", "--adapter", tmp_path)
    assert r.returncode == 2 and "not an adapter folder" in r.stderr and r.stderr.count("\n") == 1



# ---------------------------------------------------------------- against torch autograd + peft
PEFT_REFERENCE = FIX / "lora" / "lora_reference.npz"  # tools/make_fixtures.py lora


@pytest.mark.parametrize("dtype, suffix, tol", [(np.float64, "f64", 1e-9), (np.float32, "f32", 1e-4)])
def test_loss_and_adapter_gradients_equal_torch_peft(path, dtype, suffix, tol):
    """The tiny model with peft's adapter (r 4, alpha 8, all four matrices, a rank and an alpha
    pattern; tests/fixtures/lora/README.md): loss, logits and every adapter gradient equal
    torch autograd's through peft's LoRA layers."""
    ref = np.load(PEFT_REFERENCE)
    config = lora.LoraConfig(r=4, alpha=8.0, rank_pattern={"model/h1/mlp/c_fc": 2},
                             alpha_pattern={"model/h0/attn/c_proj": 3.0})
    params = {k[len("adapter/"):]: ref[k] for k in ref.files if k.startswith("adapter/")}
    model = load_model(FIX / "tiny", dtype=dtype)
    lora.attach(model, lora.LoraAdapters(config, params))
    for k in ref.files:
        if k.startswith("scaling/"):
            prefix = k[len("scaling/"):]
            layer, target = int(prefix.split("/")[1][1:]), ".".join(prefix.split("/")[2:])
            assert config.scaling(layer, target) == float(ref[k]), prefix
    loss, grads = model.loss_and_grads(ref["tokens"], ref["targets"])
    assert abs(loss - float(ref["loss_" + suffix])) <= tol * max(1.0, abs(float(ref["loss_" + suffix])))
    np.testing.assert_allclose(model.forward(ref["tokens"]), ref["logits_" + suffix], rtol=tol, atol=tol)
    key = "grad/" if dtype == np.float64 else "grad32/"
    assert set(grads) == {k[len(key):] for k in ref.files if k.startswith(key)}
    for name, g in grads.items():
        want = ref[key + name]
        assert rel_error(want, g) <= tol, (name, rel_error(want, g))


def test_memory_saving_and_a_mask_compose_with_adapters(path):
    """--memory_saving_gradients re-runs each block's forward, adapters included: on the peft
    fixture the adapter gradients with the flag equal torch's (float64 <=1e-9); with a loss mask
    the two paths still agree bit for bit, and the masked loss is the mean of torch's per-position
    losses over the masked positions (logits from the fixture, log-softmax computed here)."""
    ref = np.load(PEFT_REFERENCE)
    config = lora.LoraConfig(r=4, alpha=8.0, rank_pattern={"model/h1/mlp/c_fc": 2},
                             alpha_pattern={"model/h0/attn/c_proj": 3.0})
    params = {k[len("adapter/"):]: ref[k] for k in ref.files if k.startswith("adapter/")}
    model = lora.attach(load_model(FIX / "tiny", dtype=np.float64), lora.LoraAdapters(config, params))
    loss, grads = model.loss_and_grads(ref["tokens"], ref["targets"], memory_saving=True)
    assert abs(loss - float(ref["loss_f64"])) <= 1e-9 * max(1.0, abs(float(ref["loss_f64"])))
    for name, g in grads.items():
        assert rel_error(ref["grad/" + name], g) <= 1e-9, name
    mask = (np.arange(ref["targets"].size).reshape(ref["targets"].shape) % 3 == 0).astype(np.uint8)
    plain = model.loss_and_grads(ref["tokens"], ref["targets"], mask=mask)
    saving = model.loss_and_grads(ref["tokens"], ref["targets"], mask=mask, memory_saving=True)
    assert plain[0] == saving[0] and all(np.array_equal(plain[1][k], saving[1][k]) for k in plain[1])
    logits = ref["logits_f64"]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, ref["targets"][..., None], -1)[..., 0]
    assert abs(plain[0] - (ce * mask).sum() / mask.sum()) <= 1e-9


PEFT_WTE = FIX / "lora" / "lora_wte_reference.npz"  # tools/make_fixtures.py lora_wte


@pytest.mark.parametrize("dtype, suffix, tol", [(np.float64, "f64", 1e-9), (np.float32, "f32", 1e-4)])
def test_wte_adapter_loss_and_gradients_equal_torch_peft(path, dtype, suffix, tol):
    """peft's tied-wte LoRA (an Embedding LoRA on transformer.wte, lm_head's LoRA tied to it by
    ensure_weight_tying; r 3, alpha 5, with attn.c_attn and mlp.c_proj): loss, logits and every
    adapter gradient (wte's: the sum of torch's gradients for the lookup's and the head's tensors)
    equal ours, with and without --memory_saving_gradients."""
    ref = np.load(PEFT_WTE)
    config = lora.LoraConfig(r=3, alpha=5.0, targets=("attn.c_attn", "mlp.c_proj", "wte"))
    assert config.scaling(None, "wte") == float(ref["scaling"])
    params = {k[len("adapter/"):]: ref[k] for k in ref.files if k.startswith("adapter/")}
    model = lora.attach(load_model(FIX / "tiny", dtype=dtype), lora.LoraAdapters(config, params))
    np.testing.assert_allclose(model.forward(ref["tokens"]), ref["logits_" + suffix], rtol=tol, atol=tol)
    key = f"grad_{suffix}/"
    for memory_saving in (False, True):
        loss, grads = model.loss_and_grads(ref["tokens"], ref["targets"], memory_saving=memory_saving)
        assert abs(loss - float(ref["loss_" + suffix])) <= tol * max(1.0, abs(float(ref["loss_" + suffix])))
        assert set(grads) == {k[len(key):] for k in ref.files if k.startswith(key)}
        for name, g in grads.items():
            assert rel_error(ref[key + name], g) <= tol, (name, rel_error(ref[key + name], g))
    logits, saved = model.forward_with_saves(ref["tokens"])  # backward() from given dlogits: the same head
    dlogits = np.random.default_rng(0).standard_normal(logits.shape).astype(dtype)
    grads, _ = model.backward(dlogits, saved)
    assert set(grads) == set(params)


def test_logit_lens_and_explain_use_the_adapted_head():
    """With an adapter on the tied wte, the logit lens's last row is the model's own distribution
    (explain's last lens row, interp.logit_lens), as without adapters."""
    from npgpt2 import interp
    from npgpt2.explain import logit_lens_top
    model = tiny_with_adapters(("wte",))
    tokens = np.random.default_rng(4).integers(0, 13, (1, 5))
    logits, acts = model.run_with_cache(tokens)
    lens = interp.logit_lens(model, acts)
    np.testing.assert_allclose(lens[-1], logits, rtol=1e-12, atol=1e-12)
    ids, _ = logit_lens_top(model, acts["h1.resid_post"], 1)  # (1, T, C) after the last block
    np.testing.assert_array_equal(ids[0, :, 0], logits[0].argmax(-1))
