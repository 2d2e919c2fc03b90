"""The trained models shipped in npgpt2/examples/: they load, and the induction model has
what tools/train_examples.py says it learnt, measured here on fresh random sequences with
run_with_cache (the scores are computed in this file, by indexing the patterns directly).
"""
import math

import numpy as np
import pytest

import npgpt2
from npgpt2 import explain
from npgpt2.cli import main
from npgpt2.errors import Npgpt2Error


@pytest.fixture(scope="module")
def induction():
    folder = npgpt2.example_dir("induction")
    return npgpt2.load_model(folder), npgpt2.load_tokenizer(folder)


def repeated(rng, V, n, prefix, span, gap):
    """n rows: `prefix` random tokens, a random span, `gap` random tokens, the span again."""
    first = rng.integers(0, V, size=(n, prefix + span + gap))
    return np.concatenate([first, first[:, prefix:prefix + span]], axis=1), prefix, prefix + span + gap


def test_example_dir_names_and_the_error():
    for name in ("induction", "jargon"):
        d = npgpt2.example_dir(name)
        assert d.name == name and (d / "hparams.json").is_file() and (d / "checkpoint").is_file()
    with pytest.raises(Npgpt2Error, match="unknown example 'nope' \\(choose one of induction, jargon\\)") as e:
        npgpt2.example_dir("nope")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("prefix, span, gap", [(1, 10, 0), (5, 8, 3), (2, 6, 10), (3, 12, 4)])
def test_induction_second_copy_is_predicted_first_is_chance(induction, prefix, span, gap):
    model, _ = induction
    V = model.hparams["n_vocab"]
    toks, s1, s2 = repeated(np.random.default_rng(prefix), V, 32, prefix, span, gap)
    logits = model.forward(toks).astype(np.float64)                            # (32, T, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], toks[:, 1:, None], axis=-1)[..., 0]  # position t predicts t + 1
    first = nll[:, s1:s1 + span - 1].mean()                                   # inside the first copy
    second = nll[:, s2 + 1:s2 + span - 1].mean()                              # the copy, from its 2nd token on
    assert abs(first - math.log(V)) < 0.25, first                             # chance: log 128 = 4.85
    assert second < 0.3, second                                               # measured 0.04-0.10


def head_scores(model, period, offset):
    """(prev, shifted): per head, layer 0's mean weight on t - 1, and layer 1's on
    t - period + offset (offset 1: the token after the previous occurrence of the current one)
    over the second half of 32 random blocks repeated once."""
    V = model.hparams["n_vocab"]
    r = np.random.default_rng(period).integers(0, V, size=(32, period))
    _, acts = model.run_with_cache(np.concatenate([r, r], axis=1), names=["h0.attn.pattern", "h1.attn.pattern"])
    T = 2 * period
    t = np.arange(1, T)
    prev = acts["h0.attn.pattern"][:, :, t, t - 1].mean(axis=(0, 2))          # (NH,)
    t = np.arange(period + 1, T)
    shifted = acts["h1.attn.pattern"][:, :, t, t - period + offset].mean(axis=(0, 2))  # (NH,)
    return prev, shifted


@pytest.mark.parametrize("period", [8, 12, 16])
def test_induction_heads_by_their_patterns(induction, period):
    """The textbook circuit: a previous-token head in layer 0; in layer 1 an induction head that
    attends to the token right after the previous occurrence of the current one (t - period + 1),
    not one place further (the circuit an earlier recipe formed)."""
    model, _ = induction
    prev, textbook = head_scores(model, period, 1)
    _, further = head_scores(model, period, 2)
    assert prev.max() > 0.6, prev                # measured 0.93, 0.77, 0.68 (it fades with position)
    assert textbook.max() > 0.6, textbook        # measured 0.67, 0.74, 0.73
    assert further.max() < 0.1, further          # measured 0.02-0.04


def test_ablating_the_induction_heads_loses_the_copy(induction):
    """Zero layer 1's attention output (both heads score as induction heads) with a hook: the
    second copy's loss goes back to about chance, the first copy's barely moves."""
    model, _ = induction
    V = model.hparams["n_vocab"]
    toks, s1, s2 = repeated(np.random.default_rng(7), V, 32, 3, 12, 2)

    def losses(hooks):
        logits = model.run_with_hooks(toks, hooks).astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp[:, :-1], toks[:, 1:, None], axis=-1)[..., 0]
        return nll[:, s1:s1 + 11].mean(), nll[:, s2 + 1:s2 + 11].mean()

    first, second = losses({})
    first_ab, second_ab = losses({"h1.attn.z": lambda z: np.zeros_like(z)})
    assert second < 0.3 and second_ab > 3.0, (second, second_ab)   # measured 0.01 -> 6.6
    assert abs(first_ab - first) < 0.5, (first, first_ab)


def test_induction_text_through_the_tokenizer(induction):
    model, tok = induction
    ids = tok.encode("cat dog red blue sun moon tree fish cat dog red blue sun moon")
    nxt = model.forward(np.array([ids]))[0, -1]
    assert tok.decode([int(nxt.argmax())]) == " tree"


def test_trained_examples_do_not_look_random(induction):
    model, tok = induction
    r = explain.build_report(model, tok, "cat dog red blue sun cat dog red")
    assert r["random_weights"]["verdict"] is False
    jargon = npgpt2.load_model(npgpt2.example_dir("jargon"))
    r = explain.build_report(jargon, npgpt2.load_tokenizer(npgpt2.example_dir("jargon")), "hacker: a person who")
    assert r["random_weights"]["verdict"] is False


def test_random_init_is_said_to_be_random():
    model = npgpt2.init_model(dict(n_vocab=50257, n_ctx=32, n_embd=32, n_head=2, n_layer=2), seed=3)
    r = explain.build_report(model, npgpt2.load_tokenizer(), "The quick brown fox jumps")
    assert r["random_weights"]["verdict"] is True and r["random_weights"]["untouched"] is True
    for name, p in model.params.items():  # biases moved a little: the init scale still tells
        if name.endswith("/b"):
            p[...] = 0.01
    r = explain.build_report(model, npgpt2.load_tokenizer(), "The quick brown fox jumps")
    rw = r["random_weights"]
    assert rw["verdict"] is True and rw["untouched"] is False
    assert 0.9 < rw["weight_std_ratio"] < 1.1 and rw["attention_uniformity"] > 0.99
    assert explain.format_report(r, 80).startswith("warning: these weights look untrained")


def test_jargon_loads_int8_and_float(capsys):
    folder = npgpt2.example_dir("jargon")
    f32 = npgpt2.load_model(folder)
    i8 = npgpt2.load_model(folder, dtype="int8")
    assert f32.weight_dtype != "int8" and i8.weight_dtype == "int8"
    ids = npgpt2.load_tokenizer(folder).encode("hacker: a person who")
    a, b = f32.forward(np.array([ids]))[0, -1], i8.forward(np.array([ids]))[0, -1]
    assert np.argmax(a) == np.argmax(b)


def test_jargon_has_the_full_gpt2_vocabulary():
    # any text encodes, also tokens the Jargon File never uses, and the model scores them
    folder = npgpt2.example_dir("jargon")
    assert not (folder / "compact_vocab.npy").exists()
    model, tok = npgpt2.load_model(folder, dtype="int8"), npgpt2.load_tokenizer(folder)
    assert model.hparams["n_vocab"] == 50257 and tok.n_vocab == 50257
    ids = tok.encode("hacker: Привет, 世界 🤖 naïve façade")
    assert max(ids) > 20000 and tok.decode(ids) == "hacker: Привет, 世界 🤖 naïve façade"
    logits = model.forward(np.array([ids]))[0]                                 # (T, 50257)
    assert logits.shape == (len(ids), 50257) and np.isfinite(logits).all()


@pytest.mark.parametrize("argv", [["explain", "--example", "induction", "cat dog red cat dog"],
                                  ["explain", "--example", "jargon", "hacker: a person who"]])
def test_cli_example_flag(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Next token" in out and "warning: these weights look untrained" not in out


def test_cli_unknown_example(capsys):
    assert main(["explain", "--example", "nope", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--example: unknown example 'nope'" in err


def test_cli_example_on_prompt(capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("cat dog red blue sun moon tree fish cat dog red blue sun\n"))
    assert main(["prompt", "--example", "induction", "--length", "2", "--temperature", "0", "--seed", "1"]) == 0
    assert " moon tree" in capsys.readouterr().out


def test_cli_jargon_generates_and_scores_any_text(tmp_path, capsys):
    assert main(["generate", "--example", "jargon", "--length", "8", "--seed", "1", "--dtype", "int8"]) == 0
    assert capsys.readouterr().out.strip()
    data = tmp_path / "any.txt"
    data.write_text("hacker: Привет, 世界 🤖 naïve façade. A kludge is a clever fix.\n" * 3, encoding="utf-8")
    assert main(["eval", "--example", "jargon", "--dataset", str(data), "--dtype", "int8"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_cli_train_starts_from_an_example(tmp_path, capsys):
    # jargon's int8 weights load dequantised and contiguous, so the optimizer can update them
    data = tmp_path / "data.txt"
    data.write_text("hacker: a person who enjoys the details of programmable systems.\n" * 20)
    assert main(["train", "--example", "jargon", "--dataset", str(data), "--steps", "1", "--context", "16",
                 "--checkpoint_dir", str(tmp_path), "--run_name", "ft", "--sample_every", "0"]) == 0
    assert "Done at step 1" in capsys.readouterr().out and (tmp_path / "ft" / "model-1.index").is_file()
