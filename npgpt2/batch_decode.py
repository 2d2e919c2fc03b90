"""Batched decoding: up to max_batch sequences decoded together, each in its own row of one
KV cache and at its own length (continuous batching, as llama.cpp's server slots and vLLM).

Decoding one token reads every weight once, so it is bound by memory bandwidth, not
arithmetic: eight rows fed through each matrix together cost little more than one. So a
`BatchDecoder` keeps a cache of max_batch rows ("slots"). A new sequence (`Row`) has its
prompt prefilled into a free slot (together with the prompts that arrive with it and feed
as many tokens: `add_many`), then joins the others: each `sample()` draws one
token for every row (its own temperature, top-k, top-p and random stream), the caller
says which rows are done (`leave()`: finished, stopped by a stop string or cancelled), and
`feed()` runs the rest one position further in a single forward pass, each row at its own
position. A row never waits for another to finish.

A row decoded in a batch gets the tokens it would get alone: its attention reads only its
own cache row, its random stream is its own, and the per-row kernels (layernorm, attention)
compute each row alone. So do the float32 products of up to 8 rows on the kernels
(gemv.py: each output summed by the same loop whatever the batch), so there a row's logits
are its solo logits bit for bit, when its prompt was prefilled alone (prompts prefilled
together go through BLAS's products of many rows). BLAS does not promise that (float64, the plain layers):
it may sum a product of 8 rows in another order than one row's
(another kernel, another blocking, another thread split), so logits can differ in the last
bits; the promise is therefore 1e-5 in float32, 1e-12 in float64, and greedy ids equal
(tests/test_batch_decode.py).
"""
import logging

import numpy as np

from .errors import Npgpt2Error
from .sampling import check_batch_memory, check_sampling_args, check_seed, fit_prompt, sample_row

log = logging.getLogger(__name__)

# add_many: at most this many prompt tokens in one prefill forward (whole prompts; a longer
# one goes alone). Its activations (~11 x n_embd floats a token, 4.3 MB per 128 tokens at
# 124M) are held while it runs: eight 32-token prompts in one forward peaked at 11.8 MB
# (tracemalloc), which on a server whose cache rows are already touched set its peak RSS
# (759 MB under benchmarks/serve.py's load, 753 MB with forwards of 128 tokens). Two forwards
# cost ~15% more prefill time than one (124M, measured), still one read of each weight per
# 128 tokens. llama.cpp's server bounds its prefill batch the same way (n_ubatch).
PREFILL_TOKENS = 128


def row_rng(seed, index=0):
    """The random stream of sample `index` of a request with `seed` (None: fresh entropy).

    Sample 0 draws from np.random.default_rng(seed), as `generate(..., seed=seed)` does, so
    a request's first sample is generate's text; sample i > 0 from default_rng([seed, i])."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng(seed if index == 0 else [seed, index])


def log_softmax(logits):
    """logits (V,) -> log-probabilities (V,) float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def top_logprobs(logp, k):
    """The k most likely ids of log-probabilities logp (V,) -> [(id, logprob)], ties by id."""
    if k <= 0:
        return []
    ids = np.argpartition(-logp, k - 1)[:k] if k < logp.shape[0] else np.arange(logp.shape[0])
    ids = ids[np.lexsort((ids, -logp[ids]))]
    return [(int(i), float(logp[i])) for i in ids]


class Row:
    """One sequence to decode: prompt ids, how many new tokens, sampling settings, its rng.

    logprobs: None, or k >= 0: each sampled token comes with its log-probability under the
    model (the softmax of the raw logits, before temperature or cuts) and the k most likely
    alternatives. prompt_logprobs: also score the prompt's tokens (the prefill then computes
    every position's logits; a cached prefix cannot be reused). reuse: the prompt may start
    from a slot's cached prefix (faster for a chat that sends its history again; the last
    float bits may differ from a fresh prefill, so a seeded request never reuses).
    After decoding: tokens (the new ids), token_logprobs, top (per token [(id, logprob)]).
    """

    def __init__(self, prompt, length, temperature=1.0, top_k=0, top_p=1.0, rng=None, logprobs=None,
                 prompt_logprobs=False, reuse=False, tag=None):
        self.prompt, self.length = list(prompt), length
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = rng if rng is not None else np.random.default_rng()
        self.logprobs, self.prompt_logprobs, self.reuse, self.tag = logprobs, prompt_logprobs, reuse, tag
        self.tokens, self.token_logprobs, self.top = [], [], []
        self.prompt_scores = None  # with prompt_logprobs: [(logprob or None, top)] per prompt token
        self.slot = None           # the cache row while it is being decoded
        self.logits = None         # (V,) the next token's logits
        self.reused = 0            # prompt tokens taken from a slot's cache instead of prefilled

    @property
    def finished(self):
        return len(self.tokens) >= self.length


class BatchDecoder:
    """Decodes up to max_batch Rows together (see the module's docstring). One thread only:
    it runs the model, which is not thread-safe."""

    def __init__(self, model, max_batch=8):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise Npgpt2Error(f"--max_batch must be an integer >= 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.cache = model.new_cache(max_batch)  # np.zeros: pages are touched only as rows fill
        self.held = [[] for _ in range(max_batch)]  # the tokens whose keys/values each slot holds
        self.used = [0] * max_batch                # when each slot last took a row (least recent is reused)
        self.clock = 0
        self.rows = []                             # being decoded, in arrival order
        self.work = np.empty(model.hparams["n_vocab"])  # sample_row's buffer, reused every row and step

    @property
    def full(self):
        return len(self.rows) >= self.max_batch

    def add(self, row):
        """Prefill row's prompt into a free slot; its first token is drawn at the next sample()."""
        self.add_many([row])

    def add_many(self, rows):
        """Prefill several rows' prompts into free slots; each one's first token is drawn at the
        next sample(). Rows that feed the same number of tokens are prefilled in one forward
        (up to PREFILL_TOKENS tokens), each at its own cache position: eight 32-token prompts
        arriving together are two products of 128 rows per weight instead of eight of 32 (a
        weight read twice, not eight times). A row that scores its prompt (prompt_logprobs) is
        prefilled alone."""
        if len(rows) > self.max_batch - len(self.rows):
            raise RuntimeError("no free slot: every row is being decoded")
        groups = {}
        for i, row in enumerate(rows):
            slot, n = self._pick_slot(row)
            self.clock += 1
            self.used[slot] = self.clock
            self.cache.lengths[slot] = n
            del self.held[slot][n:]
            row.slot, row.reused, row.logits = slot, n, None
            self.rows.append(row)  # the slot is taken (_pick_slot looks at self.rows)
            key = ("alone", i) if row.prompt_logprobs else len(row.prompt) - n
            forwards = groups.setdefault(key, [[]])
            if forwards[-1] and (len(forwards[-1]) + 1) * (len(row.prompt) - n) > PREFILL_TOKENS:
                forwards.append([])  # that forward is full: the row starts the next one
            forwards[-1].append(row)
        try:
            for group in (g for forwards in groups.values() for g in forwards):
                self._prefill(group)
        except BaseException:  # an interrupted prefill: its rows leave, their slots as they were
            for row in rows:
                if row.logits is None:
                    self.rows.remove(row)
            raise

    def _prefill(self, group):
        """One forward of the prompts of `group` (rows feeding the same number of tokens)."""
        fed = [row.prompt[row.reused:] for row in group]
        last_only = not group[0].prompt_logprobs  # a scoring row is alone in its group
        logits = self.model.forward(np.asarray(fed, dtype=np.int64), cache=self.cache.select([r.slot for r in group]),
                                    last_only=last_only)  # [G, T or 1, V]
        for row, tokens, lg in zip(group, fed, logits):
            self.held[row.slot].extend(tokens)  # after forward returned: an interrupted one left the cache as it was
            if row.prompt_logprobs:
                row.prompt_scores = [(None, [])] + [
                    self._scores(lp, t, row.logprobs or 0)
                    for lp, t in zip(map(log_softmax, lg[:-1]), row.prompt[1:])]
            row.logits = lg[-1]

    def _pick_slot(self, row):
        """-> (slot, prompt tokens already in its cache). A reusing row takes the free slot
        that holds the longest prefix of its prompt; otherwise an empty slot, or the one
        least recently used, so that warm slots stay warm for as long as possible."""
        busy = {r.slot for r in self.rows}
        free = [s for s in range(self.max_batch) if s not in busy]
        if row.reuse and not row.prompt_logprobs:
            limit = len(row.prompt) - 1  # feed at least one token, to get the next token's logits
            best, best_n = None, 0
            for s in free:
                n = common_prefix(self.held[s], row.prompt, limit)
                if n > best_n:
                    best, best_n = s, n
            if best is not None:
                return best, best_n
        empty = [s for s in free if not self.held[s]]
        return (empty[0] if empty else min(free, key=self.used.__getitem__)), 0

    def sample(self, rows=None):
        """Draw the next token of every row (or of `rows`) not drawn since the last feed ->
        [(row, token)]; a row that has its `length` tokens is then done (leave() it, as any
        row the caller ends). A new row may be sampled alone right after add(): its first
        token is known before the next forward."""
        out = []
        for row in self.rows if rows is None else rows:
            if row.logits is None:  # drawn already: waiting for feed()
                continue
            token = sample_row(row.logits, row.rng, row.temperature, row.top_k, row.top_p, self.work)
            if row.logprobs is not None:
                lp, top = self._scores(log_softmax(row.logits), token, row.logprobs)
                row.token_logprobs.append(lp)
                row.top.append(top)
            row.logits = None
            row.tokens.append(token)
            out.append((row, token))
        return out

    @staticmethod
    def _scores(logp, token, k):
        return float(logp[token]), top_logprobs(logp, k)

    def leave(self, row):
        """Take row out of the batch at once; its slot is free (and keeps its tokens for reuse)."""
        self.rows.remove(row)
        row.logits = None

    def feed(self):
        """One forward pass: every drawn row's last token, each row at its own position."""
        rows = [r for r in self.rows if r.logits is None]
        if not rows:
            return
        slots = [r.slot for r in rows]
        tokens = np.asarray([[r.tokens[-1]] for r in rows], dtype=np.int64)  # [B, 1]
        logits = self.model.forward(tokens, cache=self.cache.select(slots))[:, -1]  # [B, 1] -> [B, V]
        for row, lg in zip(rows, logits):
            self.held[row.slot].append(row.tokens[-1])
            row.logits = lg

    def clear(self):
        """Forget every slot's cached tokens (rows being decoded keep theirs)."""
        busy = {r.slot for r in self.rows}
        for s in range(self.max_batch):
            if s not in busy:
                self.held[s] = []


def common_prefix(a, b, limit):
    """How many leading tokens the sequences a and b share, at most limit."""
    n = 0
    while n < limit and n < len(a) and a[n] == b[n]:
        n += 1
    return n


def decode(model, rows, max_batch=8):
    """Decode an iterable of Rows max_batch at a time, yielding (row, token) as they come.

    A new row joins as soon as a slot is free; a row leaves when it has its length, or at
    once when the consumer sets `row.stop = True` after a token (e.g. a stop string)."""
    decoder = BatchDecoder(model, max_batch)
    pending = iter(rows)
    more = True
    while True:
        while more and not decoder.full:
            row = next(pending, None)
            if row is None:
                more = False
            else:
                decoder.add(row)
        if not decoder.rows:
            return
        for row, token in decoder.sample():
            yield row, token
        for row in list(decoder.rows):
            if row.finished or getattr(row, "stop", False):
                decoder.leave(row)
        decoder.feed()


def generate_batch(model, prompts, length, temperature=1.0, top_k=0, top_p=1.0, seed=None, max_batch=8):
    """Continue each prompt (a list of ids; prompts may differ in length) by `length` new
    tokens, up to max_batch prompts decoded together -> a list of the new ids per prompt.

    Prompt i draws from row_rng(seed, i): prompt 0 gets the text `generate` gives it with
    the same seed, and a prompt's text does not depend on the others or on max_batch.
    """
    check_sampling_args(temperature, top_k, top_p)
    check_seed(seed)
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise Npgpt2Error("prompts: give at least one prompt")
    n_ctx, V = model.hparams["n_ctx"], model.hparams["n_vocab"]
    prompts = [fit_prompt(p, length, n_ctx) for p in prompts]
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise Npgpt2Error(f"prompts[{i}]: token id {bad[0]} is outside the model's vocabulary (n_vocab={V})")
    check_batch_memory(model.hparams, min(max_batch, len(prompts)), max(map(len, prompts)), length,
                       model.dtype, name="max_batch")
    rows = [Row(p, length, temperature, top_k, top_p, row_rng(seed, i)) for i, p in enumerate(prompts)]
    for _ in decode(model, rows, min(max_batch, len(rows))):
        pass
    return [r.tokens for r in rows]
