"""Checkers for the backward passes a learner writes: each is tried on seeded shapes (edge
cases first), against central finite differences of the forward in layers.py (an independent
reference: it needs only the forward) and against the package's own backward (same math,
float64: only roundoff may differ). L = sum(dout * forward(x)) makes dout the upstream gradient.
"""
import numpy as np

from .. import layers
from .grading import REF_TOL, call, fd_mismatch, first_failure, mismatch, run_cases, shapes, unpack


def _dot(dout, y):
    return float((dout * y).sum())


def grade_layernorm(fn, seed=0):
    """layernorm_backward(dout, inp, weight, mean, rstd) -> (dinp, dweight, dbias)."""
    names = ("dinp", "dweight", "dbias")

    def one(i, shape):
        rng = np.random.default_rng([seed, i])
        C = shape[-1]
        inp = rng.standard_normal(shape) * 2.0 + 0.5               # (B, T, C) off-centre, not unit scale
        weight, bias = rng.standard_normal(C), rng.standard_normal(C)
        dout = rng.standard_normal(shape)
        _, mean, rstd = layers.layernorm_forward(inp, weight, bias)
        got = unpack(call(fn, dout, inp, weight, mean, rstd), 3, names)
        want = layers.layernorm_backward(dout, inp, weight, mean, rstd)
        loss = lambda: _dot(dout, layers.layernorm_forward(inp, weight, bias)[0])  # noqa: E731
        errors = [fd_mismatch(n, g, loss, x, rng) for n, g, x in zip(names, got, (inp, weight, bias))]
        errors += [mismatch(n, g, w, REF_TOL, "layers.layernorm_backward") for n, g, w in zip(names, got, want)]
        return first_failure(errors)

    cases = shapes(seed, [(1, 1, 2), (2, 3, 4), (1, 4, 16)],
                   lambda r: (int(r.integers(1, 4)), int(r.integers(1, 6)), int(r.integers(2, 17))))
    return run_cases([(f"case {i + 1} (inp {s})", lambda i=i, s=s: one(i, s)) for i, s in enumerate(cases)])


def grade_gelu(fn, seed=0):
    """gelu_backward(dout, inp) -> dinp."""
    def one(i, shape):
        rng = np.random.default_rng([seed, i])
        inp = rng.standard_normal(shape) * 3.0                     # the tails matter too
        dout = rng.standard_normal(shape)
        got = call(fn, dout, inp)
        loss = lambda: _dot(dout, layers.gelu_forward(inp))  # noqa: E731
        return first_failure([fd_mismatch("dinp", got, loss, inp, rng),
                              mismatch("dinp", got, layers.gelu_backward(dout, inp), REF_TOL,
                                       "layers.gelu_backward")])

    cases = shapes(seed, [(1,), (3, 4), (2, 3, 5)],
                   lambda r: tuple(int(v) for v in r.integers(1, 6, size=int(r.integers(1, 4)))))
    return run_cases([(f"case {i + 1} (inp {s})", lambda i=i, s=s: one(i, s)) for i, s in enumerate(cases)])


def grade_attention(fn, seed=0):
    """attention_backward(dout, qkv, att, NH) -> dqkv."""
    def one(i, B, T, NH, hs):
        rng = np.random.default_rng([seed, i])
        C = NH * hs
        qkv = rng.standard_normal((B, T, 3 * C))                   # (B, T, 3C)
        out, att = layers.attention_forward(qkv, NH)               # (B, T, C), (B, NH, T, T)
        dout = rng.standard_normal(out.shape)
        got = call(fn, dout, qkv, att, NH)
        loss = lambda: _dot(dout, layers.attention_forward(qkv, NH)[0])  # noqa: E731
        return first_failure([fd_mismatch("dqkv", got, loss, qkv, rng),
                              mismatch("dqkv", got, layers.attention_backward(dout, qkv, att, NH), REF_TOL,
                                       "layers.attention_backward")])

    cases = shapes(seed, [(1, 1, 1, 2), (1, 4, 2, 3), (2, 5, 4, 2)],
                   lambda r: tuple(int(v) for v in (r.integers(1, 3), r.integers(1, 7), r.integers(1, 4),
                                                    r.integers(1, 5))))
    return run_cases([(f"case {i + 1} (B={B} T={T} NH={NH} hs={hs})", lambda i=i, c=c: one(i, *c))
                      for i, c in enumerate(cases) for B, T, NH, hs in [c]])


def grade_crossentropy(fn, seed=0):
    """crossentropy_softmax_backward(dlosses, probs, targets) -> dlogits."""
    def one(i, B, T, V):
        rng = np.random.default_rng([seed, i])
        logits = rng.standard_normal((B, T, V)) * 3.0              # (B, T, V)
        targets = rng.integers(0, V, size=(B, T))                  # (B, T)
        dlosses = rng.standard_normal((B, T))                      # (B, T) upstream, not all 1/(B T)
        _, probs = layers.crossentropy_forward(logits.copy(), targets)
        got = call(fn, dlosses, probs, targets)
        loss = lambda: _dot(dlosses, layers.crossentropy_forward(logits, targets)[0])  # noqa: E731
        return first_failure([fd_mismatch("dlogits", got, loss, logits, rng),
                              mismatch("dlogits", got, layers.crossentropy_softmax_backward(dlosses, probs, targets),
                                       REF_TOL, "layers.crossentropy_softmax_backward")])

    cases = shapes(seed, [(1, 1, 2), (2, 3, 5), (1, 4, 30)],
                   lambda r: (int(r.integers(1, 3)), int(r.integers(1, 5)), int(r.integers(2, 40))))
    return run_cases([(f"case {i + 1} (B={B} T={T} V={V})", lambda i=i, c=c: one(i, *c))
                      for i, c in enumerate(cases) for B, T, V in [c]])
