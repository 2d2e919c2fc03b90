"""GPT-2's byte-level BPE tokenizer, giving exactly the ids OpenAI's encoder.py gives.

Text becomes ids in three steps:
1. Pre-tokenize: split the text into chunks with `PATTERN` (contractions, letter runs, digit
   runs, runs of other symbols, each optionally led by one space; whitespace runs).
2. Each chunk's UTF-8 bytes become one symbol per byte (OpenAI's byte<->unicode map names them:
   a space is 'Ġ', so " the" starts as 'Ġ' 't' 'h' 'e').
3. BPE: repeatedly take the adjacent symbol pair with the lowest rank in vocab.bpe and merge all
   its non-overlapping occurrences, left to right, until no adjacent pair has a rank. The final
   symbols' ids come from encoder.json.
`enc.encode_and_show_work(text)` returns every one of these steps for a learner to print.

Two engines give the same ids (tests prove it):
- plain (the readable reference): `regex.findall(PATTERN)`, the merge loop `bpe_merge_plain`
  (or, for chunks of HEAP_MIN_SYMBOLS bytes or more, `bpe_merge_heap`: the same rounds in
  O(n log n), so one long unbroken chunk cannot take quadratic time), a dict cache per chunk.
  Used for short texts, when Numba is missing, and for everything when `NPGPT2_PLAIN=1` is set.
- fast (Numba, `bpe_fast.py`, for long texts; see FAST_MIN_CHARS): the same steps compiled.

`<|endoftext|>` (ENDOFTEXT, the one definition other modules import) is ordinary text unless
the caller allows it (`allowed_special`, as in tiktoken).
"""
import hashlib
import heapq
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex

from . import bpe_fast
from .errors import Npgpt2Error
from .fsutil import read_json
from .jit import plain_requested

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
# Chunks (in bytes) from which both engines merge on a heap; ordinary words are far shorter and
# take the simple loop, the reference the heap is tested against.
HEAP_MIN_SYMBOLS = bpe_fast.HEAP_MIN_SYMBOLS
_WORD_CACHE_MAX = 200_000  # plain engine: words kept before the oldest half is dropped


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


def bpe_merge_rounds(symbols, merges):
    """The BPE merge loop, one round at a time: the reference every other merge must equal.

    symbols: list of symbol ids (one per byte at first). merges: {(a, b): (rank, merged)}.
    While some adjacent pair has a rank, the lowest-ranked pair is merged at every
    non-overlapping occurrence, scanning left to right (as OpenAI's `Encoder.bpe` does).
    Yields (rank, (a, b), merged, at, word) per round: `at` = the indices in the previous word
    where the pair was merged, `word` = the new list of symbols. Each round costs O(len(word)),
    so a chunk of n bytes can cost O(n^2): see `bpe_merge_heap` for long chunks.
    """
    word = list(symbols)
    while True:
        step = bpe_merge_round(word, merges)
        if step is None:
            return
        word = step[-1]
        yield step


def bpe_merge_round(word, merges):
    """One round of the BPE merge loop: (rank, (a, b), merged, at, new word), or None when no
    adjacent pair of `word` has a rank (the word is fully merged).

    The lowest-ranked adjacent pair (a, b) is replaced by `merged` at every occurrence,
    scanning left to right, so an overlapping run "a a a" of a pair (a, a) becomes "aa a".
    """
    best, best_rank = None, None
    for pair in zip(word, word[1:]):                  # every adjacent pair, left to right
        m = merges.get(pair)
        if m is not None and (best_rank is None or m[0] < best_rank):
            best, best_rank = pair, m[0]
    if best is None:
        return None
    a, b = best
    merged = merges[best][1]
    out, at, i, n = [], [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(merged)
            at.append(i)
            i += 2                                    # the pair is consumed: no overlap
        else:
            out.append(word[i])
            i += 1
    return best_rank, best, merged, at, out


def bpe_merge_plain(symbols, merges):
    """The merged symbols of `bpe_merge_rounds` (its last round's word): list -> list."""
    word = list(symbols)
    for *_, word in bpe_merge_rounds(symbols, merges):  # noqa: B007  (keeps the last round's word)
        pass
    return word


def bpe_merge_heap(symbols, merges):
    """`bpe_merge_plain`'s result in O(n log n) time for n symbols (tested equal to it).

    The symbols form a doubly linked list (nxt/prv over their first positions, which keep
    their order), and every adjacent pair that has a rank waits in a heap keyed
    (rank, position). A round pops every entry of the lowest rank, which come out left to
    right, and merges each one still valid. This is the reference's round exactly: a merge
    never creates a pair of the round's own rank (its result differs from both of its parts),
    and the entries of later ranks, new ones included, wait until the round is over. An entry is
    stale when its left symbol was merged away or its pair changed since it was queued.
    """
    sym = list(symbols)
    n = len(sym)
    nxt = list(range(1, n + 1))  # n: no next symbol
    prv = list(range(-1, n - 1))
    get, push, pop = merges.get, heapq.heappush, heapq.heappop
    heap = []  # keys rank * n + position, so integer order = (rank, position) order
    for i in range(n - 1):
        m = get((sym[i], sym[i + 1]))
        if m is not None:
            heap.append(m[0] * n + i)
    heapq.heapify(heap)
    while heap:
        rank = heap[0] // n
        first, end = rank * n, rank * n + n
        batch = []  # this round's positions, left to right
        while heap and heap[0] < end:
            batch.append(pop(heap) - first)
        for i in batch:
            left, j = sym[i], nxt[i]
            if left is None or j == n:
                continue
            m = get((left, sym[j]))
            if m is None or m[0] != rank:
                continue
            new = sym[i] = m[1]
            sym[j] = None  # merged into its left neighbour
            k = nxt[i] = nxt[j]
            if k < n:
                prv[k] = i
                m = get((new, sym[k]))
                if m is not None:
                    push(heap, m[0] * n + i)
            p = prv[i]
            if p >= 0:
                m = get((sym[p], new))
                if m is not None:
                    push(heap, m[0] * n + p)
    return [s for s in sym if s is not None]


# ---------------------------------------------------------------------- showing the work
@dataclass(frozen=True)
class MergeStep:
    """One BPE round of a chunk: `left` + `right` -> `merged` everywhere it occurs.

    rank: the merge's line in vocab.bpe counted from 0 after the '#version' line (lower merges
    first). at: where it merged, as indices into the symbols before this round. symbols: the
    chunk's symbols after it. Symbols are shown in the byte-level alphabet ('Ġ' is a space).
    """
    rank: int
    left: str
    right: str
    merged: str
    at: tuple
    symbols: tuple


@dataclass(frozen=True)
class ChunkWork:
    """How one pre-token chunk became ids.

    text: the chunk as it is in the text. symbols: its UTF-8 bytes, one symbol per byte.
    merges: the rounds in order (empty for a special token). tokens: the final symbols, one
    per id. ids: their encoder.json ids (what `encode` gives for this chunk).
    """
    text: str
    symbols: tuple
    merges: tuple
    tokens: tuple
    ids: tuple

    def __str__(self):
        lines = [f"{self.text!r}  bytes: {' '.join(self.symbols)}"]
        for step in self.merges:
            lines.append(f"  rank {step.rank:5d}  {step.left} + {step.right} -> {step.merged}"
                         f"{f' (x{len(step.at)})' if len(step.at) > 1 else ''}"
                         f"   {_shorten(' '.join(step.symbols))}")
        lines.append(f"  ids {list(self.ids)}")
        return "\n".join(lines)


class EncodeWork(list):
    """A list of ChunkWork, one per chunk in text order, as `encode_and_show_work` returns it;
    `ids` is their concatenation (= `encode(text)`), `str()` the whole account for printing."""

    @property
    def ids(self):
        return [i for chunk in self for i in chunk.ids]

    def __str__(self):
        return "\n".join(map(str, self)) + f"\nids: {self.ids}"


def _shorten(s, width=100):
    return s if len(s) <= width else s[:width - 3] + "..."


class Tokenizer:
    """GPT-2 byte-level BPE.

    encoder: {token string (byte<->unicode alphabet): id}, as in encoder.json.
    merges: [(left, right), ...] in rank order, as in vocab.bpe without its '#version' line.

    BPE works on symbol ids: a token's encoder id, or a fresh id past the vocabulary for a
    string only an intermediate merge makes. `byte_sym[b]` is byte b's symbol and
    `self.merges` is {(left id, right id): (rank, merged id)}, what `bpe_merge_plain` takes.
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

        self.byte_sym = [sym(byte_char[b]) for b in range(256)]
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
            raise _lone_surrogate(text) from None

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
        """The reference engine: regex pre-tokenizer, dict cache per word, Python merge loop
        (on a heap for words of HEAP_MIN_SYMBOLS bytes or more)."""
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
        syms = [self.byte_sym[b] for b in word.encode("utf-8")]
        merge = bpe_merge_heap if len(syms) >= HEAP_MIN_SYMBOLS else bpe_merge_plain
        return self._final(tuple(merge(syms, self.merges)))

    def _final(self, syms):
        for s in syms:
            if s >= self.n_vocab:  # every symbol below n_vocab is an encoder.json id
                raise Npgpt2Error(f"{self._source}: BPE produced token {self._sym_str[s]!r}, "
                                  f"which encoder.json does not contain")
        return syms

    # ------------------------------------------------------------------ showing the work
    def encode_and_show_work(self, text, allowed_special=()):
        """`encode`, step by step: an EncodeWork (a list of ChunkWork, one per pre-token chunk
        or allowed special token), each with the chunk's byte symbols and every merge round in
        order with its rank. `print(enc.encode_and_show_work("Hello world"))` shows it all;
        `.ids` equals `encode(text, allowed_special)`.

        It runs the reference loop (`bpe_merge_rounds`) and keeps every round's symbols, so a
        chunk of n bytes costs O(n^2) time and memory: it is for reading, not for long input.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode_and_show_work expects str, got {type(text).__name__}")
        if _SURROGATE.search(text):
            raise _lone_surrogate(text)
        name = self._sym_str.get
        work = EncodeWork()
        for seg, special in self._segments(text, allowed_special):
            if special is not None:
                s = self.decoder[special]
                work.append(ChunkWork(s, (s,), (), (s,), (special,)))
                continue
            for chunk in self._pat.findall(seg):
                syms = [self.byte_sym[b] for b in chunk.encode("utf-8")]
                word, steps = syms, []
                for rank, (a, b), merged, at, word in bpe_merge_rounds(syms, self.merges):
                    steps.append(MergeStep(rank, name(a), name(b), name(merged), tuple(at),
                                           tuple(map(name, word))))
                ids = self._final(tuple(word))
                work.append(ChunkWork(chunk, tuple(map(name, syms)), tuple(steps),
                                      tuple(map(name, word)), ids))
        return work

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

    def clear_cache(self):
        """Forget every cached word (both engines); the next encode starts cold."""
        with self._fast_lock:
            self._cache = {}
            if self._fast is not None:
                self._fast.clear()

    # ------------------------------------------------------------------ fast engine
    def _encode_fast(self, text):
        """Numba engine: text -> int32 array of ids (same ids as `_encode_plain`)."""
        if not text:
            return np.zeros(0, np.int32)
        cp = bpe_fast.code_points(text)
        with self._fast_lock:
            ids = self._fast_engine().encode(cp)
        bad = ids[ids >= self.n_vocab]
        if bad.size:
            self._final(bad.tolist())
        return ids

    def _fast_engine(self):
        """This tokenizer's bpe_fast.FastEngine, made on first use (call under _fast_lock)."""
        if self._fast is None:
            self._fast = bpe_fast.FastEngine(self.merges, self.byte_sym)
        return self._fast


_SURROGATE = regex.compile("[\ud800-\udfff]")


def _lone_surrogate(text):
    """The error for text holding a lone surrogate, which has no UTF-8 bytes: e.g. "\\udce9"
    from bytes that were not UTF-8 read with errors="surrogateescape" (Python's stdin in a C
    locale), or JSON's "\\ud800"."""
    at = _SURROGATE.search(text)
    return Npgpt2Error(f"the text is not valid Unicode: lone surrogate {at.group()!r} at "
                       f"character {at.start()} (bytes that are not UTF-8?)")


def _fast_enabled():
    return bpe_fast.AVAILABLE and not plain_requested()


# ---------------------------------------------------------------------- loading
def _read_encoder(path):
    try:
        encoder = read_json(path)
    except OSError as e:
        raise Npgpt2Error(f"{path}: cannot read ({e.strerror or e})") from None
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
