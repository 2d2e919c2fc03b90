"""Each fast kernel (npgpt2.kernels) against its plain NumPy twin, on GPT-2 124M shapes.

    python benchmarks/kernels.py [--reps 5] [--json out.json]

float32, the machine's threads; for each kernel the two versions take turns, and the
median of `reps` calls after a warm-up is reported with the speedup. The AdamW twin is
npgpt2.optim.adamw_update (with its scratch buffer), the kernel npgpt2.kernels.adamw_update.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from npgpt2 import (
    kernels,  # noqa: E402
    layers,  # noqa: E402
    optim,  # noqa: E402
)

C, NH, V = 768, 12, 50257


def cases():
    """[(name, shape note, plain call, fast call)]; each call takes no arguments."""
    rng = np.random.default_rng(0)
    f32 = np.float32

    def r(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(f32)

    out = []
    g, b = r(C) + 1, r(C)
    for B, T in ((1, 1024), (4, 64), (1, 1)):
        x = r(B, T, C)
        _, mean, rstd = layers.layernorm_forward(x, g, b)
        d = r(B, T, C)
        out.append(("layernorm_forward", f"({B},{T},{C})", lambda x=x: layers.layernorm_forward(x, g, b),
                    lambda x=x: kernels.layernorm_forward(x, g, b)))
        if T > 1:
            out.append(("layernorm_backward", f"({B},{T},{C})",
                        lambda x=x, d=d, m=mean, s=rstd: layers.layernorm_backward(d, x, g, m, s),
                        lambda x=x, d=d, m=mean, s=rstd: kernels.layernorm_backward(d, x, g, m, s)))
    for B, T in ((1, 1024), (4, 64), (1, 1)):
        h, d = r(B, T, 4 * C), r(B, T, 4 * C)
        out.append(("gelu_forward", f"({B},{T},{4 * C})", lambda h=h: layers.gelu_forward(h), lambda h=h: kernels.gelu_forward(h)))
        if T > 1:
            out.append(("gelu_backward", f"({B},{T},{4 * C})", lambda h=h, d=d: layers.gelu_backward(d, h),
                        lambda h=h, d=d: kernels.gelu_backward(d, h)))
    x, w, bias = r(1, 1024, C), r(C, 4 * C, scale=0.02), r(4 * C)
    out.append(("matmul_forward", f"(1,1024,{C})@({C},{4 * C})", lambda: layers.matmul_forward(x, w, bias),
                lambda: kernels.matmul_forward(x, w, bias)))
    for B, T in ((1, 1024), (4, 64)):
        qkv, dy = r(B, T, 3 * C), r(B, T, C)
        _, att = layers.attention_forward(qkv, NH)
        out.append(("attention_forward", f"({B},{T},{3 * C}), NH={NH}", lambda q=qkv: layers.attention_forward(q, NH),
                    lambda q=qkv: kernels.attention_forward(q, NH)))
        _, saved = kernels.attention_forward(qkv, NH)  # the fused twin saves (out, lse), not att
        out.append(("attention_backward", f"({B},{T},{3 * C}), NH={NH}",
                    lambda q=qkv, a=att, d=dy: layers.attention_backward(d, q, a, NH),
                    lambda q=qkv, sv=saved, d=dy: kernels.attention_backward(d, q, sv, NH)))
    kc, vc = np.zeros((1, NH, 1024, C // NH), f32), np.zeros((1, NH, 1024, C // NH), f32)
    kc[:, :, :200], vc[:, :, :200] = r(1, NH, 200, C // NH), r(1, NH, 200, C // NH)
    q1, qT = r(1, 1, 3 * C), r(1, 1024, 3 * C)
    out.append(("attention_forward_cached", "prefill T=1024", lambda: layers.attention_forward_cached(qT, kc, vc, 0, NH),
                lambda: kernels.attention_forward_cached(qT, kc, vc, 0, NH)))
    out.append(("attention_forward_cached", "decode T=1 at pos 200",
                lambda: layers.attention_forward_cached(q1, kc, vc, 200, NH),
                lambda: kernels.attention_forward_cached(q1, kc, vc, 200, NH)))
    for B, T in ((4, 64), (1, 1024)):
        logits, targets = r(B, T, V, scale=2.0), rng.integers(0, V, (B, T))
        _, probs = layers.crossentropy_forward(logits, targets)
        dl = np.full((B, T), 1.0 / (B * T), f32)
        out.append(("crossentropy_forward", f"({B},{T},{V})", lambda lg=logits, t=targets: layers.crossentropy_forward(lg, t),
                    lambda lg=logits, t=targets: kernels.crossentropy_forward(lg, t)))
        out.append(("crossentropy_softmax_backward", f"({B},{T},{V})",
                    lambda p=probs, t=targets, d=dl: layers.crossentropy_softmax_backward(d, p, t),
                    lambda p=probs, t=targets, d=dl: kernels.crossentropy_softmax_backward(d, p, t)))
    inp, d = rng.integers(0, V, (4, 64)), r(4, 64, C)
    out.append(("embedding_backward", f"(4,64,{C}), V={V}", lambda: layers.embedding_backward(d, inp, V, 1024),
                lambda: kernels.embedding_backward(d, inp, V, 1024)))
    n = V * C  # the largest tensor of GPT-2 124M (wte)
    p, grad, m, v = r(n, scale=0.02), r(n, scale=1e-3), np.zeros(n, f32), np.zeros(n, f32)
    scratch = np.empty(n, f32)
    out.append(("adamw_update", f"({n},) = wte", lambda: optim.adamw_update(p, grad, m, v, 1e-4, 0.9, 0.999, 1e-8, 0.01, 3, scratch),
                lambda: kernels.adamw_update(p, grad, m, v, 1e-4, 0.9, 0.999, 1e-8, 0.01, 3)))
    return out


def bench(reps=5):
    rows = []
    for name, shape, plain, fast in cases():
        plain(), fast()  # warm-up (and JIT load)
        tp, tf = [], []
        for i in range(reps):
            for fn, acc in (((plain, tp), (fast, tf)) if i % 2 == 0 else ((fast, tf), (plain, tp))):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        p, f = statistics.median(tp), statistics.median(tf)
        rows.append({"kernel": name, "shape": shape, "plain_s": p, "fast_s": f, "speedup": p / f})
    return rows


def format_table(rows):
    lines = ["| kernel | shape (float32) | plain NumPy | npgpt2.kernels | speedup |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['plain_s'] * 1e3:.3f} ms | "
                     f"{r['fast_s'] * 1e3:.3f} ms | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    rows = bench(args.reps)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
