"""Sampling rules, seeded reproducibility, prompt fitting, and the stop-string text stream."""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npgpt2
from npgpt2.errors import Npgpt2Error
from npgpt2.sampling import TextStream, check_sampling_args, fit_prompt, sample_logits

FIX = Path(__file__).parent / "fixtures"


def draws(logits, n=4000, **kw):
    rng = np.random.default_rng(0)
    return np.array([sample_logits(np.asarray([logits]), rng, **kw)[0] for _ in range(n)])


def test_temperature_zero_is_greedy():
    logits = np.array([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert sample_logits(logits, np.random.default_rng(0), temperature=0).tolist() == [1, 0]


def test_frequencies_follow_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    freq = np.bincount(draws(logits, 20000), minlength=4) / 20000
    # 4 sigma of a binomial with n=20000 is at most 0.0142
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_top_k_keeps_only_k_most_likely():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    got = set(draws(logits, top_k=2).tolist())
    assert got == {1, 3}
    freq = np.bincount(draws(logits, 20000, top_k=2), minlength=5) / 20000
    np.testing.assert_allclose(freq[[1, 3]], [0.4 / 0.7, 0.3 / 0.7], atol=0.015)


def test_top_p_keeps_smallest_head_reaching_p():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    assert set(draws(logits, top_p=0.6).tolist()) == {1, 3}      # 0.4 < 0.6 <= 0.7
    assert set(draws(logits, top_p=0.7).tolist()) == {1, 3}      # 0.4 + 0.3 reaches 0.7
    assert set(draws(logits, top_p=0.71).tolist()) == {1, 3, 4}
    assert set(draws(logits, top_p=0.1).tolist()) == {1}          # never empty


def test_high_temperature_flattens():
    logits = np.log(np.array([0.9, 0.1]))
    freq = np.bincount(draws(logits, 20000, temperature=100.0), minlength=2) / 20000
    assert abs(freq[0] - 0.5) < 0.03


def test_bad_sampling_args_name_the_flag():
    for kw, flag in [({"temperature": -1}, "--temperature"), ({"top_k": -2}, "--top_k"),
                     ({"top_p": 0}, "--top_p"), ({"top_p": 1.5}, "--top_p")]:
        with pytest.raises(Npgpt2Error, match=flag):
            check_sampling_args(**kw)


def test_fit_prompt_left_trims(caplog):
    assert fit_prompt([1, 2, 3], 5, 10) == [1, 2, 3]
    with caplog.at_level("WARNING"):
        assert fit_prompt(list(range(20)), 6, 10) == [16, 17, 18, 19]
    assert "keeping its last 4 tokens" in caplog.text
    with pytest.raises(Npgpt2Error, match="--length"):
        fit_prompt([1], 10, 10)
    with pytest.raises(Npgpt2Error, match="empty"):
        fit_prompt([], 3, 10)


@pytest.fixture(scope="module")
def model():
    return npgpt2.load_model(FIX / "full")


def test_same_seed_same_tokens_twice_in_one_process(model):
    a = npgpt2.generate(model, [50256], 20, top_k=40, seed=7)
    b = npgpt2.generate(model, [50256], 20, top_k=40, seed=7)
    c = npgpt2.generate(model, [50256], 20, top_k=40, seed=8)
    assert a == b and a != c
    assert len(a) == 20 and all(0 <= t < 50257 for t in a)


def test_generate_uses_the_model_greedily(model):
    # greedy decoding must pick the argmax of a full recompute at every step
    prompt = [464, 2068, 7586]
    out = npgpt2.generate(model, prompt, 6, temperature=0)
    seq = list(prompt)
    for t in out:
        assert t == int(model.forward(np.array([seq]))[0, -1].argmax())
        seq.append(t)


def test_prompt_outside_vocab_is_an_error(model):
    with pytest.raises(Npgpt2Error, match="outside the model's vocabulary"):
        npgpt2.generate(model, [60000], 3)


class CharTok:
    """A stand-in tokenizer whose tokens are raw bytes, to drive TextStream precisely."""

    def decode_bytes(self, ids):
        return bytes(ids)


def feed(stream, data):
    out = ""
    for b in data:
        text, stopped = stream.push(b)
        out += text
        if stopped:
            return out, True
    return out + stream.finish(), False


def test_text_stream_stops_before_stop_string():
    out, stopped = feed(TextStream(CharTok(), ["<|end|>"]), b"hello <|en world <|end|> never")
    assert stopped and out == "hello <|en world "


def test_text_stream_never_shows_a_stop_prefix_early():
    s = TextStream(CharTok(), ["STOP"])
    shown = "".join(s.push(b)[0] for b in b"abcST")
    assert shown == "ab"  # the last 3 characters could still begin "STOP"
    shown += s.push(ord("O"))[0]
    assert shown == "abc"
    text, stopped = s.push(ord("P"))
    assert stopped and text == "" and s.shown_text == "abc"
    assert s.push(ord("x")) == ("", True) and s.finish() == ""


def test_text_stream_holds_partial_utf8():
    data = "naïve ☃ 😀".encode()
    s = TextStream(CharTok())
    pieces = [s.push(b)[0] for b in data]
    assert "".join(pieces) + s.finish() == "naïve ☃ 😀"
    assert "\ufffd" not in "".join(pieces)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab<|>", max_size=30), st.sampled_from(["<|>", "ab", "b", "<||>"]))
def test_text_stream_equals_cut_at_first_occurrence(text, stop):
    out, stopped = feed(TextStream(CharTok(), [stop]), text.encode())
    i = text.find(stop)
    assert out == (text if i < 0 else text[:i])
    assert stopped == (i >= 0)


@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_nucleus_head_is_the_full_sorts_nucleus(scale):
    """nucleus_head looks only at the n most likely logits (n growing until the nucleus closes
    inside them, before any tie it may have cut); its nucleus is the one a full sort by
    (logit descending, id) gives, ties at the edge included."""
    from npgpt2.sampling import nucleus_head, nucleus_size
    rng = np.random.default_rng(int(scale * 10))
    for trial in range(20):
        row = np.round(rng.standard_normal(5000) * scale, 1)  # rounded: many ties
        row[rng.integers(0, 5000, 300)] = row.max()            # a large tie at the top
        top_p = float(rng.uniform(0.05, 0.99))
        order = sorted(range(row.size), key=lambda i: (-row[i], i))
        p = np.exp(row[order] - row.max())
        p /= p.sum()
        want = order[:int(np.searchsorted(np.cumsum(p), top_p) + 1)]
        ids, probs = nucleus_head(row, top_p)
        keep = nucleus_size(probs, top_p)
        assert ids[:keep].tolist() == want, (trial, top_p)
        np.testing.assert_allclose(probs[:keep], p[:keep], rtol=1e-12)


def test_draw_finds_the_interval_of_u():
    """draw(weights, u) is the index whose interval of the cumulative sum holds u * total,
    checked against an exact running sum (fractions) for u away from the intervals' edges;
    zero weights are never drawn."""
    from fractions import Fraction

    from npgpt2.sampling import DRAW_BLOCK, draw
    rng = np.random.default_rng(3)
    for n in (7, 4 * DRAW_BLOCK, 5 * DRAW_BLOCK + 17, 50257):
        w = rng.random(n) ** 8
        w[rng.integers(0, n, n // 10)] = 0.0
        w[-1] = 0.0
        exact = np.cumsum([Fraction(x) for x in w]) if n < 100 else None
        edges = np.cumsum(w.astype(np.longdouble))
        total = edges[-1]
        for u in rng.random(300):
            want = int(np.searchsorted(edges, u * total, side="right"))
            if exact is not None:
                want = next(i for i, c in enumerate(exact) if c > Fraction(u) * exact[-1])
            near = np.abs(edges - u * total).min() < 1e-9 * total
            if not near:
                got = draw(w, float(u))
                assert got == want and w[got] > 0, (n, u)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # temperature 1e-308 once printed NumPy's overflow warnings
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sample_row_is_sample_logits_draw_for_draw(dtype):
    """The batch path's sample_row draws what sample_logits draws, from the same random
    stream, for each kind of settings (its own no-cut path: temperature 1 and others, the
    greedy limit of a tiny temperature, non-finite logits; the cuts: delegated), with its
    buffer reused between rows of different values."""
    from npgpt2.sampling import sample_row
    rng = np.random.default_rng(5)
    work = np.empty(50257)
    for V in (50257, 300):
        for temperature, top_k, top_p in ((1.0, 0, 1.0), (1, 0, 1.0), (0.7, 0, 1.0), (1.9, 0, 1.0), (1e-308, 0, 1.0),
                                          (0.0, 0, 1.0), (1.0, 40, 1.0), (0.8, 0, 0.9), (1.2, 5, 0.5)):
            a, b = np.random.default_rng(V), np.random.default_rng(V)
            for _ in range(30):
                logits = (rng.standard_normal(V) * rng.uniform(0.5, 8)).astype(dtype)
                want = int(sample_logits(logits[None], a, temperature, top_k, top_p)[0])
                got = sample_row(logits, b, temperature, top_k, top_p, work if V == 50257 else None)
                assert got == want, (V, temperature, top_k, top_p)
            assert a.random() == b.random()  # as many draws taken from each stream
    for bad in (np.nan, np.inf, -np.inf):
        logits = rng.standard_normal(300).astype(dtype)
        logits[17] = bad
        a, b = np.random.default_rng(1), np.random.default_rng(1)
        assert sample_row(logits, b) == int(sample_logits(logits[None], a)[0])
        assert a.random() == b.random()
