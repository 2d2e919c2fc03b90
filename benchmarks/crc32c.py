"""CRC-32C throughput: the Numba path on 500 MB (target: <= 3 s) and fast vs reference.

    python benchmarks/crc32c.py [--mb 500] [--repeat 3]

Prints a small table. The first fast call includes loading Numba's cached machine code (or
compiling it on a fresh install); it is timed separately from the steady state.
"""
import argparse
import time

import numpy as np

from npgpt2.checkpoint.crc32c import crc32c, crc32c_reference


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=500, help="size of the large buffer in MB (1e6 bytes)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=256 * 1024, dtype=np.uint8)
    t = time.perf_counter()
    crc32c(small[:64])
    first_call = time.perf_counter() - t

    big = rng.integers(0, 256, size=args.mb * 1_000_000, dtype=np.uint8)
    t_big, crc_big = best_of(lambda: crc32c(big), args.repeat)
    t_fast, crc_fast = best_of(lambda: crc32c(small), args.repeat)
    t_ref, crc_ref = best_of(lambda: crc32c_reference(small), 1)
    assert crc_fast == crc_ref, "fast and reference disagree"

    rows = [
        ("first call (load/compile)", f"{first_call * 1e3:.0f} ms", ""),
        (f"fast, {args.mb} MB", f"{t_big:.3f} s", f"{args.mb / t_big:,.0f} MB/s"),
        ("fast, 256 KiB", f"{t_fast * 1e3:.3f} ms", f"{small.size / 1e6 / t_fast:,.0f} MB/s"),
        ("reference, 256 KiB", f"{t_ref * 1e3:.0f} ms", f"{small.size / 1e6 / t_ref:,.1f} MB/s"),
        ("fast / reference speed", f"{t_ref / t_fast:,.0f}x", ""),
    ]
    print(f"{'case':28s} {'time':>12s} {'throughput':>14s}")
    for name, a, b in rows:
        print(f"{name:28s} {a:>12s} {b:>14s}")
    print(f"crc32c of the {args.mb} MB buffer: 0x{crc_big:08x}")


if __name__ == "__main__":
    main()
