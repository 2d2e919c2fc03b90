"""Every fast kernel in npgpt2.kernels equals its plain twin in npgpt2.layers.

Shapes are drawn by hypothesis and kept small (the first call of each Numba kernel
compiles it; `cache=True` keeps that out of later runs). The block size of the blockwise
attention and the size from which loops go parallel are lowered here, so that small
shapes take every path: several query blocks, a diagonal block, the parallel loops.
AdamW is also checked against torch.optim.AdamW's trajectory (a committed fixture).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npgpt2 import kernels, layers, optim
from npgpt2.model import ops

FIX = Path(__file__).parent / "fixtures"
DTYPES = [np.float32, np.float64]
# float64 kernels differ from NumPy only by summation order; float32 by that and by
# the kernels' float64 accumulators
TOL = {np.float32: 2e-6, np.float64: 1e-13}
# the fixtures used inside examples (monkeypatching module constants) are safe to share
FAST = settings(max_examples=15, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**32 - 1)


def close(got, want, dtype, scale=None):
    """max |got - want| <= tol * max(1, max |want|) (or * scale), same dtype and shape."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    scale = scale if scale is not None else max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(got.astype(np.float64) - want).max(initial=0.0))
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"


@pytest.fixture(params=["serial", "parallel"], autouse=True)
def threads(request, monkeypatch):
    """Run each test with the serial loops, and again with every loop taking the parallel one."""
    if request.param == "parallel":
        monkeypatch.setattr(kernels, "PARALLEL_MIN", 0)
        # the attention's parts (forward and backward) on two Python threads, whatever the machine's load
        monkeypatch.setattr(kernels.threads, "part_threads", lambda parts: min(2, parts))
    return request.param


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---------------------------------------------------------------- layernorm
@FAST
@given(dtype=dtypes, seed=seeds, lead=st.sampled_from([(1,), (3,), (2, 5), (1, 1, 2)]),
       C=st.integers(1, 70), offset=st.floats(-100, 100))
def test_layernorm(dtype, seed, lead, C, offset):
    rng = np.random.default_rng(seed)
    # an offset far from 0 tests the two-pass variance (one pass would cancel)
    x = randn(rng, lead + (C,), dtype, 3.0) + dtype(offset)
    w, b = randn(rng, (C,), dtype) + dtype(1), randn(rng, (C,), dtype)
    # float32 NumPy subtracts a float32 mean: its error grows with |x| / std(x)
    cond = min(1e4, float(np.abs(x).max() / max(x.astype(np.float64).std(axis=-1).min(), 1e-30)))
    cond = 1.0 if C == 1 else max(1.0, cond)
    want = layers.layernorm_forward(x, w, b)
    got = kernels.layernorm_forward(x, w, b)
    close(got[0], want[0], dtype, scale=max(1.0, float(np.abs(want[0]).max())) * cond)
    close(got[1], want[1], dtype)
    close(got[2], want[2], dtype, scale=max(1.0, float(np.abs(want[2]).max())) * cond)
    dout = randn(rng, x.shape, dtype)
    want = layers.layernorm_backward(dout, x, w, want[1], want[2])
    got = kernels.layernorm_backward(dout, x, w, got[1], got[2])
    for g_, w_ in zip(got, want):
        close(g_, w_, dtype, scale=max(1.0, float(np.abs(w_).max())) * cond * 10)


def test_layernorm_noncontiguous_input():
    rng = np.random.default_rng(0)
    x = randn(rng, (6, 4, 10), np.float64).transpose(1, 0, 2)  # (4, 6, 10) strided
    w, b = randn(rng, (10,), np.float64), randn(rng, (10,), np.float64)
    for g_, w_ in zip(kernels.layernorm_forward(x, w, b), layers.layernorm_forward(x, w, b)):
        close(g_, w_, np.float64)


# ---------------------------------------------------------------- the kernels' exp
def test_exp32_against_float64_exp():
    """kernels._exp32 (the attention's and GELU's float32 exp: a polynomial and an
    exponent written into the bits) within 4e-7 relative of NumPy's float64 exp over its whole
    range; clamped outside it, never inf or 0."""
    from numba import njit

    @njit
    def exp_all(x, out):
        for i in range(x.shape[0]):
            out[i] = kernels._exp32(x[i])

    x = np.concatenate([np.linspace(-87, 88, 400_001, dtype=np.float32),
                        np.float32([0.0, -0.0, 1e-30, -1e-30, 0.34657359, -0.34657359])])
    out = np.empty_like(x)
    exp_all(x, out)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - want) / want) <= 4e-7
    edges = np.float32([-1e4, -88.0, 89.0, 1e4])
    out = np.empty_like(edges)
    exp_all(edges, out)
    assert np.all(np.isfinite(out)) and np.all(out > 0)
    assert out[0] == out[1] and out[2] == out[3]  # clamped


# ---------------------------------------------------------------- GELU, linear
@FAST
@given(dtype=dtypes, seed=seeds, shape=st.sampled_from([(1,), (7,), (2, 3, 17), (1, 1, 64)]),
       scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]))
def test_gelu(dtype, seed, shape, scale):
    rng = np.random.default_rng(seed)
    x, dout = randn(rng, shape, dtype, scale), randn(rng, shape, dtype)
    close(kernels.gelu_forward(x), layers.gelu_forward(x), dtype)
    close(kernels.gelu_backward(dout, x), layers.gelu_backward(dout, x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(5,), (2, 3), (1, 4)])
def test_matmul(dtype, lead):
    rng = np.random.default_rng(1)
    x, w, b = randn(rng, lead + (5,), dtype), randn(rng, (5, 4), dtype), randn(rng, (4,), dtype)
    w0, b0 = w.copy(), b.copy()
    close(kernels.matmul_forward(x, w, b), layers.matmul_forward(x, w, b), dtype)
    # the in-place bias add touches only the fresh product
    assert np.array_equal(w, w0) and np.array_equal(b, b0)
    dout = randn(rng, lead + (4,), dtype)
    for g_, w_ in zip(kernels.matmul_backward(dout, x, w), layers.matmul_backward(dout, x, w)):
        close(g_, w_, dtype)


# ---------------------------------------------------------------- attention
attn_shapes = st.tuples(st.integers(1, 2), st.integers(1, 11), st.integers(1, 3),
                        st.integers(1, 5))  # B, T, NH, hs


def causal_lse(qkv, NH):
    """Each row's log-sum-exp of the masked, scaled scores, straight from the definition
    (float64, independent of both twins): (B*NH, T)."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // NH
    x = qkv.astype(np.float64).reshape(B, T, 3, NH, hs)
    q, k = x[:, :, 0].transpose(0, 2, 1, 3), x[:, :, 1].transpose(0, 2, 1, 3)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
    s[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf
    m = s.max(axis=-1, keepdims=True)
    return (m[..., 0] + np.log(np.exp(s - m).sum(axis=-1))).reshape(B * NH, T)


@FAST
@given(dtype=dtypes, seed=seeds, shape=attn_shapes, qblock=st.sampled_from([1, 3, 4, 128]),
       group=st.sampled_from([1, 1 << 16]))
def test_attention_forward_backward(dtype, seed, shape, qblock, group, monkeypatch_module):
    """The fused attention (whole rows of scores per block of queries, heads one at a time
    or grouped, on one thread or two; backward recomputed from the saved log-sum-exp) gives
    the plain twin's out and dqkv; what each saves differs."""
    B, T, NH, hs = shape
    monkeypatch_module.setattr(kernels, "QBLOCK", qblock)
    monkeypatch_module.setattr(kernels, "GROUP_ELEMS", group)
    rng = np.random.default_rng(seed)
    qkv = randn(rng, (B, T, 3 * NH * hs), dtype, 2.0)
    qkv0 = qkv.copy()
    out_g, saved = kernels.attention_forward(qkv, NH)
    assert np.array_equal(qkv, qkv0)  # the input is only read (the scale goes into the scores, not q)
    out_w, att = layers.attention_forward(qkv, NH)
    close(out_g, out_w, dtype)
    saved_out, lse = saved
    assert saved_out is out_g and lse.shape == (B * NH, T)
    # the scores' own rounding (float32 GEMM over hs terms) bounds the agreement
    score_scale = 1.0 + np.sqrt(hs) * float(np.abs(qkv).max()) ** 2
    np.testing.assert_allclose(lse, causal_lse(qkv, NH), rtol=0, atol=TOL[dtype] * 4 * score_scale)
    dout = randn(rng, (B, T, NH * hs), dtype)
    want = layers.attention_backward(dout, qkv, att, NH)
    # the probabilities both twins differentiate carry that score rounding too (relative
    # error ~ rounding of s), so it scales the gradients' agreement as well: seen failing
    # without it at float32, 1 query and 1 key a block, |dqkv| 3.5, error 8.3e-6 (2.4e-6 relative)
    close(kernels.attention_backward(dout, qkv, saved, NH), want, dtype,
          scale=max(1.0, float(np.abs(want).max())) * score_scale)


def test_fused_attention_gradient_by_finite_differences():
    """Independent of the plain twin: the directional derivative of sum(dout * out) along
    random directions equals <dqkv, direction> (central differences, float64), with
    blocks small enough that both passes take several blocks of queries."""
    rng = np.random.default_rng(7)
    B, T, NH, hs = 2, 9, 2, 3
    qkv = rng.standard_normal((B, T, 3 * NH * hs)) * 2
    dout = rng.standard_normal((B, T, NH * hs))
    mp = pytest.MonkeyPatch()
    mp.setattr(kernels, "QBLOCK", 4)
    try:
        f = lambda x: float((dout * kernels.attention_forward(x, NH)[0]).sum())  # noqa: E731
        dqkv = kernels.attention_backward(dout, qkv, kernels.attention_forward(qkv, NH)[1], NH)
        for _ in range(4):
            u = rng.standard_normal(qkv.shape)
            eps = 1e-5
            numeric = (f(qkv + eps * u) - f(qkv - eps * u)) / (2 * eps)
            assert numeric == pytest.approx(float((dqkv * u).sum()), rel=1e-7, abs=1e-8)
    finally:
        mp.undo()


@FAST
@given(dtype=dtypes, seed=seeds, shape=attn_shapes, pos0=st.integers(0, 6),
       qblock=st.sampled_from([2, 128]), group=st.sampled_from([1, 1 << 16]))
def test_attention_cached_prefill_and_decode(dtype, seed, shape, pos0, qblock, group, monkeypatch_module):
    """A prompt of T positions after pos0 cached ones, then two single-token steps."""
    B, T, NH, hs = shape
    monkeypatch_module.setattr(kernels, "QBLOCK", qblock)
    monkeypatch_module.setattr(kernels, "GROUP_ELEMS", group)
    rng = np.random.default_rng(seed)
    n_ctx = pos0 + T + 3
    C = NH * hs
    caches = {}
    for name in ("plain", "fast"):
        kc = np.zeros((B, NH, n_ctx, hs), dtype)
        vc = np.zeros_like(kc)
        caches[name] = kc, vc
    before = randn(rng, (2, B, NH, pos0, hs), dtype)
    for kc, vc in caches.values():
        kc[:, :, :pos0], vc[:, :, :pos0] = before
    steps = [(pos0, randn(rng, (B, T, 3 * C), dtype, 2.0)),
             (pos0 + T, randn(rng, (B, 1, 3 * C), dtype, 2.0)),
             (pos0 + T + 1, randn(rng, (B, 1, 3 * C), dtype, 2.0))]
    for p0, qkv in steps:
        want = layers.attention_forward_cached(qkv, *caches["plain"], p0, NH)
        got = kernels.attention_forward_cached(qkv, *caches["fast"], p0, NH)
        close(got, want, dtype)
        assert np.array_equal(caches["fast"][0], caches["plain"][0])
        assert np.array_equal(caches["fast"][1], caches["plain"][1])


def test_cached_attention_equals_full_attention_rows():
    """Independent of layers' cached version: rows of the full causal attention."""
    rng = np.random.default_rng(3)
    B, T, NH, hs = 2, 9, 3, 4
    qkv = randn(rng, (B, T, 3 * NH * hs), np.float64)
    full, _ = layers.attention_forward(qkv, NH)
    kc = np.zeros((B, NH, 16, hs))
    vc = np.zeros_like(kc)
    parts = [kernels.attention_forward_cached(qkv[:, :4], kc, vc, 0, NH)]
    parts += [kernels.attention_forward_cached(qkv[:, t:t + 1], kc, vc, t, NH) for t in range(4, T)]
    close(np.concatenate(parts, axis=1), full, np.float64)


@pytest.fixture
def monkeypatch_module():
    """A MonkeyPatch usable inside hypothesis examples (undone after each test)."""
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# ---------------------------------------------------------------- cross-entropy, embeddings
@FAST
@given(dtype=dtypes, seed=seeds, B=st.integers(1, 3), T=st.integers(1, 4), V=st.integers(2, 300),
       scale=st.sampled_from([0.1, 3.0, 60.0]))
def test_crossentropy(dtype, seed, B, T, V, scale):
    rng = np.random.default_rng(seed)
    logits = randn(rng, (B, T, V), dtype, scale)
    targets = rng.integers(0, V, (B, T))
    lw, pw = layers.crossentropy_forward(logits, targets)
    lg, pg = kernels.crossentropy_forward(logits, targets)
    close(lg, lw, dtype)
    close(pg, pw, dtype)
    assert np.all(np.isfinite(lg))
    dl = randn(rng, (B, T), dtype)
    close(kernels.crossentropy_softmax_backward(dl, pw, targets),
          layers.crossentropy_softmax_backward(dl, pw, targets), dtype)


@FAST
@given(dtype=dtypes, seed=seeds, B=st.integers(1, 3), T=st.integers(1, 4), V=st.integers(2, 300))
def test_crossentropy_in_place(dtype, seed, B, T, V):
    """out= (both twins): probs written over the logits, then dlogits over the probs, give
    what the allocating calls give, in the very buffer that was passed."""
    rng = np.random.default_rng(seed)
    logits = randn(rng, (B, T, V), dtype, 3.0)
    targets = rng.integers(0, V, (B, T))
    dl = randn(rng, (B, T), dtype)
    for lay in (layers, kernels):
        want_losses, want_probs = lay.crossentropy_forward(logits, targets)
        want_dlogits = lay.crossentropy_softmax_backward(dl, want_probs, targets)
        buf = logits.copy()
        losses, probs = lay.crossentropy_forward(buf, targets, out=buf)
        assert probs is buf or np.shares_memory(probs, buf)
        np.testing.assert_array_equal(losses, want_losses)
        np.testing.assert_array_equal(probs, want_probs)
        dlogits = lay.crossentropy_softmax_backward(dl, probs, targets, out=probs)
        assert np.shares_memory(dlogits, buf)
        np.testing.assert_array_equal(dlogits, want_dlogits)
        other = np.empty_like(logits)  # out= a third array: probs is left as it was
        dlogits = lay.crossentropy_softmax_backward(dl, want_probs, targets, out=other)
        assert np.shares_memory(dlogits, other)
        np.testing.assert_array_equal(dlogits, want_dlogits)
        np.testing.assert_array_equal(lay.crossentropy_forward(logits, targets)[1], want_probs)


def test_crossentropy_rejects_bad_out():
    logits = np.zeros((1, 2, 5), np.float32)
    for bad in (np.zeros((1, 2, 5), np.float64), np.zeros((1, 2, 4), np.float32),
                np.zeros((1, 5, 2), np.float32).transpose(0, 2, 1)):
        with pytest.raises(ValueError, match="out"):
            kernels.crossentropy_forward(logits, np.array([[0, 1]]), out=bad)


def test_crossentropy_rejects_bad_target():
    logits = np.zeros((1, 2, 5), np.float32)
    with pytest.raises(IndexError):
        kernels.crossentropy_forward(logits, np.array([[0, 5]]))
    with pytest.raises(IndexError):
        kernels.crossentropy_softmax_backward(np.ones((1, 2), np.float32), logits, np.array([[-1, 0]]))


@FAST
@given(dtype=dtypes, seed=seeds, B=st.integers(1, 3), T=st.integers(1, 6), V=st.integers(1, 9),
       C=st.integers(1, 8))
def test_embedding_backward(dtype, seed, B, T, V, C):
    rng = np.random.default_rng(seed)
    inp = rng.integers(0, V, (B, T))  # a small vocab: tokens repeat and must accumulate
    dout = randn(rng, (B, T, C), dtype)
    for g_, w_ in zip(kernels.embedding_backward(dout, inp, V, T + 2), layers.embedding_backward(dout, inp, V, T + 2)):
        close(g_, w_, dtype)


# ---------------------------------------------------------------- AdamW
@FAST
@given(dtype=dtypes, seed=seeds, shape=st.sampled_from([(1,), (13,), (3, 5), (2, 3, 4)]),
       wd=st.sampled_from([0.0, 0.1]))
def test_adamw_equals_plain_twin(dtype, seed, shape, wd):
    rng = np.random.default_rng(seed)
    p, m = randn(rng, shape, dtype), randn(rng, shape, dtype, 0.1)
    v = np.abs(randn(rng, shape, dtype, 0.01))
    fast = [p.copy(), m.copy(), v.copy()]
    plain = [p.copy(), m.copy(), v.copy()]
    for step in (1, 2, 3):
        g = randn(rng, shape, dtype)
        kernels.adamw_update(fast[0], g, fast[1], fast[2], 1e-2, 0.9, 0.999, 1e-8, wd, step)
        optim.adamw_update(plain[0], g, plain[1], plain[2], 1e-2, 0.9, 0.999, 1e-8, wd, step)
    for f, q in zip(fast, plain):
        close(f, q, dtype)


def test_adamw_matches_torch_trajectory():
    ref = np.load(FIX / "adamw_reference.npz")
    hp = [float(ref[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")]
    p, pb = ref["p0"].copy(), ref["p0b"].copy()
    state = [np.zeros_like(p), np.zeros_like(p), np.zeros_like(pb), np.zeros_like(pb)]
    for t in range(1, int(ref["steps"]) + 1):
        kernels.adamw_update(p, ref[f"g{t}"], state[0], state[1], *hp, t)
        kernels.adamw_update(pb, ref[f"gb{t}"], state[2], state[3], *hp, t)
        np.testing.assert_allclose(p, ref[f"p{t}"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(pb, ref[f"pb{t}"], rtol=1e-12, atol=1e-14)


def test_adamw_rejects_strided_or_readonly():
    p = np.zeros((4, 4))
    with pytest.raises(ValueError):
        kernels.adamw_update(p[:, ::2], p[:, ::2], p[:, ::2], p[:, ::2], 1e-3, 0.9, 0.999, 1e-8, 0, 1)
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        kernels.adamw_update(ro, np.zeros(3), np.zeros(3), np.zeros(3), 1e-3, 0.9, 0.999, 1e-8, 0, 1)


# ---------------------------------------------------------------- the switch and the cache
def test_plain_switch(monkeypatch):
    monkeypatch.setenv("NPGPT2_PLAIN", "1")
    assert ops() is layers
    monkeypatch.setenv("NPGPT2_PLAIN", "0")
    assert ops() is kernels
    monkeypatch.delenv("NPGPT2_PLAIN")
    assert ops() is kernels


def test_twins_are_listed_and_keep_their_plain_signature():
    """kernels.TWINS are the fast twins: each differs from, and takes the same arguments
    as, its plain namesake (the plain one may add optional ones, e.g. a hook for
    learners); kernels.PLAIN are the plain functions themselves; together
    they cover every public function of layers.py (so ops() can swap the modules)."""
    import inspect
    plain_of = {name: getattr(layers, name, None) for name in kernels.TWINS}
    plain_of["adamw_update"] = optim.adamw_update
    for name, plain in plain_of.items():
        fast = getattr(kernels, name)
        assert callable(plain) and fast is not plain, name
        fast_p = list(inspect.signature(fast).parameters.values())
        plain_p = list(inspect.signature(plain).parameters.values())
        # the one by-design difference: attention_backward takes whatever attention_forward
        # saved (the plain twin names it after what it saves, the probabilities)
        plain_names = ["saved" if (name, p.name) == ("attention_backward", "att") else p.name
                       for p in plain_p[:len(fast_p)]]
        assert [p.name for p in fast_p] == plain_names, name
        assert all(p.default is not p.empty for p in plain_p[len(fast_p):]), name
    for name in kernels.PLAIN:
        assert getattr(kernels, name) is getattr(layers, name), name
    public = {n for n, f in vars(layers).items() if inspect.isfunction(f) and not n.startswith("_")}
    assert public <= set(kernels.TWINS) | set(kernels.PLAIN)


def test_second_process_loads_compiled_kernels_from_cache(threads):
    """Numba's cache=True: a fresh process runs the kernels without compiling them again."""
    if threads == "parallel":
        pytest.skip("once is enough")
    rng = np.random.default_rng(0)
    x = randn(rng, (2, 3, 8), np.float32)
    kernels.layernorm_forward(x, np.ones(8, np.float32), np.zeros(8, np.float32))  # compiled + cached here
    code = ("import numpy as np\n"
            "from npgpt2 import kernels\n"
            "x = np.ones((2, 3, 8), np.float32)\n"
            "kernels.layernorm_forward(x, np.ones(8, np.float32), np.zeros(8, np.float32))\n"
            "s = kernels._ln_fwd.stats\n"
            "print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent.parent, timeout=120, check=True).stdout.split()
    hits, misses = int(out[0]), int(out[1])
    assert hits >= 1 and misses == 0


# ---------------------------------------------------------------- the model's shortcuts
@pytest.mark.parametrize("plain", [False, True])
def test_prefill_last_only_skips_work_not_results(plain, monkeypatch):
    """A prompt prefilled with last_only (the last layer runs only the last position past
    its keys and values) leaves the cache and the logits a full forward gives, and decoding
    continues from that cache identically; on both paths."""
    import npgpt2
    if plain:
        monkeypatch.setenv("NPGPT2_PLAIN", "1")
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    tokens = np.random.default_rng(5).integers(0, 96, (2, 12))
    full = model.forward(tokens)
    cache_a, cache_b = model.new_cache(2), model.new_cache(2)
    model.forward(tokens[:, :3], cache=cache_a)
    last = model.forward(tokens[:, 3:10], cache=cache_a, last_only=True)  # after a cached start
    model.forward(tokens[:, :10], cache=cache_b)
    assert last.shape == (2, 1, 96)
    close(last[:, 0], full[:, 9], np.float64)
    close(cache_a.k[:, :, :, :10], cache_b.k[:, :, :, :10], np.float64)
    close(cache_a.v[:, :, :, :10], cache_b.v[:, :, :, :10], np.float64)
    step = model.forward(tokens[:, 10:11], cache=cache_a)
    close(step[:, 0], full[:, 10], np.float64)
    # without a cache too
    close(model.forward(tokens[:, :7], last_only=True)[:, 0], full[:, 6], np.float64)
