"""`npgpt2 explain` and explain.build_report, checked against Hugging Face / torch references.

References (never npgpt2's output): full_reference.npz (HF logits at the last position of
texts whose tokens survive a decode/encode round trip), introspect_*.npz (HF attentions and
hidden states, torch logit lens, torch autograd input gradients; see tests/fixtures/README.md).
"""
import io
import json
from pathlib import Path

import numpy as np
import pytest

import npgpt2
from npgpt2 import explain
from npgpt2.cli import main

FIX = Path(__file__).parent / "fixtures"
FULL = FIX / "full"
ARGS = ["explain", "--models_dir", str(FIX), "--model_name", "full"]


@pytest.fixture(scope="module")
def full():
    return npgpt2.load_model(FULL, dtype=np.float64), npgpt2.load_tokenizer(FULL)


@pytest.fixture(scope="module")
def ref():
    return np.load(FIX / "full_reference.npz")


@pytest.fixture(scope="module")
def intro_full():
    return np.load(FIX / "introspect_full.npz")


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_top(probs, k):
    """The k most likely ids (ties by id) of a reference distribution."""
    order = np.lexsort((np.arange(probs.shape[-1]), -probs))[:k]
    return order, probs[order]


class NumberTokenizer:
    """The tiny model has a 96-token vocabulary without a BPE: show ids as text."""

    def decode(self, ids):
        return "<" + " ".join(map(str, ids)) + ">"


# ---------------------------------------------------------------- the terminal
@pytest.mark.parametrize("row", [0, 1])
def test_terminal_next_tokens_are_hf_probabilities(capsys, tok_row_text, ref, row):
    text, ids = tok_row_text(row)
    assert main(ARGS + [text]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("Next token (top 10):") + 1
    shown = [ln.split() for ln in lines[start:start + 10]]
    want_ids, want_p = ref_top(softmax(ref["logits_f64_b_last"][row]), 10)
    # rank. "text" id prob% bar: the id and the probability are the two fields after the text
    got = [(int(f[-3]), float(f[-2].rstrip("%"))) if f[-1].startswith("█") else (int(f[-2]), float(f[-1].rstrip("%")))
           for f in shown]
    assert [g[0] for g in got] == want_ids.tolist()
    np.testing.assert_allclose([g[1] for g in got], 100 * want_p, atol=0.006)  # printed to 2 decimals
    # the tokens line lists every token id
    for i in ids:
        assert f":{i}" in out
    assert len(max(lines, key=len)) <= 100  # not a terminal here: 100 columns


@pytest.fixture(scope="module")
def tok_row_text(ref):
    tok = npgpt2.load_tokenizer(FULL)

    def get(row):
        ids = ref["tokens_b"][row].tolist()
        text = tok.decode(ids)
        assert tok.encode(text) == ids  # so the command sees exactly HF's tokens
        return text, ids
    return get


def test_terminal_reads_stdin_and_lists_every_section(capsys, monkeypatch, tok_row_text):
    text, _ = tok_row_text(0)
    monkeypatch.setattr("sys.stdin", io.StringIO(text + "\n"))
    assert main(ARGS) == 0
    out = capsys.readouterr().out
    for head in ("Tokens (5 of n_ctx 64", "Next token (top 10):", "Logit lens at the last position",
                 "head that attends most away", "Input tokens that move log p("):
        assert head in out
    assert "\\n" not in out.split("Next token")[0]  # the piped newline is not a token


@pytest.mark.parametrize("width", [40, 72, 140])
def test_layout_fits_the_width(full, width):
    model, tok = full
    report = explain.report_for_ids(model, tok, tok.encode("Hello world, this is a longer text " * 3),
                                    lens_positions="last", patterns=False)
    text = explain.format_report(report, width)
    assert max(len(ln) for ln in text.splitlines()) <= width


# ---------------------------------------------------------------- the numbers against HF / torch
def test_report_against_hf_attentions_lens_and_gradients(full, intro_full):
    model, tok = full
    ids = intro_full["grad_ids"]
    pos, target = int(intro_full["grad_position"]), int(intro_full["grad_target"])
    # the gradient of log p(target | ids[:pos+1]): a text that ends at pos
    ids = ids[:pos + 1]
    r = explain.report_for_ids(model, tok, ids, top_k=5, lens_k=3, target=target)
    json.dumps(r, allow_nan=False)  # plain JSON

    # attributions: ‖torch gradient × HF input embedding‖
    want = np.linalg.norm(intro_full["grad_embeds"][:pos + 1] * intro_full["hidden/0"][0, :pos + 1], axis=-1)
    np.testing.assert_allclose(r["attribution"]["scores"], want, rtol=1e-8, atol=1e-12)
    assert r["attribution"]["target"]["id"] == target

    # attention: HF attentions of the 8-token text; rows 0..pos do not see the later token
    L = model.hparams["n_layer"]
    for i in range(L):
        hf = intro_full[f"attn/{i}"][0, :, :pos + 1, :pos + 1]
        got = r["attention"]["patterns"][i]
        for h in range(hf.shape[0]):
            for t in range(pos + 1):
                np.testing.assert_allclose(got[h][t], hf[h, t, :t + 1], atol=5e-4 + 1e-12)  # 3 decimals
        last = hf[:, pos, :]
        away = 1 - last[:, pos]
        h = int(np.argmax(away))
        s = int(np.argmax(last[h, :pos]))
        assert r["heads_away"][i]["head"] == h
        assert r["heads_away"][i]["to_pos"] == s
        assert r["heads_away"][i]["to_id"] == int(ids[s])
        np.testing.assert_allclose([r["heads_away"][i]["away"], r["heads_away"][i]["weight"]],
                                   [away[h], last[h, s]], atol=1e-9)


def test_logit_lens_and_next_tokens_against_torch(full, intro_full):
    model, tok = full
    ids = intro_full["tokens"][0]
    r = explain.report_for_ids(model, tok, ids, top_k=10, lens_k=3)
    lens = softmax(intro_full["lens_last"][:, 0])          # (L+1, V) torch ln_f + head at the last position
    assert len(r["lens"]["top"]) == model.hparams["n_layer"] + 1
    for row in range(lens.shape[0]):
        want_ids, want_p = ref_top(lens[row], 3)
        got = r["lens"]["top"][row][-1]
        assert [c["id"] for c in got] == want_ids.tolist()
        np.testing.assert_allclose([c["prob"] for c in got], want_p, rtol=1e-9)
    # the last lens row is the model's own distribution: the next tokens
    want_ids, want_p = ref_top(lens[-1], 10)
    assert [n["id"] for n in r["next"]] == want_ids.tolist()
    np.testing.assert_allclose([n["prob"] for n in r["next"]], want_p, rtol=1e-9)
    np.testing.assert_allclose(r["last_logits"], intro_full["lens_last"][-1, 0], atol=6e-6)  # 5 decimals


def test_logit_lens_grid_at_every_position_tiny():
    """The grid (layer x position) against torch's lens of every hidden state (tiny model)."""
    ref = np.load(FIX / "introspect_tiny.npz")
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    for b in range(2):
        ids = ref["tokens"][b]
        r = explain.report_for_ids(model, NumberTokenizer(), ids, top_k=4, lens_k=2)
        assert r["lens"]["positions"] == list(range(len(ids)))
        lens = softmax(ref["lens"][:, b])                   # (L+1, T, V)
        for row in range(lens.shape[0]):
            for t in range(len(ids)):
                want_ids, want_p = ref_top(lens[row, t], 2)
                got = r["lens"]["top"][row][t]
                assert [c["id"] for c in got] == want_ids.tolist()
                np.testing.assert_allclose([c["prob"] for c in got], want_p, rtol=1e-9)
        for i in range(2):
            for h in range(3):
                for t in range(len(ids)):
                    np.testing.assert_allclose(r["attention"]["patterns"][i][h][t], ref[f"attn/{i}"][b, h, t, :t + 1],
                                               atol=5e-4 + 1e-12)


def test_float32_model_agrees_with_hf(intro_full):
    """What the CLI loads (float32) still gives HF's next-token probabilities."""
    model, tok = npgpt2.load_model(FULL), npgpt2.load_tokenizer(FULL)
    r = explain.report_for_ids(model, tok, intro_full["tokens"][0], top_k=5, lens_positions="last", patterns=False)
    want_ids, want_p = ref_top(softmax(intro_full["lens_last"][-1, 0]), 5)
    assert [n["id"] for n in r["next"]] == want_ids.tolist()
    np.testing.assert_allclose([n["prob"] for n in r["next"]], want_p, rtol=1e-4)
    assert r["attention"]["patterns"] == [None, None] and r["attention"]["layers"] == []
    assert r["lens"]["positions"] == [7] and len(r["lens"]["top"][0]) == 1


# ---------------------------------------------------------------- options and bad input
def test_one_layer_only(full):
    model, tok = full
    r = explain.build_report(model, tok, "Hello there world", layer=1)
    assert r["attention"]["layers"] == [1]
    assert r["attention"]["patterns"][0] is None and len(r["attention"]["patterns"][1]) == 2
    assert len(r["heads_away"]) == 2  # the summary still covers every layer


def test_long_text_is_left_trimmed_with_a_note(full, capsys):
    model, tok = full
    text = " ".join(f"w{i}" for i in range(80))
    ids = tok.encode(text)
    assert len(ids) > 64
    r = explain.build_report(model, tok, text)
    assert [t["id"] for t in r["tokens"]] == ids[-64:]
    assert str(len(ids)) in r["note"] and "n_ctx=64" in r["note"] and "last 64" in r["note"]
    assert main(ARGS + [text]) == 0
    assert capsys.readouterr().out.startswith("note: the text is")


@pytest.mark.parametrize("kwargs, words", [
    (dict(text=""), "text is empty"),
    (dict(text=None), "text must be a string"),
    (dict(top_k=0), "top_k must be an integer between 1 and 50257, got 0"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(lens_k=50258), "lens_k"),
    (dict(layer=2), "layer must be an integer between 0 and 1, got 2"),
    (dict(layer=-1), "layer"),
    (dict(layer="0"), "layer"),
])
def test_bad_arguments_are_one_line_errors(full, kwargs, words):
    model, tok = full
    kwargs = {"text": "Hello", **kwargs}
    with pytest.raises(npgpt2.Npgpt2Error) as e:
        explain.build_report(model, tok, **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_ids_outside_the_vocabulary(full):
    model, tok = full
    with pytest.raises(npgpt2.Npgpt2Error, match=r"^text: token id 50257 is outside the model's vocabulary"):
        explain.report_for_ids(model, tok, [5, 50257])


@pytest.mark.parametrize("argv, words", [
    ([""], "text is empty"),
    (["--top_k", "0", "hi"], "top_k must be"),
    (["--layer", "5", "--out", "x.html", "hi"], "layer must be"),
    (["--layer", "0", "hi"], "--layer chooses"),
    (["--top_k", "x", "hi"], "invalid int value"),
])
def test_cli_bad_input(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    if words == "invalid int value":  # argparse's own message and exit status
        with pytest.raises(SystemExit) as e:
            main(ARGS + argv)
        assert e.value.code == 2
    else:
        assert main(ARGS + argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "x.html").exists()


def test_cli_empty_stdin(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(ARGS) == 2
    assert capsys.readouterr().err.strip() == "npgpt2: error: text is empty (give it as an argument or on stdin)"


# ---------------------------------------------------------------- the HTML file
def test_out_writes_one_self_contained_file(capsys, tmp_path):
    out = tmp_path / "report.html"
    assert main(ARGS + ["--out", str(out), "Hello </script><b>there"]) == 0
    page = out.read_text(encoding="utf-8")
    assert f"Wrote {out}" in capsys.readouterr().out
    assert "http://" not in page and "https://" not in page and " src=" not in page
    # the report is in the page and reads back intact, "</script>" in a token included
    tag = '<script id="report-data" type="application/json">'
    start = page.index(tag) + len(tag)
    data = json.loads(page[start:page.index("</script>", start)])
    assert data["text"] == "Hello </script><b>there"
    assert data["attention"]["layers"] == [0, 1]
    assert explain.page_html().count("/*REPORT*/null") == 1  # the server's page: no report in it
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # written atomically, no temp left


def test_page_size_guard_names_the_flag():
    """A 1024-token page of every 124M head would be ~450 MB: --out asks for one layer instead."""
    from npgpt2.model import MODEL_HPARAMS
    hp = MODEL_HPARAMS["124M"]
    with pytest.raises(npgpt2.Npgpt2Error,
                       match=r"^--layer: the attention of all 12 layers for 1024 tokens is 76M"):
        explain.check_page_size(hp, 1024)
    explain.check_page_size(hp, 1024, layer=5)  # 6.3M weights: fine
    explain.check_page_size(hp, 256)            # every layer of a 256-token text: fine
