"""The machine's limits, measured with NumPy: fp32 GEMM GFLOP/s and memory bandwidth.

    python benchmarks/hardware.py [--reps 5]

GEMM: `a @ b` in float32 on GPT-2 124M's shapes (what the model's time is made of) and one
square shape, through the BLAS NumPy uses with its default threads. Bandwidth: a matrix-
vector product over a 512 MiB float32 matrix (how decoding reads the weights: every byte
once per token) and a 256 MiB array copy (read + write counted). Medians after a warm-up.
"""
import argparse
import json
import statistics
import time

import numpy as np

GEMM_SHAPES = [(1024, 768, 3072), (1024, 3072, 768), (1024, 768, 2304), (2048, 2048, 2048)]


def _median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_gflops(reps=5):
    """{"M x K x N": GFLOP/s} for C = A @ B in float32, and "best"."""
    rng = np.random.default_rng(0)
    out = {}
    for M, K, N in GEMM_SHAPES:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        c = np.empty((M, N), np.float32)
        t = _median_time(lambda a=a, b=b, c=c: np.matmul(a, b, out=c), reps)
        out[f"{M}x{K}x{N}"] = 2 * M * K * N / t / 1e9
    out["best"] = max(out.values())
    return out


def bandwidth_gbs(reps=5):
    """{"gemv": GB/s reading a 512 MiB matrix once, "copy": GB/s of a 256 MiB copy (2x bytes)}."""
    w = np.ones((16384, 8192), np.float32)  # 512 MiB
    x = np.ones(8192, np.float32)
    y = np.empty(16384, np.float32)
    t_gemv = _median_time(lambda: np.matmul(w, x, out=y), reps)
    src = np.ones(64 * 2**20, np.float32)  # 256 MiB
    dst = np.empty_like(src)
    t_copy = _median_time(lambda: np.copyto(dst, src), reps)
    return {"gemv": w.nbytes / t_gemv / 1e9, "copy": 2 * src.nbytes / t_copy / 1e9}


def measure(reps=5):
    return {"gemm_gflops": gemm_gflops(reps), "bandwidth_gbs": bandwidth_gbs(reps)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(measure(args.reps)))


if __name__ == "__main__":
    main()
