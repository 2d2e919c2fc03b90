"""Corpus encoding, dataset loading and batch sampling.

Token ids expected here are read straight from OpenAI's encoder.json (not through npgpt2);
the streaming encoder is also checked against the tokenizer's own one-shot encode, whose
correctness against tiktoken is tests/test_tokenizer.py's business.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from npgpt2 import data
from npgpt2.errors import Npgpt2Error
from npgpt2.tokenizer import load_tokenizer

ENC = json.loads((Path(__file__).parent.parent / "npgpt2" / "assets" / "encoder.json").read_text("utf-8"))
EOT = ENC["<|endoftext|>"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def npz_tokens(path):
    with np.load(path) as z:
        assert all(z[k].dtype == np.uint16 for k in z.files)
        return np.concatenate([z[f"arr_{i}"] for i in range(len(z.files))])


def test_encode_joins_documents_and_keeps_written_endoftext(tmp_path, tok):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("Hello world", encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_text("Hello<|endoftext|>world", encoding="utf-8")
    (tmp_path / "in" / "c.txt").write_text("", encoding="utf-8")  # empty: no separator for it
    out = tmp_path / "corpus.npz"
    stats = data.encode_corpus(tmp_path / "in", out, tok)
    expected = [ENC["Hello"], ENC["\u0120world"], EOT, ENC["Hello"], EOT, ENC["world"]]
    assert npz_tokens(out).tolist() == expected
    assert stats["tokens"] == 6 and stats["files"] == 3
    # np.load + concatenate is all a reader needs, and load_dataset agrees for every input form
    assert data.load_dataset(out).tolist() == expected
    assert data.load_dataset(tmp_path / "in", tok).tolist() == expected
    assert data.load_dataset(str(tmp_path / "in" / "*.txt"), tok).tolist() == expected


def test_streaming_equals_one_shot_encode(tmp_path, tok, monkeypatch):
    # small reads so blocks end inside multi-byte characters, words and whitespace runs
    monkeypatch.setattr(data, "READ_BYTES", 97)
    rng = np.random.default_rng(0)
    words = ["naïve", "café", "日本語", "  ", "\n\n", "hello", " world", "’s", "🙂", "123", "<|endoftext|>", "\t"]
    text = " ".join(rng.choice(words, 3000).tolist())
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt").write_text(text[::-1], encoding="utf-8")
    out = tmp_path / "o.npz"
    stats = data.encode_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], out, tok, combine=500)
    assert stats["members"] > 5
    whole = tok.encode(text + "<|endoftext|>" + text[::-1], allowed_special={"<|endoftext|>"})
    assert npz_tokens(out).tolist() == whole
    assert whole.count(EOT) == text.count("<|endoftext|>") + text[::-1].count("<|endoftext|>") + 1 > 100


def test_wrong_encoding_names_file_and_byte_offset(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(data, "READ_BYTES", 100)
    raw = ("x" * 1233).encode() + "é".encode("latin-1") + b" more"
    (tmp_path / "latin.txt").write_bytes(raw)
    with pytest.raises(Npgpt2Error) as e:
        data.encode_corpus(tmp_path / "latin.txt", tmp_path / "o.npz", tok)
    msg = str(e.value)
    assert "latin.txt" in msg and "byte 1233" in msg and "--encoding" in msg and "\n" not in msg
    assert not (tmp_path / "o.npz").exists()
    data.encode_corpus(tmp_path / "latin.txt", tmp_path / "o.npz", tok, encoding="latin-1")
    assert tok.decode(npz_tokens(tmp_path / "o.npz").tolist()) == raw.decode("latin-1")


def test_utf8_split_across_reads_is_fine_and_truncated_utf8_is_an_error(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(data, "READ_BYTES", 3)
    (tmp_path / "ok.txt").write_text("ab€€", encoding="utf-8")
    assert tok.decode(data.load_dataset(tmp_path / "ok.txt", tok).tolist()) == "ab€€"
    (tmp_path / "cut.txt").write_bytes("ab€".encode()[:-1])
    with pytest.raises(Npgpt2Error, match=r"cut.txt: not valid utf-8 text at byte 2"):
        data.load_dataset(tmp_path / "cut.txt", tok)


def test_gzip_text_is_read(tmp_path, tok):
    import gzip
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Hello world")
    assert data.load_dataset(tmp_path / "a.txt.gz", tok).tolist() == [ENC["Hello"], ENC["\u0120world"]]


def test_clear_errors(tmp_path, tok):
    with pytest.raises(Npgpt2Error, match="nothing_here.txt: no such file, folder or glob match"):
        data.load_dataset(tmp_path / "nothing_here.txt", tok)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(Npgpt2Error, match="empty"):
        data.load_dataset(tmp_path / "empty.txt", tok)
    with pytest.raises(Npgpt2Error, match="empty"):
        data.encode_corpus(tmp_path / "empty.txt", tmp_path / "o.npz", tok)
    with pytest.raises(Npgpt2Error, match="unknown text encoding"):
        data.load_dataset(tmp_path / "empty.txt", tok, encoding="no-such-codec")
    short = np.arange(10, dtype=np.uint16)
    with pytest.raises(Npgpt2Error, match=r"10 tokens, fewer than --context \+ 1 = 17"):
        data.check_tokens(short, 96, 16, "short.npz")
    with pytest.raises(Npgpt2Error, match="token id 9 is outside the model's vocabulary"):
        data.check_tokens(short, 9, 4, "short.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(Npgpt2Error, match="bad.npz: not an .npz token file"):
        data.load_dataset(tmp_path / "bad.npz")


def test_reads_openai_style_npz(tmp_path):
    # encode.py wrote np.savez_compressed(out, *chunks) with int32 chunks
    np.savez_compressed(tmp_path / "old.npz", np.arange(5, dtype=np.int32), np.arange(5, 8, dtype=np.int32))
    assert data.load_dataset(tmp_path / "old.npz").tolist() == list(range(8))


def test_sampler_windows_and_exact_state_restore():
    tokens = np.arange(1000, dtype=np.uint16)
    s = data.Sampler(tokens, 17, seed=3)
    first = s.sample(4)
    assert first.shape == (4, 17) and first.dtype == np.int64
    assert np.all(np.diff(first, axis=1) == 1)  # consecutive tokens
    state = s.get_state()
    after = [s.sample(3) for _ in range(5)]
    s2 = data.Sampler(tokens, 17, seed=999)
    s2.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
    assert all(np.array_equal(a, s2.sample(3)) for a in after)
    # every start position is reachable, including the last one
    starts = np.concatenate([data.Sampler(np.arange(20, dtype=np.uint16), 17, seed=i).sample(50)[:, 0]
                             for i in range(3)])
    assert set(starts.tolist()) == {0, 1, 2, 3}


def test_eval_windows_predict_every_token_once():
    for n, T in [(2, 5), (17, 16), (18, 16), (100, 7), (101, 10)]:
        w = data.eval_windows(n, T)
        predicted = [s + 1 + i for s, m in w for i in range(m)]
        assert predicted == list(range(1, n))
        assert all(1 <= m <= T for _, m in w)
