"""run_with_cache, run_with_hooks, logit_lens and input_gradient against Hugging Face / torch.

References: tests/fixtures/introspect_{tiny,full}.npz, made by `tools/make_fixtures.py introspect`
(HF GPT-2 in float64, eager attention; torch hooks and autograd), never by npgpt2.
Tolerances: float64 <= 1e-10 (gradients <= 1e-9), float32 <= 1e-5 against the same float64
references.
"""
from pathlib import Path

import numpy as np
import pytest

import npgpt2
from npgpt2 import kernels
from npgpt2.errors import Npgpt2Error

FIX = Path(__file__).parent / "fixtures"
TOL = {np.float64: 1e-10, np.float32: 1e-5}
GRAD_TOL = {np.float64: 1e-9, np.float32: 1e-5}
# the same computation in a different BLAS call (row subsets): rounding only
EQUAL = {np.float64: 1e-12, np.float32: 1e-5}


@pytest.fixture(scope="module", params=["tiny", "full"])
def which(request):
    return request.param


@pytest.fixture(scope="module")
def ref(which):
    with np.load(FIX / f"introspect_{which}.npz") as z:
        return dict(z)


@pytest.fixture(scope="module")
def tiny_ref():
    with np.load(FIX / "introspect_tiny.npz") as z:
        return dict(z)


@pytest.fixture(scope="module", params=[np.float64, np.float32], ids=["f64", "f32"])
def model(request, which):
    return npgpt2.load_model(FIX / which, dtype=request.param)


def maxdiff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max())


def expected_shapes(hp, B, T):
    C, NH, L = hp["n_embd"], hp["n_head"], hp["n_layer"]
    hs = C // NH
    shapes = {"embed": (B, T, C), "ln_f": (B, T, C)}
    for i in range(L):
        shapes.update({
            f"h{i}.ln_1": (B, T, C), f"h{i}.attn.q": (B, NH, T, hs), f"h{i}.attn.k": (B, NH, T, hs),
            f"h{i}.attn.v": (B, NH, T, hs), f"h{i}.attn.scores": (B, NH, T, T),
            f"h{i}.attn.pattern": (B, NH, T, T), f"h{i}.attn.z": (B, T, C), f"h{i}.attn.out": (B, T, C),
            f"h{i}.resid_mid": (B, T, C), f"h{i}.ln_2": (B, T, C), f"h{i}.mlp.pre": (B, T, 4 * C),
            f"h{i}.mlp.post": (B, T, 4 * C), f"h{i}.mlp.out": (B, T, C), f"h{i}.resid_post": (B, T, C),
        })
    return shapes


# ---------------------------------------------------------------- run_with_cache
def test_cache_names_and_shapes_are_issue_9s(model, ref):
    B, T = ref["tokens"].shape
    _, acts = model.run_with_cache(ref["tokens"])
    assert {k: v.shape for k, v in acts.items()} == expected_shapes(model.hparams, B, T)
    assert all(v.dtype == model.dtype for v in acts.values())


def test_cache_matches_hf_hidden_states_and_attentions(model, ref):
    tol = TOL[model.dtype.type]
    L = model.hparams["n_layer"]
    _, acts = model.run_with_cache(ref["tokens"])
    assert maxdiff(acts["embed"], ref["hidden/0"]) <= tol
    for i in range(L):
        assert maxdiff(acts[f"h{i}.attn.pattern"], ref[f"attn/{i}"]) <= tol, i
    for i in range(L - 1):  # HF's last hidden state is after ln_f
        assert maxdiff(acts[f"h{i}.resid_post"], ref[f"hidden/{i + 1}"]) <= tol, i
    assert maxdiff(acts["ln_f"], ref[f"hidden/{L}"]) <= tol


def test_cache_scores_mask_the_future_and_give_hf_pattern(model, ref):
    tol = TOL[model.dtype.type]
    T = ref["tokens"].shape[1]
    _, acts = model.run_with_cache(ref["tokens"])
    future = np.triu(np.ones((T, T), bool), k=1)
    for i in range(model.hparams["n_layer"]):
        scores = acts[f"h{i}.attn.scores"]
        assert np.all(scores[..., future] == -np.inf) and np.all(np.isfinite(scores[..., ~future]))
        e = np.exp(scores.astype(np.float64) - scores.max(-1, keepdims=True))
        assert maxdiff(e / e.sum(-1, keepdims=True), ref[f"attn/{i}"]) <= tol
        # the residual stream is the sum of the branches
        resid_post = acts[f"h{i}.resid_mid"] + acts[f"h{i}.mlp.out"].astype(np.float64)
        assert maxdiff(acts[f"h{i}.resid_post"], resid_post) <= tol


def test_cache_logits_equal_forward_and_hf(path, which, ref):
    m64 = npgpt2.load_model(FIX / which, dtype=np.float64)
    logits, _ = m64.run_with_cache(ref["tokens"])
    assert maxdiff(logits, m64.forward(ref["tokens"])) <= 1e-12
    if which == "tiny":
        assert maxdiff(logits, ref["logits"]) <= 1e-10
    else:  # HF's ln_f + wte^T on its last hidden state, at the last position: HF's logits there
        assert maxdiff(logits[:, -1], ref["lens_last"][-1]) <= 1e-10


def test_cache_runs_the_plain_layers_even_when_kernels_are_on(monkeypatch, which, ref):
    monkeypatch.delenv("NPGPT2_PLAIN", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a Numba kernel ran")

    for name in ("layernorm_forward", "matmul_forward", "attention_forward", "gelu_forward",
                 "attention_forward_cached"):
        monkeypatch.setattr(kernels, name, refuse)
    model = npgpt2.load_model(FIX / which, dtype=np.float64)
    with pytest.raises(AssertionError, match="a Numba kernel ran"):  # the trap is live: forward uses them
        model.forward(ref["tokens"])
    logits, acts = model.run_with_cache(ref["tokens"])
    assert maxdiff(acts["h0.attn.pattern"], ref["attn/0"]) <= 1e-10
    assert np.array_equal(model.run_with_hooks(ref["tokens"], {}), logits)


def test_names_filter_keeps_only_what_is_asked(model, ref):
    logits_all, _ = model.run_with_cache(ref["tokens"])
    logits, acts = model.run_with_cache(ref["tokens"], names=["h1.attn.pattern", "embed"])
    assert set(acts) == {"h1.attn.pattern", "embed"}
    assert np.array_equal(logits, logits_all)
    _, acts = model.run_with_cache(ref["tokens"], names=lambda name: name.endswith("resid_post"))
    assert set(acts) == {f"h{i}.resid_post" for i in range(model.hparams["n_layer"])}
    with pytest.raises(Npgpt2Error, match=r"^names: unknown activation name 'h0.attn.patern'; valid: embed, h\{i\}"):
        model.run_with_cache(ref["tokens"], names=["h0.attn.patern"])


# ---------------------------------------------------------------- run_with_hooks
def test_head_ablation_matches_torch_pre_hook_on_c_proj(model, ref, which):
    tol = TOL[model.dtype.type]
    layer, head = int(ref["ablate_layer"]), int(ref["ablate_head"])

    def zero_head(pattern):
        pattern = pattern.copy()
        pattern[:, head] = 0
        return pattern

    logits = model.run_with_hooks(ref["tokens"], {f"h{layer}.attn.pattern": zero_head})
    if which == "tiny":
        assert maxdiff(logits, ref["ablate_logits"]) <= tol
    else:
        assert maxdiff(logits[:, -1], ref["ablate_logits_last"]) <= tol
    # and exactly what zeroing that head's slice of c_proj's input gives
    hs = model.hparams["n_embd"] // model.hparams["n_head"]

    def zero_slice(z):
        z[:, :, head * hs:(head + 1) * hs] = 0  # in place, returning None
    same = model.run_with_hooks(ref["tokens"], {f"h{layer}.attn.z": zero_slice})
    assert np.array_equal(logits, same)
    # the ablation changes the answer
    assert maxdiff(logits, model.forward(ref["tokens"])) > 1e-3


def test_hooks_returning_none_change_nothing(model, ref):
    seen = []
    logits = model.run_with_hooks(ref["tokens"], {"h0.mlp.post": seen.append, "ln_f": lambda x: None})
    assert len(seen) == 1 and seen[0].shape[-1] == 4 * model.hparams["n_embd"]
    assert np.array_equal(logits, model.run_with_cache(ref["tokens"], names=[])[0])


def test_patching_the_residual_stream(model, ref):
    """Replacing the last block's output by the first block's input skips the whole network."""
    L = model.hparams["n_layer"]
    _, acts = model.run_with_cache(ref["tokens"], names=["embed"])
    logits = model.run_with_hooks(ref["tokens"], {f"h{L - 1}.resid_post": lambda x: acts["embed"]})
    assert maxdiff(logits, npgpt2.logit_lens(model, model.run_with_cache(ref["tokens"])[1])[0]) <= 1e-12


def test_bad_hooks_are_one_line_errors(tiny_ref):
    model = npgpt2.load_model(FIX / "tiny")
    with pytest.raises(Npgpt2Error) as e:
        model.run_with_hooks(tiny_ref["tokens"], {"blocks.0.attn.hook_pattern": lambda x: x})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hooks: unknown activation name 'blocks.0.attn.hook_pattern'")
    for form in ("embed", "h{i}.attn.pattern", "h{i}.resid_post", "h{i}.mlp.pre", "ln_f", "i = 0..1"):
        assert form in msg
    with pytest.raises(Npgpt2Error, match=r"hooks: unknown activation name 'h2.ln_1'"):
        model.run_with_hooks(tiny_ref["tokens"], {"h2.ln_1": lambda x: x})  # the tiny model has 2 layers
    with pytest.raises(Npgpt2Error) as e:
        model.run_with_hooks(tiny_ref["tokens"], {"h1.attn.pattern": lambda x: x[:, :1]})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("hooks['h1.attn.pattern']: returned shape (2, 1, 16, 16), expected (2, 3, 16, 16)")
    with pytest.raises(Npgpt2Error, match=r"hooks\['embed'\]: returned shape float"):
        model.run_with_hooks(tiny_ref["tokens"], {"embed": lambda x: 0.0})


# ---------------------------------------------------------------- logit lens
def test_logit_lens_matches_torch(model, ref, which):
    tol = TOL[model.dtype.type]
    L = model.hparams["n_layer"]
    logits, acts = model.run_with_cache(ref["tokens"])
    if which == "tiny":
        lens = npgpt2.logit_lens(model, acts)
        assert lens.shape == (L + 1,) + logits.shape
        assert maxdiff(lens, ref["lens"]) <= tol
        assert maxdiff(lens[-1], logits) <= EQUAL[model.dtype.type]
    else:
        lens = npgpt2.logit_lens(model, acts, positions=-1)
        assert lens.shape == (L + 1, 1, model.hparams["n_vocab"])
        assert maxdiff(lens, ref["lens_last"]) <= tol
        assert maxdiff(lens[-1], logits[:, -1]) <= EQUAL[model.dtype.type]


def test_logit_lens_needs_the_residual_stream(tiny_ref):
    model = npgpt2.load_model(FIX / "tiny")
    _, acts = model.run_with_cache(tiny_ref["tokens"], names=["embed", "h0.resid_post"])
    with pytest.raises(Npgpt2Error, match=r"^acts: missing h1.resid_post"):
        npgpt2.logit_lens(model, acts)


# ---------------------------------------------------------------- input gradient
def test_input_gradient_matches_torch_autograd(model, ref):
    tol = GRAD_TOL[model.dtype.type]
    ids, position = ref["grad_ids"], int(ref["grad_position"])
    grad = npgpt2.input_gradient(model, ids, position, int(ref["grad_target"]))
    assert grad.shape == (ids.size, model.hparams["n_embd"])
    assert maxdiff(grad, ref["grad_embeds"]) <= tol
    assert np.all(grad[position + 1:] == 0) and np.abs(grad[:position + 1]).max() > 0.01
    # 0-d arrays and NumPy integers are fine as position and target
    again = npgpt2.input_gradient(model, list(ids), ref["grad_position"], np.int32(ref["grad_target"]))
    assert np.array_equal(again, grad)


@pytest.mark.parametrize("ids,position,target,message", [
    ([[1, 2, 3]], 0, 1, r"^ids: expected a non-empty 1-D array of token ids, got shape \(1, 3\)"),
    ([], 0, 1, r"^ids: expected a non-empty 1-D"),
    ([1.5, 2.0], 0, 1, r"^ids: expected .* dtype float64"),
    ([1, 96, 3], 0, 1, r"^ids: token ids must be in \[0, 96\), got 1..96"),
    ([1, -1], 0, 1, r"^ids: token ids must be in \[0, 96\)"),
    (list(range(17)), 0, 1, r"^ids: 17 tokens exceed the context n_ctx=16"),
    ([1, 2, 3], 3, 1, r"^position: 3 is out of range \[0, 3\)"),
    ([1, 2, 3], -1, 1, r"^position: -1 is out of range"),
    ([1, 2, 3], 1.0, 1, r"^position: expected an integer, got 1.0"),
    ([1, 2, 3], True, 1, r"^position: expected an integer"),
    ([1, 2, 3], 0, 96, r"^target: 96 is out of range \[0, 96\)"),
    ([1, 2, 3], 0, "a", r"^target: expected an integer"),
])
def test_input_gradient_bad_arguments(ids, position, target, message):
    model = npgpt2.load_model(FIX / "tiny")
    with pytest.raises(Npgpt2Error, match=message) as e:
        npgpt2.input_gradient(model, ids, position, target)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tokens,message", [
    ([1, 2, 3], r"^tokens: expected token ids of shape \(B, T\), got shape \(3,\)"),
    ([[1.0, 2.0]], r"^tokens: expected token ids .* dtype float64"),
    (np.zeros((1, 0), np.int64), r"^tokens: empty \(shape \(1, 0\)\)"),
    ([[1, 96]], r"^tokens: ids must be in \[0, 96\), got 1..96"),
    ([[-1, 2]], r"^tokens: ids must be in \[0, 96\), got -1..2"),
    (np.zeros((1, 17), np.int64), r"^tokens: 17 positions exceed the context n_ctx=16"),
])
def test_bad_tokens_are_one_line_errors(tokens, message):
    model = npgpt2.load_model(FIX / "tiny")
    for call in (lambda: model.run_with_cache(tokens), lambda: model.run_with_hooks(tokens, {})):
        with pytest.raises(Npgpt2Error, match=message) as e:
            call()
        assert "\n" not in str(e.value)
