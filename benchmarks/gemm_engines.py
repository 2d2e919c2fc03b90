"""The GEMM engines side by side: NumPy's BLAS (what npgpt2 runs) against PyTorch's (what
the PyTorch rows run: MKL on x86 wheels), on GPT-2 124M's shapes, in one run.

    python benchmarks/gemm_engines.py [--rounds 8] [--threads 2] [--json]

Why: npgpt2's forward and prefill are ~80 % GEMM. Where PyTorch's BLAS multiplies the same
shapes faster than NumPy's, a ratio against PyTorch has a floor that no change outside the GEMMs
can pass: this prints it. Each engine runs in a worker process of its own; the two take turns
(rounds), with a pause between turns so that the other's idle threads have gone to sleep, and
the table gives medians over the rounds.

Shapes: the block matrices of a T=1024 forward (threads as the rows run them), the output head,
and the attention's per-head products (one thread each: npgpt2 runs heads on two Python
threads, one BLAS thread each). "block matrices, T=1024" sums the four shapes' times weighted
by a prefill's calls (12 layers).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (label, M, K, N, threads: 0 = --threads, calls in a T=1024 prefill of GPT-2 124M)
SHAPES = [("attn/c_attn", 1024, 768, 2304, 0, 12), ("attn/c_proj", 1024, 768, 768, 0, 12),
          ("mlp/c_fc", 1024, 768, 3072, 0, 12), ("mlp/c_proj", 1024, 3072, 768, 0, 12),
          ("head (all logits)", 1024, 768, 50257, 0, 0),
          ("attention q k^T, one head block", 256, 64, 1024, 1, 0),
          ("attention p v, one head block", 256, 1024, 64, 1, 0)]
BLOCKS = [s for s in SHAPES if s[5]]
PAUSE_S = 0.5  # longer than OpenBLAS's (~0.1 s) and libgomp's idle spin
WORK_FLOP = 1e10  # per shape and turn: ~50 ms at 200 GFLOP/s

WORKER = r'''
import json, sys, time
engine, threads, shapes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
if engine == "torch":
    import torch
    torch.manual_seed(0)
    make = lambda m, k: torch.randn(m, k)
    def set_threads(n): torch.set_num_threads(n)
    version = "torch " + torch.__version__
else:
    import numpy as np
    from threadpoolctl import ThreadpoolController
    blas = ThreadpoolController().select(user_api="blas")
    rng = np.random.default_rng(0)
    make = lambda m, k: rng.standard_normal((m, k), dtype=np.float32)
    def set_threads(n): blas.limit(limits=n)
    info = blas.info()[0]
    version = f"numpy {np.__version__} + {info['internal_api']} {info['version']}"
mats = [(make(m, k), make(k, n)) for _, m, k, n, _, _ in shapes]
print(json.dumps(version), flush=True)
for line in sys.stdin:
    rates = []
    for (_, m, k, n, t, _), (a, b) in zip(shapes, mats):
        set_threads(t or threads)
        a @ b
        reps = max(2, int(float(sys.argv[4]) / (2 * m * k * n)))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        rates.append(2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    print(json.dumps(rates), flush=True)
'''


def _have_torch():
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def measure(rounds=8, threads=2):
    """{"engines": {engine: version}, "gflops": {engine: {label: median GFLOP/s}},
    "blocks_s": {engine: seconds of a T=1024 prefill's block matrices}}; engine "torch" only
    where PyTorch is installed."""
    engines = ["numpy", "torch"] if _have_torch() else ["numpy"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    procs = {e: subprocess.Popen([sys.executable, "-c", WORKER, e, str(threads), json.dumps(SHAPES), str(WORK_FLOP)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for e in engines}
    try:
        versions = {e: json.loads(p.stdout.readline()) for e, p in procs.items()}
        runs = {e: [] for e in engines}
        for _ in range(rounds):
            for e, p in procs.items():
                time.sleep(PAUSE_S)
                p.stdin.write("go\n")
                p.stdin.flush()
                runs[e].append(json.loads(p.stdout.readline()))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    gflops = {e: {s[0]: statistics.median(r[i] for r in runs[e]) for i, s in enumerate(SHAPES)} for e in engines}
    blocks = {e: sum(calls * 2 * m * k * n / (gflops[e][label] * 1e9) for label, m, k, n, _, calls in BLOCKS)
              for e in engines}
    return {"engines": versions, "threads": threads, "rounds": rounds, "gflops": gflops, "blocks_s": blocks}


def table(res):
    """Markdown lines: one row a shape, then the prefill's block matrices."""
    g, engines = res["gflops"], list(res["gflops"])
    head = ["shape (M x K x N, threads)"] + [f"{res['engines'][e]} GFLOP/s" for e in engines]
    lines = ["| " + " | ".join(head + (["PyTorch / NumPy speed"] if len(engines) == 2 else [])) + " |",
             "|" + "---|" * (len(head) + (len(engines) == 2)) ]
    for label, m, k, n, t, _ in SHAPES:
        cells = [f"{label} ({m} x {k} x {n}, {t or res['threads']})"] + [f"{g[e][label]:.0f}" for e in engines]
        if len(engines) == 2:
            cells.append(f"{g['torch'][label] / g['numpy'][label]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    b = res["blocks_s"]
    cells = ["block matrices of a T=1024 prefill (48 products), seconds"] + [f"{b[e]:.3f} s" for e in engines]
    if len(engines) == 2:
        cells.append(f"{b['numpy'] / b['torch']:.2f}x")
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="turns of each engine (medians over them)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="threads for the big shapes")
    ap.add_argument("--json", action="store_true", help="print the measurements as JSON (benchmarks/run.py)")
    args = ap.parse_args()
    res = measure(args.rounds, args.threads)
    if args.json:
        print(json.dumps(res))
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from npgpt2.int8_dot import cpu_info
    cpu = cpu_info()
    print(f"{cpu.get('model', '?')}; ISA features: {', '.join(cpu.get('flags', [])) or 'none'}")
    print("\n".join(table(res)))


if __name__ == "__main__":
    main()
