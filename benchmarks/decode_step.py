"""Where one batched decode step goes: BatchDecoder.sample + feed with 1 row against B rows.

    python benchmarks/decode_step.py [--rows 8] [--steps 20] [--prompt 32] [--dtype float32] [--clock cpu]

GPT-2 124M shapes with random weights; every row is prefilled with its own `prompt`-token
prompt, then `steps` steps are timed (after one untimed step). Each of the fast path's layer
calls (ops(): matmul_forward by weight shape, attention_forward_cached, layernorm_forward,
gelu_forward, embedding_forward) and the output head are wrapped with a timer in this process
only, so the table says how long each kind of call takes per step (all layers together), how
much more B rows cost than one, and its share of the B-row step. The serve targets of issue 20
need a B-row step of at most ~2x a 1-row step (see benchmarks/serve.py).

--clock cpu (default) times with this thread's CPU time (time.thread_time), which a busy
machine's other processes do not inflate (they do slow it through shared caches and memory);
it misses a second BLAS or Numba thread's work, so it is run with NPGPT2_THREADS=1 set here.
--clock wall times with time.perf_counter.
"""
import argparse
import collections
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if "--clock" not in sys.argv or "cpu" in sys.argv:  # one thread: its CPU time is all the work
    os.environ.setdefault("NPGPT2_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import npgpt2  # noqa: E402
from npgpt2 import model as model_mod  # noqa: E402
from npgpt2.batch_decode import BatchDecoder, Row  # noqa: E402
from npgpt2.model import MODEL_HPARAMS  # noqa: E402
from npgpt2.quant import quantize_params  # noqa: E402

CLOCK = {"cpu": time.thread_time, "wall": time.perf_counter}
clock = time.thread_time
TIMED = ("matmul_forward", "attention_forward_cached", "layernorm_forward", "gelu_forward", "embedding_forward")


def instrument(lay, spent):
    """Wrap lay's TIMED functions and GPT2._head so that each call adds its seconds to spent[name]."""
    def timed(name, fn, key=None):
        @functools.wraps(fn)
        def call(*a, **k):
            t0 = clock()
            out = fn(*a, **k)
            spent[key(*a) if key else name] += clock() - t0
            return out
        return call

    def shape_key(x, w, b):
        return f"matmul {w.shape[0]}x{w.shape[1]}"

    for name in TIMED:
        key = shape_key if name == "matmul_forward" else None
        setattr(lay, name, timed(name.replace("_forward", ""), getattr(lay, name), key))
    model_mod.GPT2._head = timed("head (x @ wte.T)", model_mod.GPT2._head)


def profile(model, rows, steps, prompt, spent):
    """Mean seconds per step of sample(), feed() and each timed call, over `steps` steps of
    `rows` rows (means, so that the parts add up to the step)."""
    rng = np.random.default_rng(0)
    dec = BatchDecoder(model, rows)
    for i in range(rows):
        dec.add(Row(rng.integers(0, 50000, prompt).tolist(), steps + 2, rng=np.random.default_rng(i)))
    dec.sample()
    dec.feed()  # untimed: first-touch pages of the cache rows
    spent.clear()
    samples, feeds = [], []
    for _ in range(steps):
        t0 = clock()
        dec.sample()
        t1 = clock()
        dec.feed()
        samples.append(t1 - t0)
        feeds.append(clock() - t1)
    return statistics.mean(samples), statistics.mean(feeds), {k: v / steps for k, v in spent.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64", "int8"),
                    help="int8: 8-bit weights (quant.py), whose GEMV reads each weight once for all rows")
    ap.add_argument("--clock", default="cpu", choices=tuple(CLOCK))
    args = ap.parse_args()
    global clock
    clock = CLOCK[args.clock]
    if args.dtype == "int8":
        model = npgpt2.init_model(MODEL_HPARAMS["124M"], seed=0)
        model.set_params(quantize_params(dict(model.params.items())))
    else:
        model = npgpt2.init_model(MODEL_HPARAMS["124M"], seed=0, dtype=np.dtype(args.dtype))
    spent = collections.defaultdict(float)
    instrument(model_mod.ops(), spent)
    profile(model, 1, 2, args.prompt, spent)  # warm-up: Numba's compiled kernels
    one = profile(model, 1, args.steps, args.prompt, spent)
    many = profile(model, args.rows, args.steps, args.prompt, spent)
    B = args.rows
    step1, stepB = one[0] + one[1], many[0] + many[1]
    print(f"one decode step, GPT-2 124M shapes (random weights, {args.dtype}), 1 row against {B} rows "
          f"({args.prompt}-token prompts, mean of {args.steps} steps, {args.clock} time)")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} logical cores)")
    print()
    print(f"| part | 1 row (ms) | {B} rows (ms) | {B} rows / 1 row | share of the {B}-row step |")
    print("|---|---|---|---|---|")
    rows = [("sample (per row: temperature, top-k/p, draw)", one[0], many[0])]
    names = sorted(set(one[2]) | set(many[2]), key=lambda k: -many[2].get(k, 0))
    rows += [(k, one[2].get(k, 0.0), many[2].get(k, 0.0)) for k in names]
    rest1 = one[1] - sum(one[2].values())
    restB = many[1] - sum(many[2].values())
    rows.append(("rest of feed (Python, residual adds, cache bookkeeping)", rest1, restB))
    rows.append(("whole step (sample + feed)", step1, stepB))
    for name, a, b in rows:
        print(f"| {name} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a if a else float('nan'):.2f}x | {b / stepB:.1%} |")
    gemm1 = sum(v for k, v in one[2].items() if k.startswith(("matmul", "head")))
    gemmB = sum(v for k, v in many[2].items() if k.startswith(("matmul", "head")))
    print()
    print(f"matrix products (matmul + head): {gemm1 * 1e3:.1f} ms of a 1-row step ({gemm1 / step1:.0%}), "
          f"{gemmB * 1e3:.1f} ms of a {B}-row step ({gemmB / stepB:.0%}); {B} rows per step give "
          f"{B * step1 / stepB:.2f}x the tokens/s of one")
    if args.dtype != "float64":  # which decode kernels ran (gemv.py / int8_dot.py jobs, by thread count)
        from npgpt2 import gemv_pool
        print("GEMV jobs: " + ", ".join(f"{k} x{v}" for k, v in sorted(gemv_pool.STATS.items())))


if __name__ == "__main__":
    main()
