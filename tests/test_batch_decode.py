"""Batched decoding (npgpt2/batch_decode.py): rows at their own lengths in one KV cache.

References: each row decoded alone, and (for the logits) the whole sequence run through the
plain forward without any cache (layers.attention_forward, another code path than the cached
attention); the cached attention of a row against layers.attention_forward's rows.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npgpt2
from npgpt2 import batch_decode, kernels, layers
from npgpt2.batch_decode import BatchDecoder, Row, generate_batch, row_rng
from npgpt2.sampling import generate_stream

FIX = Path(__file__).parent / "fixtures"
TOL = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1, 3])
def test_cached_attention_rows_at_their_own_lengths(dtype, T):
    """Rows of a batch at different lengths, in cache rows out of order: each equals the last
    T rows of layers.attention_forward over that row's whole sequence; both twins."""
    rng = np.random.default_rng(1)
    NH, hs, n_ctx = 2, 4, 16
    C = NH * hs
    lengths = [5, 0, 9]            # what each batch row already holds
    rows = [3, 0, 2]               # its cache row
    seqs = [rng.standard_normal((1, n + T, 3 * C)).astype(dtype) for n in lengths]
    for twin in (layers, kernels):
        kc = np.zeros((4, NH, n_ctx, hs), dtype)
        vc = np.zeros_like(kc)
        for b, (n, r) in enumerate(zip(lengths, rows)):  # fill the cache row by row, one position at a time
            for t in range(n):
                twin.attention_forward_cached(seqs[b][:, t:t + 1], kc[r:r + 1], vc[r:r + 1], t, NH)
        qkv = np.concatenate([s[:, -T:] for s in seqs])  # [B, T, 3C]
        out = twin.attention_forward_cached(qkv, kc, vc, np.array(lengths), NH, np.array(rows))
        for b, s in enumerate(seqs):
            want, _ = layers.attention_forward(s.astype(np.float64), NH)
            assert out.dtype == dtype
            assert np.abs(out[b] - want[0, -T:]).max() <= TOL[dtype], twin.__name__


def solo_logits(model, prompt, tokens):
    """Logits before each new token, decoding the row alone (B = 1, a fresh cache)."""
    cache = model.new_cache(1)
    out = [model.forward(np.asarray([prompt]), cache=cache, last_only=True)[0, -1]]
    for t in tokens[:-1]:
        out.append(model.forward(np.asarray([[t]]), cache=cache)[0, -1])
    return np.array(out)


def decode_all(dec, rows, join=None):
    """Step dec until every row of `rows` has its tokens (join() adds rows before each step)
    -> {id(row): the logits each of its tokens was drawn from}."""
    seen = {id(r): [] for r in rows}
    while any(not r.finished for r in rows):
        if join is not None:
            join()
        for row in dec.rows:
            if id(row) in seen:
                seen[id(row)].append(row.logits.copy())
        for row, _ in dec.sample():
            if row.finished:
                dec.leave(row)
        dec.feed()
    return seen


def uncached_logits(model, prompt, tokens):
    """The same logits from the plain forward over each whole sequence (no cache at all)."""
    seq = list(prompt) + list(tokens)
    logits = model.run_with_cache(np.asarray([seq[:-1]]), names=[])[0][0]  # layers.py only
    return logits[len(prompt) - 1:]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_join_and_leave_at_different_steps_and_equal_solo(dtype):
    model = npgpt2.load_model(FIX / "tiny", dtype=dtype)
    V = model.hparams["n_vocab"]
    rng = np.random.default_rng(0)
    # (step it joins, prompt length, tokens, step it is cancelled or None)
    plan = [(0, 3, 9, None), (0, 6, 4, None), (2, 1, 7, None), (3, 11, 5, None), (1, 4, 12, 5), (6, 2, 3, None)]
    rows = [Row(rng.integers(0, V, n).tolist(), length, temperature=0, logprobs=None) for _, n, length, _ in plan]
    seen = {id(r): [] for r in rows}  # the logits each row's tokens were drawn from
    dec = BatchDecoder(model, max_batch=4)
    waiting = list(range(len(rows)))
    step, batch_sizes = 0, []
    while waiting or dec.rows:
        for i in [i for i in waiting if plan[i][0] <= step and not dec.full]:
            dec.add(rows[i])
            waiting.remove(i)
        batch_sizes.append(len(dec.rows))
        for row in dec.rows:
            seen[id(row)].append(row.logits.copy())
        for row, _ in dec.sample():
            i = rows.index(row)
            if row.finished or plan[i][3] == step:
                dec.leave(row)
        dec.feed()
        step += 1
    assert max(batch_sizes) == 4 and len(set(batch_sizes)) >= 3  # rows really came and went
    assert dec.rows == [] and not dec.full
    for (_, _, length, cancel), row in zip(plan, rows):
        assert len(row.tokens) == length if cancel is None else 0 < len(row.tokens) < length
        got = np.array(seen[id(row)])
        solo = solo_logits(model, row.prompt, row.tokens)
        assert np.abs(got - solo).max() <= TOL[dtype] * max(1.0, np.abs(solo).max())
        assert row.tokens == [int(x) for x in solo.argmax(axis=-1)]  # greedy ids equal
        plain = uncached_logits(model, row.prompt, row.tokens)
        assert np.abs(got - plain).max() <= TOL[dtype] * max(1.0, np.abs(plain).max())


def test_float32_rows_get_their_solo_logits_bit_for_bit(monkeypatch):
    """On the kernels every float32 step of <= 8 rows (gemv.py, per-row attention and
    layernorm) computes each row alone: a row's logits in a batch of 1..8 rows joining at
    different steps are its solo logits exactly. Shapes with tails: C = 140 (not a multiple
    of the SIMD width, of gemv._cols' 32-row panels or of its strips), 4C = 560 (17.5 strips of 32)."""
    pytest.importorskip("numba")
    monkeypatch.delenv("NPGPT2_PLAIN", raising=False)
    hp = {"n_vocab": 301, "n_ctx": 32, "n_embd": 140, "n_head": 4, "n_layer": 2}
    model = npgpt2.init_model(hp, seed=3)
    rng = np.random.default_rng(2)
    rows = [Row(rng.integers(0, 301, n).tolist(), 6, temperature=0) for n in (3, 9, 1, 5, 2, 7, 4, 6, 8)]
    dec = BatchDecoder(model, max_batch=8)
    waiting = list(rows)

    def join():
        for _ in range(2):  # two rows join per step while a slot is free
            if waiting and not dec.full:
                dec.add(waiting.pop(0))
    seen = decode_all(dec, rows, join)
    for row in rows:
        np.testing.assert_array_equal(np.array(seen[id(row)]), solo_logits(model, row.prompt, row.tokens))


def test_generate_batch_equals_each_prompt_alone():
    model = npgpt2.load_model(FIX / "full")
    prompts = [[50256], [464, 3797, 3332, 319], [15496, 11], [40, 588, 257, 1263, 3290, 290]]
    got = generate_batch(model, prompts, 8, temperature=1.0, top_k=40, seed=7, max_batch=3)
    for i, p in enumerate(prompts):
        alone = [int(t[0]) for t in generate_stream(model, p, 8, top_k=40, rng=row_rng(7, i))]
        assert got[i] == alone, i
    assert got[0] == npgpt2.generate(model, prompts[0], 8, top_k=40, seed=7)
    # the text of a prompt does not depend on the batch it was in
    assert generate_batch(model, prompts[2:], 8, top_k=40, seed=7)[0] != got[2]  # index 0 now: another stream
    assert generate_batch(model, prompts, 8, top_k=40, seed=7, max_batch=1) == got


def test_unseeded_rows_reuse_a_cached_prefix_and_seeded_ones_start_fresh():
    model = npgpt2.load_model(FIX / "tiny")
    dec = BatchDecoder(model, max_batch=2)
    first = Row([1, 2, 3, 4], 3, temperature=0, reuse=True)
    dec.add(first)
    while dec.rows:
        dec.sample()
        if first.finished:
            dec.leave(first)
        dec.feed()
    again = Row([1, 2, 3, 4] + first.tokens[:2] + [5], 2, temperature=0, reuse=True)
    seeded = Row(list(again.prompt), 2, temperature=0, reuse=False)
    dec.add(seeded)
    dec.add(again)
    assert seeded.reused == 0 and seeded.slot != first.slot  # the warm slot is kept for reuse
    assert again.reused == 6 and again.slot == first.slot    # all but the new token came from the cache
    assert np.abs(again.logits - seeded.logits).max() <= 1e-5 * max(1.0, np.abs(seeded.logits).max())


def test_logprobs_are_the_models_log_softmax():
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    dec = BatchDecoder(model, max_batch=1)
    row = Row([3, 1, 4], 1, temperature=0, logprobs=3, prompt_logprobs=True)
    dec.add(row)
    dec.sample()
    logits = uncached_logits(model, row.prompt, [0])[0]   # the plain forward's next-token logits
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert abs(row.token_logprobs[0] - np.log(p[row.tokens[0]])) < 1e-12
    order = np.argsort(-p, kind="stable")[:3]
    assert [i for i, _ in row.top[0]] == order.tolist()
    assert np.allclose([lp for _, lp in row.top[0]], np.log(p[order]), atol=1e-12)
    assert row.prompt_scores[0] == (None, []) and len(row.prompt_scores) == 3


def test_cli_batch_size_gives_the_same_samples():
    def run(batch):
        return subprocess.run([sys.executable, "-m", "npgpt2.cli", "generate", "--models_dir", str(FIX),
                               "--model_name", "full", "--nsamples", "3", "--batch_size", batch, "--length", "6",
                               "--top_k", "40", "--seed", "3"], capture_output=True, text=True, timeout=120)
    one, three = run("1"), run("3")
    assert one.returncode == 0 and three.returncode == 0, one.stderr + three.stderr
    assert one.stdout == three.stdout and one.stdout.count(" SAMPLE ") == 3


def count_forwards(model, monkeypatch):
    """-> the list of the token shapes of model.forward's calls from now on."""
    shapes, forward = [], model.forward

    def counting(tokens, **kw):
        shapes.append(tokens.shape)
        return forward(tokens, **kw)
    monkeypatch.setattr(model, "forward", counting)
    return shapes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prompts_arriving_together_are_prefilled_together(dtype, monkeypatch):
    """add_many: rows feeding as many tokens share one forward (each at its own cache row and
    position), a prompt-scoring row goes alone; every row then decodes as it would alone."""
    model = npgpt2.load_model(FIX / "tiny", dtype=dtype)
    V = model.hparams["n_vocab"]
    rng = np.random.default_rng(5)
    rows = [Row(rng.integers(0, V, n).tolist(), 5, temperature=0) for n in (4, 7, 4, 7, 4)]
    rows.append(Row(rng.integers(0, V, 4).tolist(), 5, temperature=0, logprobs=2, prompt_logprobs=True))
    dec = BatchDecoder(model, max_batch=8)
    dec.add(Row(rng.integers(0, V, 6).tolist(), 3, temperature=0))  # a row already decoding
    dec.sample()
    dec.feed()
    batches = count_forwards(model, monkeypatch)
    dec.add_many(rows)
    assert sorted(batches) == [(1, 4), (2, 7), (3, 4)]  # 3 x 4 tokens, 2 x 7, the scoring row alone
    assert len({r.slot for r in dec.rows}) == 7
    seen = decode_all(dec, rows)
    for row in rows:
        solo = solo_logits(model, row.prompt, row.tokens)
        got = np.array(seen[id(row)])
        assert np.abs(got - solo).max() <= TOL[dtype] * max(1.0, np.abs(solo).max())
        assert row.tokens == [int(x) for x in solo.argmax(axis=-1)]
    assert len(rows[-1].prompt_scores) == 4


def test_a_prefill_forward_holds_at_most_prefill_tokens(monkeypatch):
    """add_many cuts a group of prompts feeding as many tokens into forwards of at most
    PREFILL_TOKENS tokens (whole prompts; one longer prompt goes alone): the prefill's
    activations stay bounded however many prompts arrive together, and every row still
    decodes as it would alone."""
    monkeypatch.setattr(batch_decode, "PREFILL_TOKENS", 8)
    model = npgpt2.load_model(FIX / "tiny")
    V = model.hparams["n_vocab"]
    rng = np.random.default_rng(11)
    rows = [Row(rng.integers(0, V, n).tolist(), 4, temperature=0) for n in (4, 4, 9, 4, 3, 3, 3, 4)]
    forward = model.forward
    batches = count_forwards(model, monkeypatch)
    BatchDecoder(model, max_batch=8).add_many(rows)
    # 4 x 4 tokens: 2 + 2; 9 tokens: alone; 3 x 3 tokens: 2 + 1
    assert sorted(batches) == [(1, 3), (1, 9), (2, 3), (2, 4), (2, 4)]
    monkeypatch.setattr(model, "forward", forward)
    dec = BatchDecoder(model, max_batch=8)
    dec.add_many(rows)
    seen = decode_all(dec, rows)
    for row in rows:
        solo = solo_logits(model, row.prompt, row.tokens)
        assert np.abs(np.array(seen[id(row)]) - solo).max() <= TOL[np.float32] * max(1.0, np.abs(solo).max())


def test_an_interrupted_prefill_leaves_no_row_behind(monkeypatch):
    """A forward that fails in add_many: the rows it did not prefill leave the decoder (their
    slots free again), the ones prefilled before it stay; the decoder goes on working."""
    model = npgpt2.load_model(FIX / "tiny")
    dec = BatchDecoder(model, max_batch=4)
    rows = [Row([1, 2, 3], 2, temperature=0), Row([4, 5], 2, temperature=0), Row([6, 7], 2, temperature=0)]
    forward, calls = model.forward, []

    def failing(tokens, **kw):
        calls.append(tokens.shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(tokens, **kw)
    monkeypatch.setattr(model, "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        dec.add_many(rows)
    assert dec.rows == [rows[0]] and rows[0].logits is not None
    monkeypatch.setattr(model, "forward", forward)
    dec.add_many(rows[1:])  # the slots are free again, the cache rows as before
    assert len(dec.rows) == 3
    for row in rows[1:]:
        assert row.logits is not None
        np.testing.assert_allclose(row.logits, solo_logits(model, row.prompt, [0])[0], rtol=0, atol=1e-5)
