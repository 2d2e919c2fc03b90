"""`npgpt2 explain` on GPT-2 124M shapes: the whole command, against a plain forward pass.

    python benchmarks/explain.py [--reps 3] [--tokens 64]

A 124M model with random weights of the real shapes (init_model, save_model to a temporary
folder, so loading reads a real 500 MB checkpoint) explains a text of exactly `tokens` tokens.
Rows: the command as a user runs it (a fresh `python -m npgpt2.cli explain` process: start-up,
load with crc checks, one forward on the plain layers with hooks, the logit lens at the last
position, the input gradient by the hand-written backward, printing), the same with
`--out report.html` (the logit lens at every position, every attention pattern, the HTML), and
in-process timings of the parts. The reference measured in the same run is `model.forward` of
the same tokens (the default fast path, every position's logits). Medians of `reps` runs; the
machine is shared, so the load average is printed too. Target: the command < 5 s.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import npgpt2  # noqa: E402
from npgpt2 import explain  # noqa: E402
from npgpt2.model import MODEL_HPARAMS  # noqa: E402

TARGET_S = 5.0
SENTENCE = ("The history of natural language processing generally started in the 1950s, although work "
            "can be found from earlier periods. In 1950, Alan Turing published an article titled ")


def text_of(tok, n):
    """A text whose encoding is exactly n tokens."""
    ids = tok.encode(SENTENCE * (2 + n // 20))
    for cut in (*range(n, n + 20), *range(n - 1, 0, -1)):  # a cut inside a word may re-merge
        text = tok.decode(ids[:cut])
        if len(tok.encode(text)) == n:
            return text
    raise SystemExit(f"no text of exactly {n} tokens")


def cpu_seconds():
    """CPU time of this process and of its finished children, all threads, user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def median_time(fn, reps):
    """-> (median wall s, median CPU s, every wall time)."""
    walls, cpus = [], []
    for _ in range(reps):
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return statistics.median(walls), statistics.median(cpus), walls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    load0 = os.getloadavg()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="npgpt2-explain-bench-") as tmp:
        t0 = time.perf_counter()
        npgpt2.save_model(npgpt2.init_model(MODEL_HPARAMS["124M"], seed=0), Path(tmp) / "124M")
        print(f"wrote a random 124M model in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        tok = npgpt2.load_tokenizer(Path(tmp) / "124M")
        text = text_of(tok, args.tokens)
        ids = tok.encode(text)
        assert len(ids) == args.tokens
        argv = [sys.executable, "-m", "npgpt2.cli", "explain", "--models_dir", tmp, "--model_name", "124M", text]

        def run(extra=()):
            r = subprocess.run(argv[:-1] + list(extra) + argv[-1:], env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"npgpt2 explain failed: {r.stderr.strip()}")
        run()  # warm the page cache and Numba's on-disk cache before timing
        cmd = median_time(run, args.reps)
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        out = Path(tmp) / "report.html"
        html = median_time(lambda: run(["--out", str(out)]), args.reps)
        html_mb = out.stat().st_size / 1e6

        model = npgpt2.load_model(Path(tmp) / "124M")
        load = median_time(lambda: npgpt2.load_model(Path(tmp) / "124M"), args.reps)
        terminal = median_time(lambda: explain.report_for_ids(model, tok, ids, lens_positions="last",
                                                              patterns=False), args.reps)
        full = median_time(lambda: explain.build_report(model, tok, text), args.reps)
        tokens = np.array([ids])
        model.forward(tokens)
        fwd = median_time(lambda: model.forward(tokens), max(3, args.reps))

        rows = [
            (f"npgpt2 explain, {args.tokens} tokens (whole command)", cmd),
            ("npgpt2 explain --out report.html (whole command)", html),
            ("  in-process: load_model (crc-checked)", load),
            ("  in-process: the terminal report (report_for_ids)", terminal),
            ("  in-process: build_report (every position and pattern)", full),
            (f"reference: model.forward, same {args.tokens} tokens", fwd),
        ]
    w = max(len(r[0]) for r in rows)
    print(f"| {'what (124M shapes, random weights, float32)':<{w}} | wall s | x forward | CPU s | x forward |")
    print(f"|{'-' * (w + 2)}|-------:|----------:|------:|----------:|")
    for name, (wall, cpu, _) in rows:
        print(f"| {name:<{w}} | {wall:6.2f} | {wall / fwd[0]:9.1f} | {cpu:5.2f} | {cpu / fwd[1]:9.1f} |")
    verdict = "met" if cmd[0] < TARGET_S else "NOT met"
    print(f"\ntarget: the command under {TARGET_S:.0f} s wall: {verdict} ({cmd[0]:.2f} s; runs "
          f"{', '.join(f'{t:.2f}' for t in cmd[2])}); peak RSS of a command {rss_mb:.0f} MB; "
          f"report.html {html_mb:.1f} MB")
    print(f"load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} cores; other work on them slows every row)")


if __name__ == "__main__":
    main()
