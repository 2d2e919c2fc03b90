"""Sampling: temperature, top-k, top-p (nucleus); token generation with a KV cache; and
turning a token stream into text that stops at a given string."""
import codecs
import logging
import math

import numpy as np

from .errors import Npgpt2Error
from .memory import check_memory, generation_bytes

log = logging.getLogger(__name__)


def sample_logits(logits, rng, temperature=1.0, top_k=0, top_p=1.0):
    """Draw one token id per row. logits: (B, V) -> int64 (B,).

    temperature 0 is greedy, and so is any temperature so small that logit / temperature
    overflows float64 (its limit); top_k 0 and top_p 1.0 mean no restriction (OpenAI's
    conventions). Work in float64 so the draw does not depend on the model's dtype.
    The survivors are walked most likely first (ties by id) when there is a cut, else by id.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    out = np.empty(logits.shape[0], dtype=np.int64)
    # a tiny temperature overflows logit / temperature (the rows below then take the greedy
    # limit), or leaves the scaled logits finite but not their spread: row - max then overflows
    # to -inf, whose exp is 0, the greedy limit that temperature tends to
    with np.errstate(over="ignore"):
        scaled = logits / temperature
        for b, row in enumerate(scaled):
            if not (np.isfinite(row.max()) and np.isfinite(row.min())):  # (NaN propagates through both)
                # a temperature so small that logit / temperature overflows: the limit is greedy
                out[b] = logits[b].argmax()
                continue
            if top_k == 0 and top_p < 1.0:
                ids, probs = nucleus_head(row, top_p)  # most likely first, ties broken by id
            elif top_k:
                if top_k < row.shape[0]:
                    ids = np.argpartition(-row, top_k - 1)[:top_k]
                    ids = ids[np.lexsort((ids, -row[ids]))]  # most likely first, ties broken by id
                else:
                    ids = np.argsort(-row, kind="stable")  # stable: ties by id
                probs = np.exp(row[ids] - row[ids[0]])
                probs /= probs.sum()
            else:
                # without a cut the order does not matter: no sort, no copy of the 50257 logits
                ids = None
                probs = row - row.max()
                np.exp(probs, out=probs)  # unnormalised: draw() scales by the total
            if top_p < 1.0:
                # keep the smallest head whose mass reaches top_p (always at least one token)
                keep = nucleus_size(probs, top_p)
                ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
            i = draw(probs, rng.random())
            out[b] = i if ids is None else ids[i]
    return out


def sample_row(logits, rng, temperature=1.0, top_k=0, top_p=1.0, work=None):
    """One row's token id: sample_logits(logits[None], rng, ...)[0], the same draw to the bit,
    for batched decoding, which samples every row of every step. logits: (V,) float32 or
    float64; work: an optional float64 (V,) buffer to reuse.

    Without a cut (top_k 0, top_p 1) it skips what a token does not need: no float64 copy
    before the max (the max of float32 values converted is the max converted; dividing by
    a positive temperature keeps the order, so the scaled max is the max scaled), no division
    at temperature 1 (x / 1.0 is x), and the float64 conversion, scaling and shift are one
    pass into `work` instead of three new arrays. Each element gets the float64 operations
    sample_logits does on it, in the same order, so the weights and the draw are the same.
    """
    if temperature == 0 or top_k or top_p < 1.0:
        return int(sample_logits(logits[None], rng, temperature, top_k, top_p)[0])
    hi, lo = np.float64(logits.max()), np.float64(logits.min())
    with np.errstate(over="ignore"):
        top, low = hi / temperature, lo / temperature
    if not (np.isfinite(top) and np.isfinite(low)):  # overflow (or NaN): sample_logits's greedy limit
        return int(np.asarray(logits, dtype=np.float64).argmax())
    w = np.empty(logits.shape[0]) if work is None else work
    with np.errstate(over="ignore"):  # -inf for a spread that overflows, as in sample_logits
        if temperature == 1.0:
            np.subtract(logits, top, out=w, dtype=np.float64)
        else:
            np.divide(logits, temperature, out=w, dtype=np.float64)
            w -= top
    np.exp(w, out=w)  # unnormalised: draw() scales by the total
    return draw(w, rng.random())


DRAW_BLOCK = 1024


def draw(weights, u):
    """weights: (n,) >= 0, not all 0; u in [0, 1) -> the index i whose interval of the
    cumulative sum holds u * total: i with probability weights[i] / total.

    A cumulative sum is one long chain of dependent additions (~0.5 ms for 50257 float64),
    so it is taken blockwise: the sums of DRAW_BLOCK-long blocks (vectorised), their running
    total to find the block, then the running sum inside that block only.
    """
    n = weights.shape[0]
    if n <= 4 * DRAW_BLOCK:
        cdf = np.cumsum(weights)
        return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), n - 1)
    full = n // DRAW_BLOCK * DRAW_BLOCK
    sums = np.empty(full // DRAW_BLOCK + 1)
    weights[:full].reshape(-1, DRAW_BLOCK).sum(axis=1, out=sums[:-1])
    sums[-1] = weights[full:].sum()
    ends = np.cumsum(sums)  # the cumulative sum at each block's end
    target = u * ends[-1]
    blk = min(int(np.searchsorted(ends, target, side="right")), len(sums) - 1)
    start = blk * DRAW_BLOCK
    inner = np.cumsum(weights[start:start + DRAW_BLOCK])
    if blk:
        inner += ends[blk - 1]
    return start + min(int(np.searchsorted(inner, target, side="right")), len(inner) - 1)


def nucleus_head(row, top_p):
    """row: (V,) finite scaled logits, 0 < top_p < 1 -> (ids, probs): the most likely ids,
    ties broken by id, and their probabilities under the softmax of the whole row; enough
    of them that nucleus_size(probs, top_p) falls inside (possibly all V).

    Sorting all 50257 logits per token costs ~20 ms; a nucleus is usually far smaller, so
    the candidates are the n most likely (np.argpartition), n growing 8x until their mass
    reaches top_p before the smallest candidate logit: the ids tied with that one may be an
    arbitrary subset of the ties, so the nucleus must close before them. Up to there the
    head is the full order's.
    """
    V = row.shape[0]
    top = row.max()
    total = np.exp(row - top).sum()
    # n tokens hold at most n / total of the mass (the most likely has exp(0) = 1): fewer
    # than top_p * total cannot hold the nucleus (a flat distribution goes to the full sort)
    n = max(256, int(top_p * total) + 1)
    while n < V:
        ids = np.argpartition(-row, n - 1)[:n]
        ids = ids[np.lexsort((ids, -row[ids]))]
        probs = np.exp(row[ids] - top) / total
        first_tied = int(np.searchsorted(-row[ids], -row[ids[-1]], side="left"))
        if first_tied > 0 and nucleus_size(probs[:first_tied], top_p) <= first_tied:
            return ids, probs
        n *= 8
    ids = np.argsort(-row, kind="stable")  # the full order; stable: ties by id
    return ids, np.exp(row[ids] - top) / total


def nucleus_size(probs, top_p):
    """probs: (n,) sorted most likely first -> how many to keep for top_p: the smallest head
    whose mass reaches top_p (always at least one)."""
    return int(np.searchsorted(np.cumsum(probs), top_p) + 1)


def top_p_filter(logits, top_p):
    """logits: (V,) -> a float64 copy with -inf outside the nucleus, the tokens sample_logits
    keeps for top_p at temperature 1 and top_k 0: the most likely tokens (ties broken by id)
    whose probabilities first reach top_p in total. 0 < top_p < 1."""
    logits = np.asarray(logits, dtype=np.float64)                 # (V,)
    order = np.lexsort((np.arange(logits.size), -logits))         # most likely first, ties by id
    probs = np.exp(logits[order] - logits[order[0]])              # (V,) softmax, in that order
    probs /= probs.sum()
    keep = order[:nucleus_size(probs, top_p)]
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def check_temperature(temperature, name="--temperature"):
    """Raise Npgpt2Error naming `name` unless temperature is a finite number >= 0.

    0 is greedy. Any positive temperature is accepted: one so small that logit / temperature
    overflows samples greedily (see sample_logits), never NaN probabilities.
    """
    try:
        ok = 0 <= temperature < math.inf
    except TypeError:
        ok = False
    if not ok or isinstance(temperature, bool):
        raise Npgpt2Error(f"{name} must be a finite number >= 0 (0 = greedy), got {temperature!r}")


def check_seed(seed, name="--seed"):
    """Raise Npgpt2Error naming `name` unless seed is None or an integer >= 0 (what
    np.random.default_rng accepts)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise Npgpt2Error(f"{name} must be an integer >= 0, got {seed!r}")


def check_batch_memory(hparams, batch_size, prompt_len=1, length=None, dtype=np.float32, name="--batch_size"):
    """Refuse (Npgpt2Error with the figure) a batch of generated rows that cannot fit in memory."""
    check_memory(generation_bytes(hparams, batch_size, prompt_len, length, dtype),
                 f"{name} {batch_size} (generating that many samples at once)",
                 f"use a smaller {name}")


def check_sampling_args(temperature=1.0, top_k=0, top_p=1.0):
    """Raise Npgpt2Error naming the flag when a sampling setting is out of range."""
    check_temperature(temperature)
    if int(top_k) != top_k or top_k < 0:
        raise Npgpt2Error(f"--top_k must be an integer >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise Npgpt2Error(f"--top_p must be in (0, 1], got {top_p}")


def check_length(length, n_ctx):
    """Raise the one-line error unless 1 <= --length < n_ctx (room for at least one prompt token)."""
    if not 1 <= length < n_ctx:
        raise Npgpt2Error(f"--length must be between 1 and n_ctx - 1 = {n_ctx - 1}, got {length}")


def fit_prompt(prompt_tokens, length, n_ctx):
    """Left-trim the prompt so prompt + length fits the context; returns the tokens kept."""
    check_length(length, n_ctx)
    prompt_tokens = list(prompt_tokens)
    if not prompt_tokens:
        raise Npgpt2Error("the prompt is empty (give at least one token)")
    room = n_ctx - length
    if len(prompt_tokens) > room:
        log.warning("prompt of %d tokens does not fit n_ctx=%d with --length %d: keeping its last %d tokens",
                    len(prompt_tokens), n_ctx, length, room)
        prompt_tokens = prompt_tokens[-room:]
    return prompt_tokens


def generate_stream(model, prompt_tokens, length, temperature=1.0, top_k=0, top_p=1.0,
                    seed=None, batch_size=1, rng=None):
    """Yield `length` steps of new tokens, each an int64 array (batch_size,).

    Every row continues the same prompt with its own draws. The prompt is prefilled in one
    forward pass (logits only for its last position); each later step feeds one token
    through the KV cache. Pass rng to continue a random stream; else seed makes one.
    """
    check_sampling_args(temperature, top_k, top_p)
    if rng is None:
        check_seed(seed)
    prompt_tokens = fit_prompt(prompt_tokens, length, model.hparams["n_ctx"])
    bad = [t for t in prompt_tokens if not 0 <= t < model.hparams["n_vocab"]]
    if bad:
        raise Npgpt2Error(f"prompt token id {bad[0]} is outside the model's vocabulary "
                          f"(n_vocab={model.hparams['n_vocab']})")
    check_batch_memory(model.hparams, batch_size, len(prompt_tokens), length, model.dtype)
    rng = rng if rng is not None else np.random.default_rng(seed)
    cache = model.new_cache(batch_size)
    context = np.tile(np.asarray(prompt_tokens, dtype=np.int64), (batch_size, 1))
    logits = model.forward(context, cache=cache, last_only=True)[:, -1]
    for step in range(length):
        tokens = sample_logits(logits, rng, temperature, top_k, top_p)
        yield tokens
        if step + 1 < length:
            logits = model.forward(tokens[:, None], cache=cache)[:, -1]


def generate(model, prompt_tokens, length, temperature=1.0, top_k=0, top_p=1.0, seed=None):
    """Continue prompt_tokens (list of ids) by `length` new tokens -> list of the new ids."""
    return [int(t[0]) for t in generate_stream(model, prompt_tokens, length, temperature,
                                               top_k, top_p, seed)]


class TextStream:
    """Turns tokens into text as they arrive, stopping at the first of `stops`.

    push() returns (text that is now safe to show, stopped). Text is held back while it
    could still be the start of a stop string or of a multi-byte UTF-8 character, so what
    is shown never has to be taken back.
    """

    def __init__(self, tokenizer, stops=()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.shown = 0
        self.stopped = False

    def push(self, token):
        if self.stopped:
            return "", True
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([int(token)]))
        return self._emit(final=False)

    def finish(self):
        """Flush what is held back; returns the remaining text."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(b"", final=True)
        return self._emit(final=True)[0]

    def _emit(self, final):
        # a stop string can only begin in the part not shown yet or in the held-back tail
        start = max(0, self.shown - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(self.text) if final else max(self.shown, len(self.text) - self.hold)
        out = self.text[self.shown:end]
        self.shown = end
        return out, self.stopped

    @property
    def shown_text(self):
        return self.text[:self.shown]
