""""Break it" tasks: the learner copies a package function, makes one given mistake in it, runs
it, and names what goes wrong. The answer file holds the broken function (under the package
function's name) and `SYMPTOM = "<letter>"`, one of the task's choices. The check first runs the
function against the broken reference below (so the mistake made is the one asked for), then
compares the letter. The right letters are in this file: reading it first spoils the task.
"""
import math

import numpy as np

from .. import layers
from .grading import REF_TOL, LearnerError, call, first_failure, mismatch, run_cases, unpack


# ---------------------------------------------------------------- the broken references
def layernorm_backward_no_mean(dout, inp, weight, mean, rstd):
    """layernorm_backward without `- dnorm.mean(axis=-1, keepdims=True)`."""
    C = inp.shape[-1]
    norm = (inp - mean[..., None]) * rstd[..., None]              # (..., C)
    dnorm = dout * weight
    dinp = (dnorm - norm * (dnorm * norm).mean(axis=-1, keepdims=True)) * rstd[..., None]
    return dinp, (dout * norm).reshape(-1, C).sum(axis=0), dout.reshape(-1, C).sum(axis=0)


def embedding_backward_plus_equals(dout, inp, V, maxT):
    """embedding_backward with `dwte[inp] += dout` for np.add.at: a repeated index is written once."""
    B, T, C = dout.shape
    dwte = np.zeros((V, C))
    dwte[inp.reshape(-1)] += dout.reshape(-1, C)                  # buffered: duplicates do not add up
    dwpe = np.zeros((maxT, C))
    dwpe[:T] = dout.sum(axis=0)
    return dwte, dwpe


def attention_forward_sees_next(qkv, NH):
    """attention_forward with the mask np.triu(..., k=2): position t also sees t + 1."""
    C = qkv.shape[-1] // 3
    q, k, v = (layers.split_heads(x, NH) for x in np.split(qkv, 3, axis=-1))   # 3 x (B, NH, T, hs)
    T = q.shape[2]
    scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(C // NH)               # (B, NH, T, T)
    scores = np.where(np.triu(np.ones((T, T), dtype=bool), k=2), -np.inf, scores)
    att = layers.softmax(scores)
    return layers.merge_heads(att @ v), att


# ---------------------------------------------------------------- running the learner's break
def _layernorm_cases(fn, seed):
    def one(i, shape):
        rng = np.random.default_rng([seed, i])
        inp, dout = rng.standard_normal(shape) + 1.0, rng.standard_normal(shape)
        weight, bias = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
        _, mean, rstd = layers.layernorm_forward(inp, weight, bias)
        got = unpack(call(fn, dout, inp, weight, mean, rstd), 3, ("dinp", "dweight", "dbias"))
        want = layernorm_backward_no_mean(dout, inp, weight, mean, rstd)
        return first_failure([mismatch(n, g, w, REF_TOL, "layernorm_backward with the mean term dropped")
                              for n, g, w in zip(("dinp", "dweight", "dbias"), got, want)])
    return [(f"case {i + 1} (inp {s})", lambda i=i, s=s: one(i, s)) for i, s in enumerate([(2, 3, 4), (1, 5, 8)])]


def _embedding_cases(fn, seed):
    def one(i, B, T, C, V):
        rng = np.random.default_rng([seed, i])
        inp = rng.integers(0, V, size=(B, T))                     # few ids: some repeat
        dout = rng.standard_normal((B, T, C))
        got = unpack(call(fn, dout, inp, V, T + 2), 2, ("dwte", "dwpe"))
        want = embedding_backward_plus_equals(dout, inp, V, T + 2)
        return first_failure([mismatch(n, g, w, REF_TOL, "embedding_backward with += for np.add.at")
                              for n, g, w in zip(("dwte", "dwpe"), got, want)])
    return [(f"case {i + 1} (B={c[0]} T={c[1]} C={c[2]} V={c[3]})", lambda i=i, c=c: one(i, *c))
            for i, c in enumerate([(2, 6, 3, 4), (1, 8, 2, 5)])]


def _attention_cases(fn, seed):
    def one(i, B, T, NH, hs):
        rng = np.random.default_rng([seed, i])
        qkv = rng.standard_normal((B, T, 3 * NH * hs))
        got = unpack(call(fn, qkv, NH), 2, ("out", "att"))
        want = attention_forward_sees_next(qkv, NH)
        return first_failure([mismatch(n, g, w, REF_TOL, "attention_forward with the mask one place late")
                              for n, g, w in zip(("out", "att"), got, want)])
    return [(f"case {i + 1} (B={c[0]} T={c[1]} NH={c[2]} hs={c[3]})", lambda i=i, c=c: one(i, *c))
            for i, c in enumerate([(1, 5, 2, 3), (2, 4, 1, 2)])]


BREAKS = {
    "break_layernorm_mean": dict(function="layernorm_backward", cases=_layernorm_cases, answer="B",
                                 experiment="compare your dinp with finite differences "
                                            "(npgpt2 exercise check layernorm_backward FILE does) and look at "
                                            "dinp minus the right one along a row",
                                 why="d mean / d x_i = 1/C for every i, so the dropped term is the same "
                                     "number at every channel of a row; the right dinp sums to 0 over a row "
                                     "(shifting a row's input leaves the output unchanged)"),
    "break_embedding_add_at": dict(function="embedding_backward", cases=_embedding_cases, answer="C",
                                 experiment="use an input where a token occurs twice and one where every "
                                            "token is different, and compare dwte with finite differences",
                                 why="a[idx] += b reads a[idx] once, adds, and writes back, so a repeated "
                                     "index gets one of its contributions; np.add.at adds them all"),
    "break_attention_mask": dict(function="attention_forward", cases=_attention_cases, answer="B",
                                 experiment="change qkv at position t + 1 only and see which rows of out move",
                                 why="with k=2 the mask hides t+2.. only: position t reads the token it is "
                                     "trained to predict, so training can copy it (loss near 0) and "
                                     "generation, which has no future token, gets no better"),
}


def grade_break(name, module, seed=0):
    """Run the answer's broken function against the broken reference, then its SYMPTOM."""
    task = BREAKS[name]
    fn = getattr(module, task["function"])
    cases = run_cases([(label, check) for label, check in task["cases"](fn, seed)])
    symptom = getattr(module, "SYMPTOM", None)

    def check_symptom():
        if not isinstance(symptom, str) or symptom.strip().upper() not in "ABCD" or not symptom.strip():
            raise LearnerError(f'the file needs SYMPTOM = "A", "B", "C" or "D" (got {symptom!r})')
        if symptom.strip().upper() != task["answer"]:
            raise LearnerError(f"SYMPTOM {symptom!r} is not what this mistake does; to see it, "
                               f"{task['experiment']}")
        return f"right: {task['why']}"
    return cases + run_cases([("symptom", check_symptom)])
