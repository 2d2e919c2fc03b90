"""Decoding on the plain layers (NPGPT2_PLAIN=1) runs the readable forward with a KV cache.

GPT2.forward(tokens, cache=...) then goes embed -> GPT2._block_forward (attention against the
cache) -> ln_f -> head, the code training and run_with_cache run, not GPT2._forward_fast. Its
logits must equal the fast path's (the Numba kernels' _forward_fast, and _forward_fast on the
plain layers) and a full forward without a cache over the whole sequence, in float64 to 1e-12;
for batched rows at different lengths too. The full forward itself is held to HF's logits by
test_model.py.
"""
from pathlib import Path

import numpy as np
import pytest

import npgpt2
from npgpt2 import layers
from npgpt2.model import GPT2
from npgpt2.sampling import generate

FIX = Path(__file__).parent / "fixtures"
TOL = 1e-12


@pytest.fixture(scope="module")
def model():
    return npgpt2.load_model(FIX / "tiny", dtype=np.float64)


def fast_layer_modules():
    """The layer modules _forward_fast is checked with: the plain layers, and the kernels when
    Numba is there."""
    mods = [layers]
    try:
        from npgpt2 import kernels
        mods.append(kernels)
    except ImportError:
        pass
    return mods


def no_fast_path(monkeypatch):
    """NPGPT2_PLAIN=1, and _forward_fast fails if anything calls it."""
    monkeypatch.setenv("NPGPT2_PLAIN", "1")

    def refuse(*a, **k):
        raise AssertionError("the plain path ran _forward_fast")
    monkeypatch.setattr(GPT2, "_forward_fast", refuse)


def decode_steps(forward, model, rows, prompts, steps, token_of):
    """Prefill each cache row with its prompt (rows at different lengths), then `steps` steps
    that feed every row one token in one forward. Returns the list of every forward's logits."""
    cache = model.new_cache(max(rows) + 1)
    out = []
    for r, prompt in zip(rows, prompts):
        out.append(forward(np.asarray([prompt]), cache.select([r]), True))  # [1, 1, V]
    for s in range(steps):
        tokens = np.asarray([[token_of(r, s)] for r in rows])  # [B, 1]
        out.append(forward(tokens, cache.select(rows), False))  # [B, 1, V]
    return out, cache


def test_plain_decoding_runs_the_block_forward_not_the_fast_one(model, monkeypatch):
    no_fast_path(monkeypatch)
    calls = []
    real = GPT2._block_forward
    monkeypatch.setattr(GPT2, "_block_forward", lambda self, *a, **k: calls.append(a[4] is not None) or real(self, *a, **k))
    ids = generate(model, [5, 17, 3], length=4, top_k=1)
    assert len(ids) == 4
    # prefill + 3 single-token steps, each through both blocks, each with the layer's cache
    assert calls == [True] * (4 * model.hparams["n_layer"])


@pytest.mark.parametrize("mod", fast_layer_modules(), ids=lambda m: m.__name__.split(".")[-1])
def test_greedy_generation_equals_the_fast_path(model, mod, monkeypatch):
    prompt = [5, 17, 3, 88, 41]
    want = []
    with monkeypatch.context() as m:  # the fast path: _forward_fast on mod, whatever ops() says
        m.setattr(GPT2, "forward", lambda self, tokens, cache=None, last_only=False:
                  self._forward_fast(mod, np.asarray(tokens), cache, last_only))
        want = generate(model, prompt, length=9, top_k=1)
    no_fast_path(monkeypatch)
    assert generate(model, prompt, length=9, top_k=1) == want
    assert generate(model, prompt, length=9, temperature=0.8, seed=3) == generate(model, prompt, length=9,
                                                                                  temperature=0.8, seed=3)


@pytest.mark.parametrize("mod", fast_layer_modules(), ids=lambda m: m.__name__.split(".")[-1])
def test_batched_rows_at_different_lengths_equal_the_fast_path_and_the_full_forward(model, mod, monkeypatch):
    rows = [2, 0, 3]  # cache rows in a scrambled order; row 1 stays empty
    prompts = [[5, 17, 3, 88, 41, 7], [9], [60, 61, 62]]
    token_of = lambda r, s: (7 * r + 11 * s + 1) % model.hparams["n_vocab"]  # noqa: E731
    want, _ = decode_steps(lambda t, c, last: model._forward_fast(mod, t, c, last), model, rows, prompts, 4, token_of)
    no_fast_path(monkeypatch)
    got, cache = decode_steps(lambda t, c, last: model.forward(t, cache=c, last_only=last), model, rows, prompts,
                              4, token_of)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= TOL
    assert list(cache.lengths) == [1 + 4, 0, 6 + 4, 3 + 4]
    # each row's whole sequence through the forward without a cache: its logits at the fed positions
    for b, (r, prompt) in enumerate(zip(rows, prompts)):
        seq = prompt + [token_of(r, s) for s in range(4)]
        full = model.forward(np.asarray([seq]))[0]  # [T, V]
        assert np.abs(got[b][0, -1] - full[len(prompt) - 1]).max() <= TOL
        for s in range(4):
            assert np.abs(got[len(rows) + s][b, 0] - full[len(prompt) + s]).max() <= TOL


def test_plain_prefill_in_pieces_equals_the_full_forward(model, monkeypatch):
    """A prompt fed in three pieces (the causal mask offset by the cached length) gives every
    position the logits of one forward over the whole prompt; the cache is the same as after
    one piece."""
    no_fast_path(monkeypatch)
    tokens = np.asarray([[5, 17, 3, 88, 41, 7, 2, 90, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    full = model.forward(tokens)  # [2, 9, V]
    cache = model.new_cache(2)
    parts = [model.forward(tokens[:, a:b], cache=cache) for a, b in ((0, 4), (4, 5), (5, 9))]
    assert np.abs(np.concatenate(parts, axis=1) - full).max() <= TOL
    one = model.new_cache(2)
    model.forward(tokens, cache=one)
    assert np.abs(cache.k[:, :, :, :9] - one.k[:, :, :, :9]).max() <= TOL
    assert np.abs(cache.v[:, :, :, :9] - one.v[:, :, :, :9]).max() <= TOL


def test_an_interrupted_plain_forward_leaves_the_cache_lengths(model, monkeypatch):
    no_fast_path(monkeypatch)
    cache = model.new_cache(1)
    model.forward(np.asarray([[1, 2, 3]]), cache=cache)
    real = layers.gelu_forward
    monkeypatch.setattr(layers, "gelu_forward", lambda x: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        model.forward(np.asarray([[4]]), cache=cache)
    monkeypatch.setattr(layers, "gelu_forward", real)
    assert list(cache.lengths) == [3]
