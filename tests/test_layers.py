"""Every hand-written backward pass against central finite differences of its forward, in
float64, over small shapes chosen by hypothesis; then the whole model's loss_and_grads.

For a layer y = f(x) and a random upstream gradient dy, the scalar L = sum(dy * f(x)) has
dL/dx = backward(dy, ...); each entry of x is nudged by +-h and (L+ - L-)/2h compared
(npgpt2.gradcheck.numeric_grad, the one implementation `npgpt2 gradcheck` also uses).
The error measure is ||numeric - analytic|| / max(||numeric||, ||analytic||), required <= 1e-6.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt2 import layers as L
from npgpt2.gradcheck import numeric_grad
from npgpt2.gradcheck import rel_error as rel_err
from npgpt2.model import GPT2, param_shapes

TOL = 1e-6  # as gradcheck.LAYER_TOL: finite-difference error in float64 is ~1e-10 here
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


def check(f, pairs):
    """pairs: [(x, analytic dL/dx)]; f() -> L with the current contents of every x."""
    for x, analytic in pairs:
        assert analytic.shape == x.shape
        err = rel_err(numeric_grad(f, x), analytic)
        assert err <= TOL, f"relative error {err:.2e}"


shapes = st.fixed_dictionaries({
    "B": st.integers(1, 3), "T": st.integers(1, 5), "NH": st.integers(1, 3),
    "hs": st.integers(1, 4), "seed": st.integers(0, 2**32 - 1),
})


@SETTINGS
@given(shapes, st.integers(2, 7), st.integers(0, 3))
def test_encoder(s, V, pos0):
    rng = np.random.default_rng(s["seed"])
    B, T, C = s["B"], s["T"], s["NH"] * s["hs"]
    maxT = T + pos0
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((maxT, C))
    inp = rng.integers(0, V, (B, T))  # small V: tokens repeat, so rows accumulate
    dout = rng.standard_normal((B, T, C))
    f = lambda: float((dout * L.embedding_forward(wte, wpe, inp, pos0)).sum())  # noqa: E731
    dwte, dwpe = L.embedding_backward(dout, inp, V, maxT)
    if pos0 == 0:
        check(f, [(wte, dwte), (wpe, dwpe)])
    else:  # embedding_backward is for training (pos0 = 0); the embedding rows still must agree
        check(f, [(wte, dwte)])


@SETTINGS
@given(shapes)
def test_layernorm(s):
    rng = np.random.default_rng(s["seed"])
    C = s["NH"] * s["hs"] + 1  # C = 1 is degenerate (output is the bias)
    x = rng.standard_normal((s["B"], s["T"], C)) * 2 + 0.5
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    dout = rng.standard_normal(x.shape)
    f = lambda: float((dout * L.layernorm_forward(x, w, b)[0]).sum())  # noqa: E731
    _, mean, rstd = L.layernorm_forward(x, w, b)
    dx, dw, db = L.layernorm_backward(dout, x, w, mean, rstd)
    check(f, [(x, dx), (w, dw), (b, db)])


@SETTINGS
@given(shapes, st.integers(1, 6))
def test_matmul(s, OC):
    rng = np.random.default_rng(s["seed"])
    C = s["NH"] * s["hs"]
    x = rng.standard_normal((s["B"], s["T"], C))
    w, b = rng.standard_normal((C, OC)), rng.standard_normal(OC)
    dout = rng.standard_normal((s["B"], s["T"], OC))
    f = lambda: float((dout * L.matmul_forward(x, w, b)).sum())  # noqa: E731
    dx, dw, db = L.matmul_backward(dout, x, w)
    check(f, [(x, dx), (w, dw), (b, db)])


@SETTINGS
@given(shapes)
def test_attention(s):
    rng = np.random.default_rng(s["seed"])
    B, T, NH = s["B"], s["T"], s["NH"]
    C = NH * s["hs"]
    qkv = rng.standard_normal((B, T, 3 * C))
    dout = rng.standard_normal((B, T, C))
    f = lambda: float((dout * L.attention_forward(qkv, NH)[0]).sum())  # noqa: E731
    _, att = L.attention_forward(qkv, NH)
    check(f, [(qkv, L.attention_backward(dout, qkv, att, NH))])


@SETTINGS
@given(shapes)
def test_gelu(s):
    rng = np.random.default_rng(s["seed"])
    x = rng.standard_normal((s["B"], s["T"], s["NH"] * s["hs"])) * 3
    dout = rng.standard_normal(x.shape)
    f = lambda: float((dout * L.gelu_forward(x)).sum())  # noqa: E731
    check(f, [(x, L.gelu_backward(dout, x))])


@SETTINGS
@given(shapes, st.integers(2, 9))
def test_crossentropy(s, V):
    rng = np.random.default_rng(s["seed"])
    B, T = s["B"], s["T"]
    logits = rng.standard_normal((B, T, V)) * 3
    targets = rng.integers(0, V, (B, T))
    dlosses = rng.standard_normal((B, T))
    f = lambda: float((dlosses * L.crossentropy_forward(logits, targets)[0]).sum())  # noqa: E731
    losses, probs = L.crossentropy_forward(logits, targets)
    # the loss itself, independently: -log softmax(logits)[target]
    lse = np.log(np.exp(logits).sum(-1))
    ref = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses, ref, rtol=1e-12)
    check(f, [(logits, L.crossentropy_softmax_backward(dlosses, probs, targets))])


# ---------------------------------------------------------------- the whole model
@pytest.mark.parametrize("plain", ["1", "0"])
def test_model_loss_and_grads_vs_finite_differences(plain, monkeypatch):
    monkeypatch.setenv("NPGPT2_PLAIN", plain)
    hp = dict(n_vocab=11, n_ctx=7, n_embd=6, n_head=2, n_layer=2)
    rng = np.random.default_rng(3)
    # weights well away from GPT-2's tiny init so every gradient is sizeable
    params = {k: rng.standard_normal(shape) * (0.3 if len(shape) > 1 else 1.0) + (1.0 if k.endswith("/g") else 0)
              for k, shape in param_shapes(hp).items()}
    model = GPT2(hp, params, dtype=np.float64)
    inputs = rng.integers(0, 9, (2, 6))  # tokens 9, 10 never input: their wte rows get only the head's gradient
    targets = rng.integers(0, 11, (2, 6))
    loss, grads = model.loss_and_grads(inputs, targets)
    assert set(grads) == set(model.params)
    assert all(grads[k].shape == model.params[k].shape for k in grads)

    logits = model.forward(inputs)
    lse = np.log(np.exp(logits).sum(-1))
    ref_loss = (lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]).mean()
    assert loss == pytest.approx(float(ref_loss), rel=1e-12)

    def f():
        return model.loss_and_grads(inputs, targets)[0]

    picks = {"model/wte": [(9, 0), (10, 3), (int(inputs[0, 0]), 2)], "model/wpe": [(0, 1), (5, 4)],
             "model/h0/attn/c_attn/w": [(0, 1, 5), (0, 4, 17)], "model/h1/mlp/c_proj/w": [(0, 20, 2)],
             "model/h0/ln_1/g": [(3,)], "model/h1/attn/c_proj/b": [(0,)], "model/ln_f/b": [(5,)],
             "model/h1/mlp/c_fc/b": [(7,)], "model/h0/ln_2/b": [(2,)]}
    for name, idxs in picks.items():
        numeric = numeric_grad(f, model.params[name], entries=idxs)
        err = rel_err(numeric, np.array([grads[name][idx] for idx in idxs]))
        assert err <= TOL, f"{name}: relative error {err:.2e}"
