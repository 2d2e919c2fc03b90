"""GPT-2 tokenizer: ids against independent references, round trips, both engines, errors.

Expected ids come from tests/fixtures/tokenizer_cases.json.gz, written by
tools/make_tokenizer_fixture.py with tiktoken, HF tokenizers and transformers (which all agreed),
each built from the committed encoder.json + vocab.bpe.
"""
import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npgpt2
from npgpt2 import bpe_fast
from npgpt2 import data as npdata
from npgpt2 import tokenizer as tk
from npgpt2.errors import Npgpt2Error

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_cases.json.gz"
ASSETS = Path(tk.__file__).parent / "assets"
CASES = json.loads(gzip.decompress(FIXTURE.read_bytes()))["cases"]
EOT = "<|endoftext|>"
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tok():
    return npgpt2.load_tokenizer()


def fast_merge(t, symbols, heap_min=None):
    """The compiled merge on t's tables (heap_min=0: always the heap)."""
    with t._fast_lock:
        return t._fast_engine().merge(symbols, heap_min)


def byte_symbols(t, data):
    return [t.byte_sym[b] for b in data]


@pytest.fixture(params=["plain", "fast"])
def engine(request, monkeypatch):
    """Route encode() through one engine for every text length."""
    if request.param == "plain":
        monkeypatch.setenv("NPGPT2_PLAIN", "1")
    else:
        monkeypatch.delenv("NPGPT2_PLAIN", raising=False)
        monkeypatch.setattr(tk, "FAST_MIN_CHARS", 0)
        monkeypatch.setattr(tk, "FAST_START_CHARS", 0)
    return request.param


def test_fixture_is_rich():
    names = {c["name"] for c in CASES}
    assert len(CASES) > 400
    assert {"empty", "contractions upper", "emoji zwj family", "cjk", "crlf", "nbsp", "jargon 64k",
            "eot in text", "eot in text (eot allowed)"} <= names


def test_ids_match_references(tok, engine):
    wrong = []
    for case in CASES:
        allowed = {EOT} if case["allowed_special"] else ()
        if tok.encode(case["text"], allowed_special=allowed) != case["ids"]:
            wrong.append(case["name"])
    assert not wrong, f"{engine} engine differs from the references on {wrong}"


def test_decode_reference_ids(tok):
    for case in CASES:
        assert tok.decode(case["ids"]) == case["text"], case["name"]
        assert tok.decode_bytes(np.array(case["ids"], dtype=np.uint16)) == case["text"].encode("utf-8")


def test_engines_called_directly(tok):
    """The two engines on their own (no dispatch) against the references."""
    for case in CASES:
        if not case["allowed_special"]:
            assert tok._encode_plain(case["text"]) == case["ids"], case["name"]
            assert tok._encode_fast(case["text"]).tolist() == case["ids"], case["name"]


def test_constants(tok):
    assert tok.eot_token == 50256
    assert tok.n_vocab == 50257
    assert tok.decode([50256]) == EOT
    assert tok.encode(EOT) != [50256]  # ordinary text by default
    assert tok.encode(EOT, allowed_special="all") == [50256]
    assert tok.encode(EOT, allowed_special={EOT}) == [50256]
    assert tok.encode(EOT, allowed_special=EOT) == [50256]
    assert tok.encode("") == []


def test_unknown_special_is_an_error(tok):
    with pytest.raises(Npgpt2Error, match="<|fim|>"):
        tok.encode("x", allowed_special={"<|fim|>"})


def test_encode_rejects_bytes(tok):
    with pytest.raises(TypeError):
        tok.encode(b"abc")


@pytest.mark.parametrize("text,at", [("caf\udce9 au lait", 3),   # stdin's surrogateescape
                                     ("\ud800", 0),                # JSON's "\ud800"
                                     ("ok " * 2000 + "\udfff", 6000)])
def test_lone_surrogate_is_a_one_line_error(tok, engine, text, at):
    with pytest.raises(Npgpt2Error) as e:
        tok.encode(text)
    msg = str(e.value)
    assert "\n" not in msg and "surrogate" in msg and f"character {at}" in msg
    with pytest.raises(Npgpt2Error):
        list(tok.encode_iter([text]))


# ---------------------------------------------------------------- round trips (hypothesis)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_roundtrip_plain(tok, s):
    assert tok.decode(tok._encode_plain(s)) == s


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_roundtrip_fast(tok, s):
    assert tok.decode(tok._encode_fast(s).tolist()) == s


# Characters the pattern treats specially, so random strings hit every branch of the scanner.
TRICKY = (" '\t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2009\u2028\u3000\u200b\ufeff"
          "stredvlmSTREDVLMab09²½٣!?.,-_'\"日本éß\u0301\u200d😀🇺🇸\U000f0000<|>endoftx")
tricky_text = st.text(alphabet=st.sampled_from(TRICKY), max_size=60)
PIECES = ["a", "bc", " ", "  ", "\n", "\t", "\xa0", EOT, "<|", "日本", "'s", "'", "12", ".", "!?"]
pieces_text = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(tricky_text, st.text()))
def test_scanner_equals_regex(s):
    assert bpe_fast.split_words(s) == regex.findall(tk.PATTERN, s)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(tricky_text, st.text()))
def test_fast_equals_plain(tok, s):
    assert tok._encode_fast(s).tolist() == tok._encode_plain(s)
    assert tok.decode(tok.encode(s, allowed_special="all")) == s


# ---------------------------------------------------------------- merge loops
def test_merge_loops_agree_on_random_words(tok):
    rng = random.Random(5)
    words = [w.encode() for w in regex.findall(tk.PATTERN, CASES[-1]["text"] + " hello world")]
    words += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(500)]
    words += [bytes(rng.choice(b"etaoin shrdlu") for _ in range(rng.randrange(1, 60))) for _ in range(500)]
    for w in words:
        syms = byte_symbols(tok, w)
        want = tk.bpe_merge_plain(syms, tok.merges)
        assert tk.bpe_merge_heap(syms, tok.merges) == want, w
        assert fast_merge(tok, syms) == want, w
        assert fast_merge(tok, syms, heap_min=0) == want, w


def test_merge_rules_by_hand():
    """A toy vocabulary whose merges are worked out by hand."""
    byte_char = tk.bytes_to_unicode()
    enc = {byte_char[b]: b for b in range(256)}
    enc.update({"ab": 256, "abc": 257, "bc": 258, "aa": 259})
    merges = [("a", "b"), ("ab", "c"), ("b", "c"), ("a", "a")]
    t = tk.Tokenizer(enc, merges)
    a, b, c = ord("a"), ord("b"), ord("c")
    cases = {
        "abcab": [257, 256],          # ab first everywhere, then ab+c
        "bcabc": [258, 257],          # 'b c' (rank 2) loses to 'a b' (rank 0) inside
        "aaa": [259, a],              # non-overlapping, left to right
        "aaaa": [259, 259],
        "cba": [c, b, a],
    }
    for word, want in cases.items():
        syms = byte_symbols(t, word.encode())
        assert t._bpe_word_plain(word) == tuple(want), word
        assert tk.bpe_merge_plain(syms, t.merges) == want, word
        assert tk.bpe_merge_heap(syms, t.merges) == want, word
        assert fast_merge(t, syms) == want, word
        assert fast_merge(t, syms, heap_min=0) == want, word
        assert t._encode_fast(word).tolist() == want, word


def test_merge_result_missing_from_encoder_is_an_error():
    byte_char = tk.bytes_to_unicode()
    enc = {byte_char[b]: b for b in range(256)}
    t = tk.Tokenizer(enc, [("x", "y")], source="toy/encoder.json")
    assert t.encode("yx") == [ord("y"), ord("x")]
    for encode in (t._encode_plain, t._encode_fast):
        with pytest.raises(Npgpt2Error, match="'xy'"):
            encode("axy")


def toy_tokenizer(merges):
    byte_char = tk.bytes_to_unicode()
    return tk.Tokenizer({byte_char[b]: b for b in range(256)}, merges)


def test_round_is_finished_before_a_lower_rank_made_inside_it():
    """'a b' (rank 1) merges at both places in "abab" before 'ab a' (rank 0), which its first
    merge creates, is considered: a heap that merged 'ab a' at once would give ['aba', 'b']."""
    t = toy_tokenizer([("ab", "a"), ("a", "b")])
    syms = byte_symbols(t, b"abab")
    ab = t._sym["ab"]
    assert tk.bpe_merge_plain(syms, t.merges) == [ab, ab]
    assert tk.bpe_merge_heap(syms, t.merges) == [ab, ab]
    assert fast_merge(t, syms, heap_min=0) == [ab, ab]


@st.composite
def toy_case(draw):
    """A merge table whose parts are letters or earlier results, ranked in any order (so a merge
    can create a pair ranked below the round in progress, unlike trained tables), and a word
    made of its symbols. About 1 case in 10 tells a heap that skips the round rule apart."""
    pool, merges = ["a", "b", "c"], []
    for _ in range(draw(st.integers(0, 24))):
        a, b = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
        merges.append((a, b))
        pool.append(a + b)
    merges = draw(st.permutations(merges))
    return merges, "".join(draw(st.lists(st.sampled_from(pool), max_size=40)))


@settings(max_examples=400, deadline=None)
@given(toy_case())
def test_heap_merge_equals_plain_on_toy_tables(case):
    merges, word = case
    t = toy_tokenizer(merges)
    syms = byte_symbols(t, word.encode())
    want = tk.bpe_merge_plain(syms, t.merges)
    assert tk.bpe_merge_heap(syms, t.merges) == want
    assert fast_merge(t, syms, heap_min=0) == want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200), st.text(alphabet="etaoin shrdlu", max_size=200).map(str.encode),
                 st.text(max_size=80).map(lambda s: s.encode("utf-8", "replace"))))
def test_heap_merge_equals_plain_on_gpt2(tok, data):
    syms = byte_symbols(tok, data)
    want = tk.bpe_merge_plain(syms, tok.merges)
    assert tk.bpe_merge_heap(syms, tok.merges) == want
    assert fast_merge(tok, syms, heap_min=0) == want


@pytest.mark.parametrize("alphabet", ["abcdefghijklmnopqrstuvwxyz", "aaaab", "éàßœ日本", "+-*/=!?"])
def test_long_chunk_engines_equal_reference(tok, alphabet, monkeypatch):
    """One unbroken run of 3000 characters: the heap merges of both engines (used for it by
    encode) equal the simple reference loop."""
    rng = random.Random(len(alphabet))
    text = "".join(rng.choice(alphabet) for _ in range(3000))
    chunks = regex.findall(tk.PATTERN, text)
    want = [i for c in chunks for i in tk.bpe_merge_plain(byte_symbols(tok, c.encode()), tok.merges)]
    assert max(map(len, chunks)) >= tk.HEAP_MIN_SYMBOLS
    monkeypatch.setenv("NPGPT2_PLAIN", "1")
    assert tok.encode(text) == tok._encode_plain(text) == want
    assert tok._encode_fast(text).tolist() == want


LONG = json.loads((HERE / "fixtures" / "tokenizer_long_chunks.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", LONG, ids=[c["name"] for c in LONG])
def test_long_chunks_match_tiktoken(tok, case):
    """Long unbroken runs, where BPE used to be quadratic: both engines give tiktoken's ids
    (fixture: their count and sha256 as little-endian uint32)."""
    import hashlib
    text = "".join(random.Random(case["seed"]).choices(case["alphabet"], k=case["chars"]))
    tok.clear_cache()
    for ids in (tok._encode_plain(text), tok._encode_fast(text).tolist()):
        assert len(ids) == case["n_ids"]
        assert hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).hexdigest() == case["ids_sha256"]


class CountingMerges(dict):
    """A merge table that counts its lookups (`get`, as every merge loop reads it)."""
    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


def test_plain_engine_work_grows_linearly_on_one_long_chunk():
    """Pair lookups, not seconds: 8x the letters in one chunk must cost about 8x the lookups
    (the old merge loop, one pass over the word per round, made it 19x: 688,065 -> 13,089,438)."""
    t = tk.read_tokenizer(ASSETS / "encoder.json", ASSETS / "vocab.bpe")
    counts = []
    for n in (2000, 16000):
        t.merges = CountingMerges(t.merges)
        text = "".join(random.Random(n).choices("abcdefghijklmnopqrstuvwxyz", k=n))
        t._encode_plain(text)
        counts.append(t.merges.lookups)
    assert counts[1] < 12 * counts[0], counts


# ---------------------------------------------------------------- showing the work
def test_show_work_ids_equal_encode_on_every_case(tok):
    for case in CASES:
        allowed = {EOT} if case["allowed_special"] else ()
        work = tok.encode_and_show_work(case["text"], allowed_special=allowed)
        assert work.ids == case["ids"], case["name"]
        assert "".join(c.text for c in work) == case["text"], case["name"]
        for c in work:
            assert list(c.ids) == [tok.encoder[s] for s in c.tokens]


def test_show_work_by_hand(tok):
    """Ranks read from npgpt2/assets/vocab.bpe by hand (rank = line number - 2, after the
    '#version' line), ids from encoder.json."""
    work = tok.encode_and_show_work("aaaaa\nHello world")
    assert [c.text for c in work] == ["aaaaa", "\n", "Hello", " world"]
    aaaaa, newline, hello, world = work
    # 'a a' (line 6998) merges twice in one round, left to right, leaving the last 'a'; then
    # 'aa aa' (line 24540) beats 'aa a' (line 45817); 'aaaa a' is no merge.
    assert aaaaa.symbols == ("a",) * 5
    assert [(m.rank, m.left, m.right, m.at) for m in aaaaa.merges] == [
        (6996, "a", "a", (0, 2)), (24538, "aa", "aa", (0,))]
    assert [m.symbols for m in aaaaa.merges] == [("aa", "aa", "a"), ("aaaa", "a")]
    assert aaaaa.tokens == ("aaaa", "a") and aaaaa.ids == (24794, 64)
    assert newline.symbols == ("Ċ",) and newline.merges == () and newline.ids == (198,)
    assert hello.symbols == ("H", "e", "l", "l", "o")
    assert [(m.rank, m.left, m.right, m.merged) for m in hello.merges] == [
        (41, "l", "l", "ll"), (439, "e", "ll", "ell"), (10853, "ell", "o", "ello"),
        (15240, "H", "ello", "Hello")]
    assert hello.merges[0].symbols == ("H", "e", "ll", "o") and hello.merges[0].at == (2,)
    assert hello.tokens == ("Hello",) and hello.ids == (15496,)
    assert world.symbols == ("Ġ", "w", "o", "r", "l", "d")
    assert [(m.rank, m.merged) for m in world.merges] == [
        (10, "Ġw"), (17, "or"), (79, "ld"), (220, "Ġwor"), (739, "Ġworld")]
    assert world.ids == (995,)
    assert work.ids == [24794, 64, 198, 15496, 995]
    shown = str(work)
    assert "rank  6996  a + a -> aa (x2)   aa aa a" in shown
    assert "rank    41  l + l -> ll   H e ll o" in shown
    assert shown.endswith("ids: [24794, 64, 198, 15496, 995]")


def test_show_work_special_tokens_and_errors(tok):
    work = tok.encode_and_show_work("a<|endoftext|>b", allowed_special="all")
    assert [c.text for c in work] == ["a", EOT, "b"]
    assert work[1].ids == (50256,) and work[1].merges == ()
    assert tok.encode_and_show_work(EOT).ids == tok.encode(EOT) != [50256]
    assert tok.encode_and_show_work("") == [] and tok.encode_and_show_work("").ids == []
    with pytest.raises(Npgpt2Error, match="surrogate.*character 3"):
        tok.encode_and_show_work("abc\udce9")
    with pytest.raises(TypeError):
        tok.encode_and_show_work(b"abc")


# ---------------------------------------------------------------- fast engine internals
def test_fast_engine_grows_and_clears(monkeypatch):
    """Tiny tables force every grow path and the clear-when-full path; ids must not change."""
    monkeypatch.setattr(bpe_fast.FastEngine, "initial", (2, 4, 4, 4))
    monkeypatch.setattr(bpe_fast, "_FAST_MAX_ENTRIES", 300)
    t = tk.read_tokenizer(ASSETS / "encoder.json", ASSETS / "vocab.bpe")
    for case in CASES:
        if not case["allowed_special"]:
            assert t._encode_fast(case["text"]).tolist() == case["ids"], case["name"]
    assert len(t._fast.ehash) > 2


def test_plain_cache_eviction(monkeypatch):
    monkeypatch.setattr(tk, "_WORD_CACHE_MAX", 10)
    t = tk.read_tokenizer(ASSETS / "encoder.json", ASSETS / "vocab.bpe")
    case = next(c for c in CASES if c["name"] == "jargon 4k")
    assert t._encode_plain(case["text"]) == case["ids"]
    assert len(t._cache) <= 10


def test_threads_share_a_tokenizer(tok, engine):
    from concurrent.futures import ThreadPoolExecutor
    cases = [c for c in CASES if not c["allowed_special"]] * 2
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: tok.encode(c["text"]), cases))
    assert got == [c["ids"] for c in cases]


def test_fast_engine_grows_output(tok):
    case = next(c for c in CASES if c["name"] == "astral private run")
    cp = np.frombuffer(case["text"].encode("utf-32-le"), dtype=np.uint32)
    tok._encode_fast("warm up")
    assert tok._fast.encode(cp, out_size=1).tolist() == case["ids"]


# ---------------------------------------------------------------- decoding
def test_decode_partial_utf8(tok):
    """Cutting the ids of 120 emoji anywhere: bytes are a prefix, text ends in U+FFFD, no error."""
    case = next(c for c in CASES if c["name"] == "emoji long run")
    ids, whole = case["ids"], case["text"].encode("utf-8")
    partial = 0
    for k in range(1, len(ids)):
        raw = tok.decode_bytes(ids[:k])
        assert whole.startswith(raw)
        text = tok.decode(ids[:k])
        if len(raw) % 4:
            partial += 1
            assert text.endswith("\ufffd")
        assert text.replace("\ufffd", "") == "😀" * (len(raw) // 4)
    assert partial > 0
    lone = tok.encoder[tk.bytes_to_unicode()[0xE2]]  # first byte of a 3-byte character
    assert tok.decode([lone]) == "\ufffd"
    assert tok.decode_bytes([lone]) == b"\xe2"


@pytest.mark.parametrize("bad", [-1, 50257, 10 ** 12, "7", None])
def test_decode_bad_id(tok, bad):
    with pytest.raises(Npgpt2Error, match=regex.escape(repr(bad))) as e:
        tok.decode([15496, bad])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- streaming
def _jargon():
    with gzip.open(ASSETS / "jargon.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()


def test_encode_iter_equals_whole(tok):
    case = next(c for c in CASES if c["name"] == "jargon 64k")
    text = case["text"]
    rng = random.Random(1)
    chunks, i = [], 0
    while i < len(text):
        n = rng.randrange(1, 3000)
        chunks.append(text[i:i + n])
        i += n
    arrays = list(tok.encode_iter(iter(chunks), block_chars=2000))
    assert len(arrays) > 10
    assert all(a.dtype == np.uint16 for a in arrays)
    assert np.concatenate(arrays).tolist() == case["ids"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(tricky_text, pieces_text), st.lists(st.integers(0, 120), max_size=8), st.integers(1, 20))
def test_encode_iter_property(tok, s, cuts, block):
    cuts = sorted(min(c, len(s)) for c in cuts)
    chunks = [s[a:b] for a, b in zip([0] + cuts, cuts + [len(s)])]
    for allowed in ((), "all"):
        got = [x for a in tok.encode_iter(chunks, allowed, block_chars=block) for x in a.tolist()]
        assert got == tok.encode(s, allowed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(tricky_text, pieces_text))
def test_every_safe_cut_is_safe(tok, s):
    """Cutting at any SAFE_CUT point gives the pre-tokens, hence the ids, of the whole text."""
    whole, words = tok.encode(s), regex.findall(tk.PATTERN, s)
    for m in regex.finditer(tk.SAFE_CUT, s):
        p = m.start()
        assert regex.findall(tk.PATTERN, s[:p]) + regex.findall(tk.PATTERN, s[p:]) == words, p
        assert tok.encode(s[:p]) + tok.encode(s[p:]) == whole, p


def test_no_cut_in_cjk_or_allowed_special(tok):
    text = "日本語のテキスト" * 50 + "。" + "中文" * 400  # CJK has no spaces: cut only at 。
    arrays = list(tok.encode_iter([text[i:i + 7] for i in range(0, len(text), 7)], block_chars=16))
    assert len(arrays) == 2
    assert arrays[0].tolist() == tok.encode(text[:401])  # the last cut point: after "。"
    assert np.concatenate(arrays).tolist() == tok.encode(text)
    text = ("a" * 30 + EOT) * 20
    chunks = [text[i:i + 5] for i in range(0, len(text), 5)]
    arrays = list(tok.encode_iter(chunks, allowed_special="all", block_chars=10))
    assert len(arrays) > 10
    assert np.concatenate(arrays).tolist() == tok.encode(text, allowed_special="all")
    assert np.concatenate(arrays).tolist().count(50256) == 20


def test_encode_iter_on_file_blocks(tok, tmp_path):
    """Files are read by data.read_text_blocks (the one reader) and streamed to encode_iter."""
    text = _jargon()[:300_000] + "\nend <|endoftext|> tail  caf\u00e9 \U0001f600"
    data = text.encode("utf-8")
    for name, raw in (("corpus.txt", data), ("corpus.txt.gz", gzip.compress(data))):
        p = tmp_path / name
        p.write_bytes(raw)
        blocks = list(npdata.read_text_blocks(p, block_bytes=50_001))  # cuts inside characters too
        assert len(blocks) > 5
        got = np.concatenate(list(tok.encode_iter(blocks, block_chars=50_000)))
        assert got.tolist() == tok.encode("".join(blocks))


# ---------------------------------------------------------------- loading
def test_load_tokenizer_is_cached():
    assert npgpt2.load_tokenizer() is npgpt2.load_tokenizer()
    assert npgpt2.load_tokenizer(None) is npgpt2.load_tokenizer("/nonexistent/folder")


def test_load_from_model_dir(tmp_path):
    shutil.copy(ASSETS / "encoder.json", tmp_path)
    shutil.copy(ASSETS / "vocab.bpe", tmp_path)
    assert npgpt2.load_tokenizer(tmp_path) is npgpt2.load_tokenizer()  # same content, one tokenizer
    with open(tmp_path / "vocab.bpe", "a", encoding="utf-8") as f:
        f.write("\n")  # same merges, different file
    t = npgpt2.load_tokenizer(tmp_path)
    assert t is not npgpt2.load_tokenizer()
    assert str(tmp_path) in t._source
    assert t.encode("Hello world") == [15496, 995]


def test_model_dir_tokenizer_is_used(tmp_path):
    """A model folder's own files win over the packaged ones."""
    byte_char = tk.bytes_to_unicode()
    enc = {byte_char[b]: b for b in range(256)}
    enc["hi"] = 256
    (tmp_path / "encoder.json").write_text(json.dumps(enc), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nh i\n", encoding="utf-8")
    t = npgpt2.load_tokenizer(tmp_path)
    assert t.encode("hi ih") == [256, ord(" "), ord("i"), ord("h")]
    assert t.n_vocab == 257 and t.eot_token is None


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ("{}", "JSON object"),
    ('{"a": "1"}', "'a' has id '1'"),
    ('{"a": -3}', "'a' has id -3"),
    ('{"a": 1.5}', "'a' has id 1.5"),
    ('{"a": 1, "b": 1}', "'a' and 'b' share the id 1"),
])
def test_malformed_encoder(tmp_path, content, message):
    (tmp_path / "encoder.json").write_text(content, encoding="utf-8")
    shutil.copy(ASSETS / "vocab.bpe", tmp_path)
    with pytest.raises(Npgpt2Error) as e:
        npgpt2.load_tokenizer(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "encoder.json" in msg and message in msg


def test_encoder_not_utf8(tmp_path):
    (tmp_path / "encoder.json").write_bytes(b'{"\xff": 1}')
    shutil.copy(ASSETS / "vocab.bpe", tmp_path)
    with pytest.raises(Npgpt2Error, match="encoder.json"):
        npgpt2.load_tokenizer(tmp_path)


def test_malformed_vocab_bpe(tmp_path):
    shutil.copy(ASSETS / "encoder.json", tmp_path)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nĠ t\nĠ a b\n", encoding="utf-8")
    with pytest.raises(Npgpt2Error) as e:
        npgpt2.load_tokenizer(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "vocab.bpe" in msg and "line 3" in msg


def test_only_one_file_falls_back_to_packaged(tmp_path, caplog):
    (tmp_path / "encoder.json").write_text("{broken", encoding="utf-8")
    with caplog.at_level("WARNING"):
        t = npgpt2.load_tokenizer(tmp_path)
    assert t is npgpt2.load_tokenizer()
    assert "only one" in caplog.text


# ---------------------------------------------------------------- without numba
def test_plain_engine_takes_over_without_numba():
    """With numba unimportable, the tokenizer (imported on its own: the rest of the package is
    another matter) still encodes long texts, through the plain engine."""
    import subprocess
    import sys
    code = f"""
import gzip, json, sys, types
sys.modules["numba"] = None  # import numba -> ImportError
pkg = types.ModuleType("npgpt2")
pkg.__path__ = [{str(Path(tk.__file__).parent)!r}]
sys.modules["npgpt2"] = pkg
from npgpt2 import bpe_fast, tokenizer as tk
assert not bpe_fast.AVAILABLE and not tk._fast_enabled()
tok = tk.load_tokenizer()
cases = json.loads(gzip.decompress(open({str(FIXTURE)!r}, "rb").read()))["cases"]
for c in cases:
    assert tok.encode(c["text"], allowed_special="all" if c["allowed_special"] else ()) == c["ids"], c["name"]
text = "".join(c["text"] for c in cases if not c["allowed_special"])
text *= tk.FAST_START_CHARS // len(text) + 1
ids = [i for a in tok.encode_iter([text]) for i in a.tolist()]
assert ids == tok.encode(text) and tok._fast is None
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
