"""GPT-2's byte-level BPE tokenizer, giving exactly the ids OpenAI's encoder.py gives.

Text becomes ids in three steps:
1. Pre-tokenize: split the text into words with `PATTERN` (contractions, letter runs, digit runs,
   runs of other symbols, each optionally led by one space; whitespace runs).
2. Each word's UTF-8 bytes become one symbol per byte (OpenAI's byte<->unicode map names them).
3. BPE: repeatedly take the adjacent symbol pair with the lowest rank in vocab.bpe and merge all
   its non-overlapping occurrences, left to right, until no adjacent pair has a rank. The final
   symbols' ids come from encoder.json.

Two engines give the same ids (tests prove it):
- plain (the readable reference): `regex.findall(PATTERN)`, a Python merge loop, a dict cache per
  word. Used for short texts and for everything when `NPGPT2_PLAIN=1` is set.
- fast (Numba, for long texts; see FAST_MIN_CHARS): a scanner that follows PATTERN
  on the text's code points, with letter/number/space classes taken from `regex` itself; a hash
  table of already-seen words held in NumPy arrays; the same merge loop compiled.

`<|endoftext|>` is ordinary text unless the caller allows it (`allowed_special`, as in tiktoken).
"""
import gzip
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import regex

from .errors import Npgpt2Error

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; the plain engine still works
    njit = None

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
# Zero-width (or one space) matches at the points where text can be cut without changing its
# ids (see Tokenizer.encode_iter for why).
SAFE_CUT = (r" (?=\S)|(?<=\p{L})(?=[^\s\p{L}])|(?<=\p{N})(?=[^\s\p{N}])"
            r"|(?<=[^\s\p{L}\p{N}'])(?=[\p{L}\p{N}])")
_SAFE_CUT_LAST = regex.compile(SAFE_CUT, regex.REVERSE)
# The fast engine's first use costs ~0.8 s (cached JIT load, class table), which the plain
# engine (~2.5 MB/s) would spend on ~2 MB of text; once paid, it wins from a few KB on.
FAST_MIN_CHARS = 4096
FAST_START_CHARS = 1 << 19
_WORD_CACHE_MAX = 200_000  # plain engine: words kept before the oldest half is dropped
_FAST_MAX_ENTRIES = 1 << 20  # fast engine: the word table is emptied past this many words
_FAST_MAX_CODEPOINTS = 1 << 25


def bytes_to_unicode():
    """{byte: one printable character} for all 256 bytes, as OpenAI's encoder.py defines it.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
    bytes take the characters 256, 257, ... in byte order. (So a space is 'Ġ', a newline 'Ċ'.)
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_merge_plain(symbols, merges):
    """The merge loop in plain Python: the reference that the Numba loop must equal.

    symbols: list of symbol ids (one per byte at first). merges: {(a, b): (rank, merged)}.
    Returns the merged list. While some adjacent pair has a rank, the lowest-ranked pair is merged
    at every non-overlapping occurrence, scanning left to right (as OpenAI's `Encoder.bpe` does).
    """
    word = list(symbols)
    while len(word) > 1:
        best, best_rank = None, None
        for pair in zip(word, word[1:]):
            m = merges.get(pair)
            if m is not None and (best_rank is None or m[0] < best_rank):
                best, best_rank = pair, m[0]
        if best is None:
            break
        a, b = best
        merged = merges[best][1]
        out, i, n = [], 0, len(word)
        while i < n:
            if i + 1 < n and word[i] == a and word[i + 1] == b:
                out.append(merged)
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word


class Tokenizer:
    """GPT-2 byte-level BPE.

    encoder: {token string (byte<->unicode alphabet): id}, as in encoder.json.
    merges: [(left, right), ...] in rank order, as in vocab.bpe without its '#version' line.
    """

    def __init__(self, encoder, merges, source="encoder.json"):
        self.encoder = dict(encoder)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.n_vocab = max(self.decoder) + 1 if self.decoder else 0
        self.special_tokens = {s: i for s, i in self.encoder.items() if s == ENDOFTEXT}
        self.eot_token = self.special_tokens.get(ENDOFTEXT)
        self._source = source
        self._pat = regex.compile(PATTERN)
        self._special_pat = regex.compile("|".join(map(regex.escape, self.special_tokens))) \
            if self.special_tokens else None

        byte_char = bytes_to_unicode()
        char_byte = {c: b for b, c in byte_char.items()}
        # Symbols are ints: a token's encoder id, or a fresh id past the vocabulary for a string
        # that BPE can build but encoder.json lacks (reaching one at the end is an error, as it
        # is a KeyError in OpenAI's code).
        self._sym = dict(self.encoder)
        self._sym_str = dict(self.decoder)

        fresh = iter(range(self.n_vocab, 1 << 31))

        def sym(s):
            i = self._sym.get(s)
            if i is None:
                i = self._sym[s] = next(fresh)
                self._sym_str[i] = s
            return i

        self._byte_sym = [sym(byte_char[b]) for b in range(256)]
        self.merges = {}
        for rank, (a, b) in enumerate(merges):
            # A repeated pair keeps its last rank, like OpenAI's dict(zip(merges, range(...))).
            self.merges[(sym(a), sym(b))] = (rank, sym(a + b))
        self._cache = {}
        self._fast = None
        self._fast_lock = threading.Lock()

        # Decoding: each id's bytes. A token string outside the byte alphabet (never in GPT-2's
        # files) decodes as its own UTF-8.
        self._id_bytes = {}
        for i, s in self.decoder.items():
            if all(c in char_byte for c in s):
                self._id_bytes[i] = bytes(char_byte[c] for c in s)
            else:
                self._id_bytes[i] = s.encode("utf-8")

    # ------------------------------------------------------------------ encoding
    def encode(self, text, allowed_special=()):
        """str -> list[int]. `allowed_special`: "all" or a set of special tokens (only
        "<|endoftext|>" exists) that become their single id; elsewhere they are plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._encode(text, allowed_special, False)

    def _encode(self, text, allowed_special, stream):
        ids = []
        for seg, special in self._segments(text, allowed_special):
            if special is not None:
                ids.append(special)
            elif seg:
                ids.extend(self._encode_ordinary(seg, stream))
        return ids

    def encode_ordinary(self, text):
        """str -> list[int], with every special token treated as plain text."""
        return self._encode_ordinary(text)

    def _encode_ordinary(self, text, stream=False):
        # A stream (encode_iter) is long by nature, worth the fast engine's start-up cost.
        n = len(text)
        try:
            if (n >= FAST_MIN_CHARS and (stream or n >= FAST_START_CHARS or self._fast is not None)
                    and _fast_enabled()):
                return self._encode_fast(text).tolist()
            return self._encode_plain(text)
        except UnicodeEncodeError:
            # A lone surrogate has no UTF-8 bytes: e.g. "\udce9" from bytes that were not UTF-8,
            # read with errors="surrogateescape" (Python's stdin in a C locale), or JSON's "\ud800".
            at = _SURROGATE.search(text)
            raise Npgpt2Error(f"the text is not valid Unicode: lone surrogate {at.group()!r} at "
                              f"character {at.start()} (bytes that are not UTF-8?)") from None

    def _segments(self, text, allowed_special):
        """Yield (text, None) for ordinary stretches and ("", id) for each allowed special token."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            yield text, None
            return
        pos = 0
        for m in self._special_pat.finditer(text):
            if m.group() in allowed:
                yield text[pos:m.start()], None
                yield "", self.special_tokens[m.group()]
                pos = m.end()
        yield text[pos:], None

    def _allowed(self, allowed_special):
        if allowed_special == "all":
            return set(self.special_tokens)
        if isinstance(allowed_special, str):
            allowed_special = {allowed_special}
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise Npgpt2Error(f"allowed_special: {sorted(unknown)[0]!r} is not a special token of "
                              f"{self._source} (known: {', '.join(self.special_tokens) or 'none'})")
        return allowed

    def _encode_plain(self, text):
        """The reference engine: regex pre-tokenizer, dict cache per word, Python merge loop."""
        cache = self._cache
        ids = []
        extend = ids.extend
        for word in self._pat.findall(text):
            toks = cache.get(word)
            if toks is None:
                toks = self._bpe_word_plain(word)
                if len(cache) >= _WORD_CACHE_MAX:
                    for old in list(cache)[: _WORD_CACHE_MAX // 2]:  # oldest first (dict order)
                        cache.pop(old, None)  # pop: another thread may be evicting too
                cache[word] = toks
            extend(toks)
        return ids

    def _bpe_word_plain(self, word):
        byte_sym = self._byte_sym
        return self._final(tuple(bpe_merge_plain([byte_sym[b] for b in word.encode("utf-8")], self.merges)))

    def _final(self, syms):
        for s in syms:
            if s >= self.n_vocab:  # every symbol below n_vocab is an encoder.json id
                raise Npgpt2Error(f"{self._source}: BPE produced token {self._sym_str[s]!r}, "
                                  f"which encoder.json does not contain")
        return syms

    # ------------------------------------------------------------------ streaming
    def encode_iter(self, text_chunks, allowed_special=(), block_chars=1 << 20):
        """Encode a stream of str chunks; yield one np.ndarray of ids (uint16 when the vocabulary
        fits, else uint32) per block of about `block_chars` characters or more.

        The concatenated arrays equal `encode("".join(text_chunks))`, because text is cut only at
        points p where PATTERN's matches of text[:p] and text[p:] are exactly its matches of the
        whole text (`SAFE_CUT`), which needs only text[p-1], text[p] and text[p+1]:
        - before a space followed by a non-space: the space starts the next word (' ?\\p{L}+' etc.),
          and a whitespace run before it ends there whether or not the text goes on;
        - between two non-space characters of different classes (letter / number / other), unless
          the first is an apostrophe (which could start "'s", "'t", ...): runs of one class end
          there with or without what follows, and no match spans two classes.
        An allowed special token is never cut: a cut inside one moves to its start, where the
        text splits into segments anyway. Text with no cut point for a long stretch is held (as
        one string) until one comes.
        """
        dtype = np.uint16 if self.n_vocab <= 1 << 16 else np.uint32
        allowed = self._allowed(allowed_special)
        # Cut points are looked for only this far from the end, so that an allowed special token
        # around a cut is wholly in the buffer.
        margin = max(map(len, allowed), default=1) - 1
        buf, size, searched, next_try = [], 0, 0, block_chars
        for chunk in text_chunks:
            if not isinstance(chunk, str):
                raise TypeError(f"encode_iter expects str chunks, got {type(chunk).__name__}")
            buf.append(chunk)
            size += len(chunk)
            if size < next_try:
                continue
            text = "".join(buf)
            start = max(searched - 2, 0)  # the part before was searched already
            end = max(len(text) - margin, 0)
            m = _SAFE_CUT_LAST.search(text, start, end)
            if m is None or m.start() <= start:
                # Try again once the text has doubled, so a long stretch without a cut costs
                # linear time, not quadratic.
                buf, searched, next_try = [text], end, 2 * size
                continue
            cut = m.start()
            for sp in allowed:
                i = text.rfind(sp, max(0, cut - len(sp) + 1), cut + len(sp) - 1)
                if i != -1 and i < cut:
                    cut = i
            if cut <= 0:
                buf, searched, next_try = [text], end, 2 * size
                continue
            yield np.asarray(self._encode(text[:cut], allowed_special, True), dtype=dtype)
            rest = text[cut:]
            buf, size, searched, next_try = [rest], len(rest), end - cut, block_chars
        text = "".join(buf)
        if text:
            yield np.asarray(self._encode(text, allowed_special, True), dtype=dtype)

    def encode_file(self, path, encoding="utf-8", allowed_special=(), block_chars=1 << 20):
        """Yield id arrays (see `encode_iter`) for a text file read in blocks, as
        `encode(open(path, encoding=encoding).read())` would give, without holding it all."""
        path = os.fspath(path)

        def blocks():
            try:
                opener = gzip.open if path.endswith(".gz") else open
                with opener(path, "rt", encoding=encoding) as f:
                    while True:
                        block = f.read(block_chars)
                        if not block:
                            return
                        yield block
            except UnicodeDecodeError as e:
                raise Npgpt2Error(f"{path}: not valid {encoding} text ({e.reason} at byte {e.start} "
                                  f"of a read block); pass the right encoding") from None
            except LookupError:
                raise Npgpt2Error(f"{path}: unknown text encoding {encoding!r}") from None
            except OSError as e:
                raise Npgpt2Error(f"{path}: cannot read ({e.strerror or e})") from None

        return self.encode_iter(blocks(), allowed_special, block_chars)

    # ------------------------------------------------------------------ decoding
    def decode_bytes(self, ids):
        """ids -> the raw bytes they stand for (may end inside a UTF-8 character)."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        table = self._id_bytes
        try:
            return b"".join([table[i] for i in ids])
        except (KeyError, TypeError):
            for i in ids:
                try:
                    table[i]
                except (KeyError, TypeError):
                    raise Npgpt2Error(f"token id {i!r} is not in the vocabulary of {self._source} "
                                      f"(ids are integers 0..{self.n_vocab - 1})") from None
            raise

    def decode(self, ids):
        """ids -> str; bytes that do not form whole UTF-8 characters become U+FFFD, never an error."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        """The bytes of one token id."""
        return self.decode_bytes([i])

    def clear_cache(self):
        """Forget every cached word (both engines); the next encode starts cold."""
        with self._fast_lock:
            self._cache = {}
            if self._fast is not None:
                self._fast._alloc(*self._fast.initial[:3])

    # ------------------------------------------------------------------ fast engine
    def _encode_fast(self, text):
        """Numba engine: text -> int32 array of ids (same ids as `_encode_plain`)."""
        if not text:
            return np.zeros(0, np.int32)
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        with self._fast_lock:
            if self._fast is None:
                self._fast = _FastState(self)
            ids = self._fast.encode(cp)
        bad = ids[ids >= self.n_vocab]
        if bad.size:
            self._final(bad.tolist())
        return ids

    def merge_fast(self, symbols):
        """The Numba merge loop on one word's symbol ids (for tests): list[int] -> list[int]."""
        with self._fast_lock:
            if self._fast is None:
                self._fast = _FastState(self)
            f = self._fast
            w = np.array(symbols, dtype=np.int32)
            n = _bpe_merge_nb(w, len(w), f.mkeys, f.mrank, f.mnew)
            return w[:n].tolist()

    @staticmethod
    def split_fast(text):
        """The Numba scanner's words for `text` (for tests; must equal `regex.findall(PATTERN)`)."""
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ends = _word_ends(cp, _class_table()).tolist()
        return [text[a:b] for a, b in zip([0] + ends, ends)]

    def merge_plain(self, symbols):
        """The plain merge loop on one word's symbol ids: list[int] -> list[int]."""
        return bpe_merge_plain(symbols, self.merges)

    def byte_symbols(self, data):
        """bytes -> the initial symbol ids BPE starts from (one per byte)."""
        return [self._byte_sym[b] for b in data]


_SURROGATE = regex.compile("[\ud800-\udfff]")


def _fast_enabled():
    return njit is not None and os.environ.get("NPGPT2_PLAIN", "") in ("", "0")


# ---------------------------------------------------------------------- loading
def _read_encoder(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            encoder = json.load(f)
    except OSError as e:
        raise Npgpt2Error(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Npgpt2Error(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(encoder, dict) or not encoder:
        raise Npgpt2Error(f"{path}: expected a JSON object mapping token strings to ids")
    for s, i in encoder.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise Npgpt2Error(f"{path}: token {s!r} has id {i!r}; ids must be non-negative integers")
    if max(encoder.values()) >= 1 << 31:
        raise Npgpt2Error(f"{path}: ids must be below 2**31")
    if len(set(encoder.values())) != len(encoder):
        seen = {}
        for s, i in encoder.items():
            if i in seen:
                raise Npgpt2Error(f"{path}: tokens {seen[i]!r} and {s!r} share the id {i}")
            seen[i] = s
    return encoder


def _read_merges(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise Npgpt2Error(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise Npgpt2Error(f"{path}: not UTF-8 text") from None
    merges = []
    for lineno, line in enumerate(lines, 1):
        if lineno == 1 and line.startswith("#version"):
            continue
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise Npgpt2Error(f"{path}: line {lineno} should hold two space-separated symbols, "
                              f"got {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def read_tokenizer(encoder_path, merges_path):
    """A Tokenizer from an encoder.json and a vocab.bpe (no caching)."""
    return Tokenizer(_read_encoder(encoder_path), _read_merges(merges_path), source=str(encoder_path))


_loaded = {}
_loaded_lock = threading.Lock()


def load_tokenizer(model_dir=None):
    """The tokenizer of `model_dir` (its encoder.json + vocab.bpe) when both files are there,
    else the GPT-2 files packaged with npgpt2; wrapped in a CompactTokenizer when the folder
    has a compact_vocab.npy (see compact_vocab.py). Loaded once per process per file content (so a
    model folder holding OpenAI's files shares the packaged tokenizer and its caches)."""
    folder = ASSETS
    if model_dir is not None:
        d = Path(model_dir)
        have = [(d / n).is_file() for n in ("encoder.json", "vocab.bpe")]
        if all(have):
            folder = d
        elif any(have):
            log.warning("%s has only one of encoder.json / vocab.bpe; using the packaged GPT-2 files", d)
    enc, bpe = folder / "encoder.json", folder / "vocab.bpe"
    key = []
    for p in (enc, bpe):
        try:
            key.append(hashlib.sha256(p.read_bytes()).hexdigest())
        except OSError as e:
            raise Npgpt2Error(f"{p}: cannot read ({e.strerror or e})") from None
    with _loaded_lock:
        tok = _loaded.get(tuple(key))
        if tok is None:
            tok = _loaded[tuple(key)] = read_tokenizer(enc, bpe)
    from .compact_vocab import wrap_if_compact  # a model of a subset of GPT-2's tokens (the demo's)
    return wrap_if_compact(tok, model_dir)


# ---------------------------------------------------------------------- Numba engine
# Code point classes for the scanner; every character is in exactly one.
_OTHER, _LETTER, _NUMBER, _SPACE = 0, 1, 2, 3
_classes = None


def _class_table():
    """uint8[0x110000]: the class of every code point as `regex` sees \\p{L}, \\p{N} and \\s."""
    global _classes
    if _classes is None:
        every = "".join(map(chr, range(0x110000)))
        table = np.zeros(0x110000, dtype=np.uint8)
        for cls, prop in ((_SPACE, r"\s+"), (_NUMBER, r"\p{N}+"), (_LETTER, r"\p{L}+")):
            for m in regex.finditer(prop, every):
                table[m.start():m.end()] = cls
        _classes = table
    return _classes


class _FastState:
    """The Numba engine's tables for one Tokenizer: pair ranks, and the table of seen words."""

    initial = (1 << 16, 1 << 20, 1 << 19, 1024)  # words, code points, tokens, work buffer

    def __init__(self, tok):
        pairs = list(tok.merges.items())
        size = 1 << max(4, (4 * len(pairs)).bit_length())
        self.mkeys = np.full(size, -1, dtype=np.int64)
        self.mrank = np.zeros(size, dtype=np.int32)
        self.mnew = np.zeros(size, dtype=np.int32)
        if pairs:
            ab = np.array([p for p, _ in pairs], dtype=np.int64)
            rn = np.array([v for _, v in pairs], dtype=np.int64)
            _build_pairs(self.mkeys, self.mrank, self.mnew, ab[:, 0], ab[:, 1], rn[:, 0], rn[:, 1])
        self.byte_sym = np.array(tok._byte_sym, dtype=np.int32)
        self.classes = _class_table()
        self.work = np.zeros(self.initial[3], dtype=np.int32)
        self._alloc(*self.initial[:3])

    def _alloc(self, n_entries, n_cp, n_tok):
        self.slots = np.full(2 * n_entries, -1, dtype=np.int64)
        self.ehash = np.zeros(n_entries, dtype=np.uint64)
        self.einfo = np.zeros((n_entries, 4), dtype=np.int64)  # kstart, klen, tstart, tlen
        self.kstore = np.zeros(n_cp, dtype=np.uint32)
        self.tstore = np.zeros(n_tok, dtype=np.int32)
        self.used = np.zeros(3, dtype=np.int64)  # entries, code points, tokens in use

    def _grow(self, need):
        """Make room for one more word of `need` code points: grow the arrays, or empty them
        when the table is at its size limit (the cache is only a cache)."""
        n, k, t = (int(x) for x in self.used)
        if n + 1 > _FAST_MAX_ENTRIES or k + need > _FAST_MAX_CODEPOINTS:
            self._alloc(len(self.ehash), max(len(self.kstore), need), max(len(self.tstore), 4 * need))
            return
        if n + 1 > len(self.ehash):
            m = 2 * len(self.ehash)
            self.ehash = np.concatenate([self.ehash, np.zeros(m - len(self.ehash), np.uint64)])
            self.einfo = np.concatenate([self.einfo, np.zeros((m - len(self.einfo), 4), np.int64)])
            self.slots = np.full(2 * m, -1, dtype=np.int64)
            _rehash(self.slots, self.ehash, n)
        if k + need > len(self.kstore):
            self.kstore = np.concatenate([self.kstore, np.zeros(max(len(self.kstore), need), np.uint32)])
        if t + 4 * need > len(self.tstore):
            self.tstore = np.concatenate([self.tstore, np.zeros(max(len(self.tstore), 4 * need), np.int32)])

    def encode(self, cp, out_size=None):
        out = np.zeros(len(cp) + 64 if out_size is None else out_size, dtype=np.int32)
        pos = n_out = 0
        while True:
            status, pos, n_out, need = _encode_kernel(
                cp, self.classes, pos, out, n_out, self.slots, self.ehash, self.einfo, self.kstore,
                self.tstore, self.used, self.byte_sym, self.mkeys, self.mrank, self.mnew, self.work)
            if status == 0:
                return out[:n_out]
            if status == 1:
                out = np.concatenate([out, np.zeros(max(len(out), 4 * need), np.int32)])
            elif status == 2:
                self._grow(need)
            else:
                self.work = np.zeros(4 * need + 16, dtype=np.int32)


if njit is not None:
    _jit = njit(cache=True, nogil=True)

    @_jit
    def _mix(key):
        """A 64-bit hash of a uint64 (multiply-xorshift)."""
        key = (key ^ (key >> np.uint64(31))) * np.uint64(0x9E3779B97F4A7C15)
        return key ^ (key >> np.uint64(29))

    @_jit
    def _build_pairs(mkeys, mrank, mnew, a, b, rank, new):
        mask = np.uint64(mkeys.shape[0] - 1)
        for i in range(a.shape[0]):
            key = (a[i] << 32) | b[i]
            s = np.int64(_mix(np.uint64(key)) & mask)
            while mkeys[s] != -1 and mkeys[s] != key:
                s = np.int64((np.uint64(s) + np.uint64(1)) & mask)
            mkeys[s] = key
            mrank[s] = rank[i]
            mnew[s] = new[i]

    @_jit
    def _pair_slot(mkeys, a, b):
        """Slot of the merge (a, b) in the pair table, or -1."""
        key = (np.int64(a) << 32) | np.int64(b)
        mask = np.uint64(mkeys.shape[0] - 1)
        s = np.int64(_mix(np.uint64(key)) & mask)
        while True:
            k = mkeys[s]
            if k == key:
                return s
            if k == -1:
                return -1
            s = np.int64((np.uint64(s) + np.uint64(1)) & mask)

    @_jit
    def _bpe_merge_nb(w, n, mkeys, mrank, mnew):
        """`bpe_merge_plain` on w[:n] in place; returns the new length."""
        while n > 1:
            best = -1
            best_rank = 0
            for i in range(n - 1):
                s = _pair_slot(mkeys, w[i], w[i + 1])
                if s >= 0 and (best < 0 or mrank[s] < best_rank):
                    best = s
                    best_rank = mrank[s]
            if best < 0:
                break
            a = mkeys[best] >> 32
            b = mkeys[best] & 0xFFFFFFFF
            merged = mnew[best]
            i = 0
            j = 0
            while i < n:
                if i + 1 < n and w[i] == a and w[i + 1] == b:
                    w[j] = merged
                    i += 2
                else:
                    w[j] = w[i]
                    i += 1
                j += 1
            n = j
        return n

    @_jit
    def _word_end(cp, classes, i, n):
        """End of the PATTERN match that starts at cp[i] (the text has n code points)."""
        c = cp[i]
        if c == 39 and i + 1 < n:  # ' : 's 't 'm 'd, then 're 've 'll
            d = cp[i + 1]
            if d == 115 or d == 116 or d == 109 or d == 100:
                return i + 2
            if i + 2 < n:
                e = cp[i + 2]
                if (d == 114 and e == 101) or (d == 118 and e == 101) or (d == 108 and e == 108):
                    return i + 3
        k = classes[c]
        if c == 32 and i + 1 < n and classes[cp[i + 1]] != 3:
            i += 1  # ' ?\p{L}+' etc.: one leading space joins the run after it
            k = classes[cp[i]]
        j = i + 1
        while j < n and classes[cp[j]] == k:
            j += 1
        if k != 3 or j == n:
            return j
        # A whitespace run followed by a non-space: '\s+(?!\S)' leaves its last character,
        # which '\s+' then takes alone when the run was a single character.
        if j - i >= 2:
            return j - 1
        return j

    @_jit
    def _word_ends(cp, classes):
        """End index of every PATTERN match in cp, in order (for tests of the scanner)."""
        n = cp.shape[0]
        ends = np.zeros(n, dtype=np.int64)
        i = 0
        k = 0
        while i < n:
            i = _word_end(cp, classes, i, n)
            ends[k] = i
            k += 1
        return ends[:k]

    @_jit
    def _encode_kernel(cp, classes, pos, out, n_out, slots, ehash, einfo, kstore, tstore, used,
                       byte_sym, mkeys, mrank, mnew, work):
        """Encode cp[pos:] into out[n_out:]. Returns (status, pos, n_out, need): status 0 done;
        1 out is full, 2 the word table is full, 3 the work buffer is too small; `need` is the
        current word's length in code points; the caller makes room and calls again from pos."""
        n = cp.shape[0]
        mask = np.uint64(slots.shape[0] - 1)
        i = pos
        while i < n:
            j = _word_end(cp, classes, i, n)
            h = np.uint64(14695981039346656037)  # FNV-1a over the code points
            for q in range(i, j):
                h = (h ^ np.uint64(cp[q])) * np.uint64(1099511628211)
            s = np.int64(_mix(h) & mask)
            found = -1
            while True:
                e = slots[s]
                if e == -1:
                    break
                if ehash[e] == h and einfo[e, 1] == j - i:
                    ks = einfo[e, 0]
                    same = True
                    for q in range(j - i):
                        if kstore[ks + q] != cp[i + q]:
                            same = False
                            break
                    if same:
                        found = e
                        break
                s = np.int64((np.uint64(s) + np.uint64(1)) & mask)
            if found >= 0:
                ts = einfo[found, 2]
                tl = einfo[found, 3]
                if n_out + tl > out.shape[0]:
                    return 1, i, n_out, j - i
                for q in range(tl):
                    out[n_out + q] = tstore[ts + q]
                n_out += tl
                i = j
                continue
            if work.shape[0] < 4 * (j - i):
                return 3, i, n_out, j - i
            nb = 0  # UTF-8 encode the word straight into byte symbols
            for q in range(i, j):
                c = cp[q]
                if c < 0x80:
                    work[nb] = byte_sym[c]
                    nb += 1
                elif c < 0x800:
                    work[nb] = byte_sym[0xC0 | (c >> 6)]
                    work[nb + 1] = byte_sym[0x80 | (c & 0x3F)]
                    nb += 2
                elif c < 0x10000:
                    work[nb] = byte_sym[0xE0 | (c >> 12)]
                    work[nb + 1] = byte_sym[0x80 | ((c >> 6) & 0x3F)]
                    work[nb + 2] = byte_sym[0x80 | (c & 0x3F)]
                    nb += 3
                else:
                    work[nb] = byte_sym[0xF0 | (c >> 18)]
                    work[nb + 1] = byte_sym[0x80 | ((c >> 12) & 0x3F)]
                    work[nb + 2] = byte_sym[0x80 | ((c >> 6) & 0x3F)]
                    work[nb + 3] = byte_sym[0x80 | (c & 0x3F)]
                    nb += 4
            m = _bpe_merge_nb(work, nb, mkeys, mrank, mnew)
            if n_out + m > out.shape[0]:
                return 1, i, n_out, j - i
            ne = used[0]
            if (ne + 1 > ehash.shape[0] or 2 * (ne + 1) > slots.shape[0]
                    or used[1] + (j - i) > kstore.shape[0] or used[2] + m > tstore.shape[0]):
                return 2, i, n_out, j - i
            slots[s] = ne
            ehash[ne] = h
            einfo[ne, 0] = used[1]
            einfo[ne, 1] = j - i
            einfo[ne, 2] = used[2]
            einfo[ne, 3] = m
            for q in range(j - i):
                kstore[used[1] + q] = cp[i + q]
            for q in range(m):
                tstore[used[2] + q] = work[q]
                out[n_out + q] = work[q]
            used[0] = ne + 1
            used[1] += j - i
            used[2] += m
            n_out += m
            i = j
        return 0, i, n_out, 0

    @_jit
    def _rehash(slots, ehash, n):
        mask = np.uint64(slots.shape[0] - 1)
        for e in range(n):
            s = np.int64(_mix(ehash[e]) & mask)
            while slots[s] != -1:
                s = np.int64((np.uint64(s) + np.uint64(1)) & mask)
            slots[s] = e
