"""Checkers for the exercises that are not backward passes: an AdamW step, one BPE merge
round, top-p filtering and the induction score. Each is compared with the package's own
function on seeded inputs (edge cases first), and where a definition can be checked
directly (top-p's mass), with that too.
"""
import numpy as np

from .. import optim
from ..interp import induction_score
from ..sampling import top_p_filter
from ..tokenizer import bpe_merge_round, bytes_to_unicode, load_tokenizer
from .grading import REF_TOL, LearnerError, call, first_failure, mismatch, run_cases, unpack


# ---------------------------------------------------------------- AdamW
def grade_adamw(fn, seed=0):
    """adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step): in place on p, m, v."""
    settings = [dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0),
                dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
                dict(lr=0.1, beta1=0.5, beta2=0.9, eps=1e-3, weight_decay=0.5)]

    def one(i, shape, hp):
        rng = np.random.default_rng([seed, i])
        p = rng.standard_normal(shape)
        mine = {"p": p.copy(), "m": np.zeros(shape), "v": np.zeros(shape)}
        ref = {k: a.copy() for k, a in mine.items()}
        errors = []
        for step in (1, 2, 3):  # bias correction matters most in the first steps
            g = rng.standard_normal(shape)
            before = mine["p"].copy()
            call(fn, mine["p"], g.copy(), mine["m"], mine["v"], hp["lr"], hp["beta1"], hp["beta2"], hp["eps"],
                 hp["weight_decay"], step, copy=False)  # in place: p, m, v are the learner's to change
            if np.array_equal(before, mine["p"]):
                raise LearnerError(f"step {step}: p did not change: adamw_update must update p, m and v "
                                   f"in place (p -= ..., m *= ..., not p = ...) and returns nothing")
            optim.adamw_update(ref["p"], g, ref["m"], ref["v"], hp["lr"], hp["beta1"], hp["beta2"], hp["eps"],
                               hp["weight_decay"], step)
            errors += [mismatch(f"{k} after step {step}", mine[k], ref[k], REF_TOL, "optim.adamw_update")
                       for k in ("m", "v", "p")]
            first_failure(errors)
        return first_failure(errors)

    cases = [((3,), settings[0]), ((2, 4), settings[1]), ((5,), settings[2]), ((1, 3, 2), settings[1])]
    return run_cases([(f"case {i + 1} (p {s}, " + ", ".join(f"{k}={v}" for k, v in hp.items()) + ")",
                       lambda i=i, s=s, hp=hp: one(i, s, hp)) for i, (s, hp) in enumerate(cases)])


# ---------------------------------------------------------------- one BPE merge round
TOY_MERGES = {("a", "b"): (0, "ab"), ("a", "a"): (1, "aa"), ("b", "c"): (2, "bc"), ("ab", "c"): (3, "abc"),
              ("c", "a"): (4, "ca")}
TOY_WORDS = [["a"], ["c", "a"], ["a", "b", "c"], ["b", "c", "a", "b"], ["a", "a", "a", "a", "a"],
             ["c", "c"], ["a", "b", "x", "a", "b"], ["c", "a", "a", "b"]]
REAL_WORDS = [" hello", " lower", " strawberry", "aaaaaaa", " tokenization", " 1234567", " naïve"]


def gpt2_string_merges():
    """GPT-2's merges with symbols as byte-level strings: {(a, b): (rank, a + b)}."""
    tok = load_tokenizer()
    name = tok._sym_str.get
    return {(name(a), name(b)): (rank, name(m)) for (a, b), (rank, m) in tok.merges.items()}


def grade_bpe(fn, seed=0):
    """bpe_merge_round(word, merges) -> (rank, (a, b), merged, at, new_word), or None."""
    byte_char = bytes_to_unicode()
    real = gpt2_string_merges()

    def rounds(word, merges):
        for r in range(len(word)):  # every round shortens the word; more is a loop that never ends
            want = bpe_merge_round(list(word), merges)
            got = call(fn, list(word), merges)
            if want is None:
                if got is not None:
                    raise LearnerError(f"round {r + 1} of {word}: no pair of it has a rank, so the answer is "
                                       f"None; yours is {got!r}")
                return f"{r} rounds"
            if got is None:
                raise LearnerError(f"round {r + 1} of {word}: returned None, but {want[1]} has rank {want[0]}")
            got = unpack(got, 5, ("rank", "pair", "merged", "at", "new_word"))
            for label, g, w in zip(("rank", "pair", "merged", "at", "new_word"), got, want):
                g = tuple(g) if label == "pair" else list(g) if label in ("at", "new_word") else g
                if g != (tuple(w) if label == "pair" else w):
                    raise LearnerError(f"round {r + 1} of {word}: {label} is {g!r}, expected {w!r} "
                                       f"(the lowest-ranked pair {want[1]}, merged at every occurrence, "
                                       f"left to right)")
            word = want[4]
        raise LearnerError(f"{word}: more rounds than symbols")

    cases = [(f"toy {w}", lambda w=w: rounds(w, TOY_MERGES)) for w in TOY_WORDS]
    cases += [(f"GPT-2 {t!r}", lambda t=t: rounds([byte_char[b] for b in t.encode("utf-8")], real))
              for t in REAL_WORDS]
    return run_cases(cases)


# ---------------------------------------------------------------- top-p
def grade_top_p(fn, seed=0):
    """top_p_filter(logits, top_p) -> logits with -inf outside the nucleus."""
    def one(logits, top_p):
        got = call(fn, logits, top_p)
        try:
            got = np.asarray(got, dtype=np.float64)
        except (TypeError, ValueError):
            raise LearnerError(f"returned a {type(got).__name__}, not an array of logits") from None
        if got.shape != logits.shape:
            raise LearnerError(f"returned shape {got.shape}, expected {logits.shape} (every token, -inf if cut)")
        if np.isnan(got).any() or np.isposinf(got).any():
            raise LearnerError("the filtered logits hold NaN or +inf: use -inf for the tokens left out")
        return _compare_nucleus(got, logits, top_p)

    rng = np.random.default_rng(seed)
    tied = np.array([2.0, 1.0, 1.0, 1.0, 0.0])                   # the cut falls inside a tie
    cases = [(np.array([3.0]), 0.5), (np.array([0.0, 5.0, 1.0]), 0.01), (tied, 0.5), (tied, 0.99),
             (np.log([0.5, 0.3, 0.2]), 0.8)]  # 0.5 + 0.3 is 0.8 up to rounding: either side is fine
    cases += [(rng.standard_normal(int(rng.integers(2, 60))) * 2.0, float(rng.uniform(0.05, 0.98)))
              for _ in range(5)]
    return run_cases([(f"case {i + 1} (V={lg.size}, top_p={p:.3g})", lambda lg=lg, p=p: one(lg, p))
                      for i, (lg, p) in enumerate(cases)])


def _compare_nucleus(got, logits, top_p):
    """The kept set (finite entries of got) must be the nucleus: equal to top_p_filter's, and
    by definition its mass reaches top_p while without its least likely token it does not."""
    want = top_p_filter(logits, top_p)
    kept, expect = np.flatnonzero(np.isfinite(got)), np.flatnonzero(np.isfinite(want))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if not np.array_equal(kept, expect):
        near = abs(probs[expect].sum() - top_p) < 1e-12 and kept.size == expect.size - 1
        if not near:  # a mass equal to top_p up to rounding may cut either way
            raise LearnerError(f"kept tokens {kept.tolist()} (mass {probs[kept].sum():.4f}), expected "
                               f"{expect.tolist()} (mass {probs[expect].sum():.4f}): the most likely tokens, "
                               f"ties by the smaller id, until their mass first reaches {top_p}")
    err, msg = mismatch("the kept logits", got[kept], logits[kept], 0.0, "the input logits")
    if msg:
        raise LearnerError(msg + " (the kept tokens keep their logits unchanged)")
    return f"kept {kept.size} of {logits.size} tokens"


# ---------------------------------------------------------------- induction score
def grade_induction(fn, seed=0):
    """induction_score(pattern, period) -> (NH,)."""
    def one(i, B, NH, period, T):
        rng = np.random.default_rng([seed, i])
        raw = rng.random((B, NH, T, T)) ** 4 * np.tril(np.ones((T, T)))   # causal, uneven rows
        pattern = raw / raw.sum(axis=-1, keepdims=True)                    # (B, NH, T, T), rows sum to 1
        got = call(fn, pattern, period)
        err, msg = mismatch("the result", got, induction_score(pattern, period), REF_TOL, "interp.induction_score")
        return first_failure([(err, msg)])

    cases = [(1, 1, 1, 2), (1, 2, 3, 6), (2, 4, 5, 10), (3, 2, 4, 7), (1, 3, 8, 16)]
    return run_cases([(f"case {i + 1} (B={B} NH={NH} period={p} T={T})", lambda i=i, c=c: one(i, *c))
                      for i, c in enumerate(cases) for B, NH, p, T in [c]])
