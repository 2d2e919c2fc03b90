"""The tokenizer's fast engine: GPT-2 BPE compiled with Numba, giving the plain engine's ids.

`tokenizer.py` holds the readable engine and decides which one runs; this module holds only
what makes long texts fast:
- a scanner (`_word_end`) that follows tokenizer.PATTERN on the text's code points, with the
  letter / number / space classes taken from `regex` itself (`class_table`);
- a hash table of already-seen words held in NumPy arrays (the plain engine's dict cache);
- the merge loop compiled twice: the simple loop of `tokenizer.bpe_merge_plain` for short words,
  and the heap of `tokenizer.bpe_merge_heap` for words of HEAP_MIN_SYMBOLS bytes or more, so a
  long unbroken run (base64, minified code, random letters) costs O(n log n), not O(n^2).

`FastEngine(merges, byte_sym)` is the engine for one tokenizer. Without Numba (AVAILABLE is
False) nothing here is compiled and the tokenizer uses its plain engine for every text.
"""
import numpy as np
import regex

from . import jit

_numba = jit.numba()  # None without Numba (one logged warning): the plain engine runs
AVAILABLE = _numba is not None

# Words (in bytes) from which the merge runs on a heap. Ordinary words are far shorter and take
# the simple loop (the reference); the heap is there for long unbroken runs, where the loop's
# cost grows with the square of the length.
HEAP_MIN_SYMBOLS = 64

# What `_encode_kernel` returns: done, or which buffer the caller must make room in before
# calling again from the position it returned.
DONE, OUT_FULL, TABLE_FULL, WORK_SMALL = 0, 1, 2, 3

_FAST_MAX_ENTRIES = 1 << 20  # the word table is emptied past this many words ...
_FAST_MAX_CODEPOINTS = 1 << 25  # ... or this many code points of words

# Code point classes for the scanner; every character is in exactly one.
OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3
_classes = None


def class_table():
    """uint8[0x110000]: the class of every code point as `regex` sees \\p{L}, \\p{N} and \\s."""
    global _classes
    if _classes is None:
        every = "".join(map(chr, range(0x110000)))
        table = np.zeros(0x110000, dtype=np.uint8)
        for cls, prop in ((SPACE, r"\s+"), (NUMBER, r"\p{N}+"), (LETTER, r"\p{L}+")):
            for m in regex.finditer(prop, every):
                table[m.start():m.end()] = cls
        _classes = table
    return _classes


def code_points(text):
    """str -> uint32 array of its code points (a lone surrogate raises UnicodeEncodeError)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def split_words(text):
    """The scanner's words for `text` (must equal `regex.findall(tokenizer.PATTERN, text)`)."""
    ends = _word_ends(code_points(text), class_table()).tolist()
    return [text[a:b] for a, b in zip([0] + ends, ends)]


class FastEngine:
    """The compiled engine's tables for one tokenizer: pair ranks, and the table of seen words.

    merges: {(a, b): (rank, merged)} over symbol ids (the tokenizer's). byte_sym: the symbol of
    each of the 256 bytes. Not thread-safe: the tokenizer calls it under a lock.
    """

    initial = (1 << 16, 1 << 20, 1 << 19, 1024)  # words, code points, tokens, work buffer

    def __init__(self, merges, byte_sym):
        pairs = list(merges.items())
        size = 1 << max(4, (4 * len(pairs)).bit_length())
        self.mkeys = np.full(size, -1, dtype=np.int64)
        self.mrank = np.zeros(size, dtype=np.int32)
        self.mnew = np.zeros(size, dtype=np.int32)
        if pairs:
            ab = np.array([p for p, _ in pairs], dtype=np.int64)
            rn = np.array([v for _, v in pairs], dtype=np.int64)
            _build_pairs(self.mkeys, self.mrank, self.mnew, ab[:, 0], ab[:, 1], rn[:, 0], rn[:, 1])
        self.byte_sym = np.array(byte_sym, dtype=np.int32)
        self.classes = class_table()
        self.heap_min = HEAP_MIN_SYMBOLS
        self.work = np.zeros(self.initial[3], dtype=np.int32)
        self.clear()

    def clear(self):
        """Forget every seen word."""
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
        when the table is at its size limit (the table is only a cache)."""
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
        """uint32 code points -> int32 symbol ids (ids past the vocabulary are the caller's to
        report). `out_size`: the output buffer's first size (tests make it tiny to force growth)."""
        out = np.zeros(len(cp) + 64 if out_size is None else out_size, dtype=np.int32)
        pos = n_out = 0
        while True:
            status, pos, n_out, need = _encode_kernel(
                cp, self.classes, pos, out, n_out, self.slots, self.ehash, self.einfo, self.kstore,
                self.tstore, self.used, self.byte_sym, self.mkeys, self.mrank, self.mnew, self.work,
                self.heap_min)
            if status == DONE:
                return out[:n_out]
            if status == OUT_FULL:
                out = np.concatenate([out, np.zeros(max(len(out), 4 * need), np.int32)])
            elif status == TABLE_FULL:
                self._grow(need)
            elif status == WORK_SMALL:
                self.work = np.zeros(4 * need + 16, dtype=np.int32)
            else:  # pragma: no cover - the kernel returns only the codes above
                raise AssertionError(f"unknown kernel status {status}")

    def merge(self, symbols, heap_min=None):
        """The compiled merge on one word's symbol ids: list[int] -> list[int]. heap_min: the
        length from which the heap runs (default self.heap_min; 0 = always, tests use both)."""
        w = np.array(symbols, dtype=np.int32)
        n = _merge_word(w, len(w), self.mkeys, self.mrank, self.mnew,
                        self.heap_min if heap_min is None else heap_min)
        return w[:n].tolist()


if AVAILABLE:
    _jit = _numba.njit(cache=True, nogil=True)

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
    def _merge_loop(w, n, mkeys, mrank, mnew):
        """`tokenizer.bpe_merge_plain` on w[:n] in place; returns the new length."""
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
    def _heap_push(heap, size, key):
        i = size
        heap[i] = key
        while i > 0:
            parent = (i - 1) >> 1
            if heap[parent] <= key:
                break
            heap[i] = heap[parent]
            i = parent
        heap[i] = key
        return size + 1

    @_jit
    def _heap_pop(heap, size):
        """Remove heap[0]; returns (that key, the new size)."""
        top = heap[0]
        size -= 1
        last = heap[size]
        i = 0
        while True:
            c = 2 * i + 1
            if c >= size:
                break
            if c + 1 < size and heap[c + 1] < heap[c]:
                c += 1
            if heap[c] >= last:
                break
            heap[i] = heap[c]
            i = c
        heap[i] = last
        return top, size

    @_jit
    def _merge_heap(w, n, mkeys, mrank, mnew):
        """`tokenizer.bpe_merge_heap` on w[:n] in place (same rounds, compiled); returns the new
        length. Heap keys are rank << 32 | position, so a pop gives the lowest rank, leftmost."""
        nxt = np.empty(n, dtype=np.int64)
        prv = np.empty(n, dtype=np.int64)
        for i in range(n):
            nxt[i] = i + 1  # n = no next symbol
            prv[i] = i - 1
        alive = np.ones(n, dtype=np.bool_)
        heap = np.empty(3 * n + 1, dtype=np.int64)  # n - 1 pairs at first, at most 2 per merge
        batch = np.empty(n, dtype=np.int64)
        size = 0
        for i in range(n - 1):
            s = _pair_slot(mkeys, w[i], w[i + 1])
            if s >= 0:
                size = _heap_push(heap, size, (np.int64(mrank[s]) << 32) | i)
        while size > 0:
            # One round: every queued position of the lowest rank, left to right. New pairs
            # made during the round never have its rank, so none is missed by taking them now.
            key, size = _heap_pop(heap, size)
            rank = key >> 32
            nb = 0
            batch[nb] = key & 0xFFFFFFFF
            nb += 1
            while size > 0 and (heap[0] >> 32) == rank:
                key, size = _heap_pop(heap, size)
                batch[nb] = key & 0xFFFFFFFF
                nb += 1
            for q in range(nb):
                i = batch[q]
                if not alive[i] or nxt[i] >= n:
                    continue  # stale: merged away since it was queued
                j = nxt[i]
                s = _pair_slot(mkeys, w[i], w[j])
                if s < 0 or mrank[s] != rank:
                    continue  # stale: a neighbour changed
                w[i] = mnew[s]
                alive[j] = False
                k = nxt[j]
                nxt[i] = k
                if k < n:
                    prv[k] = i
                    s = _pair_slot(mkeys, w[i], w[k])
                    if s >= 0:
                        size = _heap_push(heap, size, (np.int64(mrank[s]) << 32) | i)
                p = prv[i]
                if p >= 0:
                    s = _pair_slot(mkeys, w[p], w[i])
                    if s >= 0:
                        size = _heap_push(heap, size, (np.int64(mrank[s]) << 32) | p)
        m = 0
        i = 0
        while i < n:
            w[m] = w[i]
            m += 1
            i = nxt[i]
        return m

    @_jit
    def _merge_word(w, n, mkeys, mrank, mnew, heap_min):
        if n >= heap_min:
            return _merge_heap(w, n, mkeys, mrank, mnew)
        return _merge_loop(w, n, mkeys, mrank, mnew)

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
        if c == 32 and i + 1 < n and classes[cp[i + 1]] != SPACE:
            i += 1  # ' ?\p{L}+' etc.: one leading space joins the run after it
            k = classes[cp[i]]
        j = i + 1
        while j < n and classes[cp[j]] == k:
            j += 1
        if k != SPACE or j == n:
            return j
        # A whitespace run followed by a non-space: '\s+(?!\S)' leaves its last character,
        # which '\s+' then takes alone when the run was a single character.
        if j - i >= 2:
            return j - 1
        return j

    @_jit
    def _word_ends(cp, classes):
        """End index of every PATTERN match in cp, in order."""
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
                       byte_sym, mkeys, mrank, mnew, work, heap_min):
        """Encode cp[pos:] into out[n_out:]. Returns (status, pos, n_out, need): status DONE, or
        OUT_FULL / TABLE_FULL / WORK_SMALL naming the buffer to enlarge; `need` is the current
        word's length in code points; the caller makes room and calls again from pos."""
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
                    return OUT_FULL, i, n_out, j - i
                for q in range(tl):
                    out[n_out + q] = tstore[ts + q]
                n_out += tl
                i = j
                continue
            if work.shape[0] < 4 * (j - i):
                return WORK_SMALL, i, n_out, j - i
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
            m = _merge_word(work, nb, mkeys, mrank, mnew, heap_min)
            if n_out + m > out.shape[0]:
                return OUT_FULL, i, n_out, j - i
            ne = used[0]
            if (ne + 1 > ehash.shape[0] or 2 * (ne + 1) > slots.shape[0]
                    or used[1] + (j - i) > kstore.shape[0] or used[2] + m > tstore.shape[0]):
                return TABLE_FULL, i, n_out, j - i
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
        return DONE, i, n_out, 0

    @_jit
    def _rehash(slots, ehash, n):
        mask = np.uint64(slots.shape[0] - 1)
        for e in range(n):
            s = np.int64(_mix(ehash[e]) & mask)
            while slots[s] != -1:
                s = np.int64((np.uint64(s) + np.uint64(1)) & mask)
            slots[s] = e
