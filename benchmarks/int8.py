"""8-bit weights (`--dtype int8`): decode speed, 1558M memory, quality.

    /opt/fixenv/bin/python benchmarks/int8.py [--reps 5] [--new 100] [--skip-big] [--demo DIR]

Rows (printed as a table, also written to benchmarks/results/int8.json):
- decode, GPT-2 124M shapes, random weights, batch 1, 16-token prompt + NEW greedy tokens:
  npgpt2 int8, npgpt2 float32 and PyTorch + HF float32 (benchmarks/workers.py's own decode
  loop, imported), each in its own process, alternating who goes first, medians of REPS
  after a warm-up; the hardware limit is bytes read per token / the measured GEMV bandwidth
  (benchmarks/hardware.py).
- 1558M shapes: load (quantised tensor by tensor from a memory-mapped float32 checkpoint)
  + 20 greedy tokens, peak RSS (own process).
- quality on learned weights: the model `npgpt2 demo` trained (--demo DIR): held-out loss
  (the last 10 % of the Jargon File, as the demo splits it) float32 vs int8, and greedy
  next-token agreement at every held-out position.

    python benchmarks/int8.py --worker SIDE BENCH JSON    # one side (internal)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import workers  # noqa: E402  (the PyTorch decode loop, tokens, peak RSS: reused, not copied)

RESULTS = HERE / "results"
BIG_DIR = Path("/tmp/npgpt2-int8-1558M")
GIB = 1024  # MiB per GiB (peak RSS is in MiB)


# ---------------------------------------------------------------- the worker side
def npgpt2_decode_setup(dtype, args):
    import numpy as np

    from npgpt2 import quant
    from npgpt2.model import GPT2, init_model
    from npgpt2.sampling import generate_stream
    model = init_model(workers.SIZES["124M"])
    if dtype == "int8":
        model = GPT2(model.hparams, quant.quantize_params(model.params), np.float32)
    prompt = [int(t) for t in workers.tokens(2, args["prompt"])]
    out = {}

    def run():
        out["ids"] = [int(t[0]) for t in generate_stream(model, prompt, args["new"], temperature=0)]
    return run, {"result": out}


def big_generate(args):
    """1558M: load_model(dtype="int8") from the float32 folder + 20 greedy tokens, peak RSS."""
    import npgpt2
    from npgpt2.sampling import generate_stream
    t0 = time.perf_counter()
    model = npgpt2.load_model(args["dir"], dtype="int8", verify=args.get("verify", True))
    t1 = time.perf_counter()
    ids = list(generate_stream(model, [int(t) for t in workers.tokens(4, 8)], args["new"], temperature=0))
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "generate_s": t2 - t1, "tok_per_s": len(ids) / (t2 - t1),
            "peak_rss_mib": workers.peak_rss_mib()}


def worker_main(side, bench, args):
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")

    if bench == "big":
        send(big_generate(args))
        return
    if side == "torch":
        run, extra = workers.torch_setup("decode", args)
    else:
        run, extra = npgpt2_decode_setup(side.split("-")[1], args)
    send({"ready": True})
    for line in sys.stdin:
        if line.strip() == "run":
            t0 = time.perf_counter()
            run()
            send({"seconds": time.perf_counter() - t0, **extra})
        else:
            send({"peak_rss_mib": workers.peak_rss_mib()})
            return


# ---------------------------------------------------------------- the driver side
def env():
    e = dict(os.environ)
    e.pop("NPGPT2_PLAIN", None)
    e["USE_TF"] = "0"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


class Side:
    def __init__(self, side, bench, args, log):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", side, bench, json.dumps(args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     text=True, env=env(), cwd=ROOT)
        self.ready = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with code {self.proc.wait()} (see {RESULTS / 'int8.log'})")
        return json.loads(line)

    def call(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()


def load_average():
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def bench_decode(reps, new, log):
    sides = ["npgpt2-int8", "npgpt2-float32", "torch"]
    args = {"prompt": 16, "new": new}
    ws = {s: Side(s, "decode", args, log) for s in sides}
    times = {s: [] for s in sides}
    ids = {}
    for s in sides:
        ws[s].call("run")  # warm-up
    for r in range(reps):
        for s in sides[r % 3:] + sides[:r % 3]:  # rotate who goes first
            out = ws[s].call("run")
            times[s].append(out["seconds"])
            ids[s] = out["result"]["ids"]
    res = {}
    for s in sides:
        rss = ws[s].call("quit")["peak_rss_mib"]
        ws[s].proc.wait()
        res[s] = {"tok_per_s": new / statistics.median(times[s]), "reps_s": times[s], "peak_rss_mib": rss}
    res["greedy_ids_equal_f32_vs_int8"] = ids["npgpt2-int8"] == ids["npgpt2-float32"]
    return res


def bench_big(log):
    if not (BIG_DIR / "checkpoint").exists():
        log.write("writing the 1558M float32 folder\n")
        log.flush()
        subprocess.run([sys.executable, str(HERE / "workers.py"), "npgpt2", "prepare",
                        json.dumps({"size": "1558M", "dir": str(BIG_DIR)})],
                       stdout=log, stderr=log, env=env(), cwd=ROOT, check=True)
    out = subprocess.run([sys.executable, __file__, "--worker", "npgpt2-int8", "big",
                          json.dumps({"dir": str(BIG_DIR), "new": 20})],
                         stdout=subprocess.PIPE, stderr=log, text=True, env=env(), cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def quality(demo_dir, context=64):
    import numpy as np

    from npgpt2 import quant
    from npgpt2.demo import load_corpus
    from npgpt2.model import GPT2, load_model
    from npgpt2.tokenizer import load_tokenizer
    from npgpt2.train import evaluate
    f32 = load_model(demo_dir)
    ids, _ = load_corpus(load_tokenizer())  # the demo's corpus, in GPT-2 ids
    tokens = load_tokenizer(demo_dir).compact_ids(ids)  # -> the model's compact ids, as the demo does
    held = tokens[int(tokens.size * 0.9):]  # the demo's split: the last 10 %
    variants = {"int8 (wte int8)": quant.quantize_params(f32.params),
                "int8, wte float32": quant.quantize_params(f32.params, embedding=False),
                "int8, groups of 32": quant.quantize_params(f32.params, group_size=32)}
    out = {"held_out_tokens": int(held.size - 1)}
    loss32, _ = evaluate(f32, held, context)
    out["float32"] = {"loss": loss32}
    # greedy next token at every position of non-overlapping windows of `context`
    W = (held.size - 1) // context
    windows = held[:W * context].reshape(W, context).astype(np.int64)

    def greedy(model):
        return np.concatenate([model.forward(windows[i:i + 64]).argmax(-1) for i in range(0, W, 64)])
    g32 = greedy(f32)
    for name, params in variants.items():
        m = GPT2(f32.hparams, params, np.float32)
        loss, _ = evaluate(m, held, context)
        out[name] = {"loss": loss, "delta_loss": loss - loss32, "greedy_agreement": float((greedy(m) == g32).mean()),
                     "weight_mib": sum(p.nbytes for p in params.values()) / 2**20}
    out["float32"]["weight_mib"] = sum(p.nbytes for p in f32.params.values()) / 2**20
    return out


def bytes_per_token(hparams, int8=True):
    """Weight bytes a decode step reads: every matmul weight once, plus the head (tied wte)."""
    V, C, L = hparams["n_vocab"], hparams["n_embd"], hparams["n_layer"]
    matrices = L * 12 * C * C + V * C  # c_attn 3C^2 + c_proj C^2 + c_fc 4C^2 + mlp c_proj 4C^2; head
    return matrices * (1 if int8 else 4) + L * 13 * C * 4  # + biases and gains, float32


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=100, help="new tokens per decode repetition")
    ap.add_argument("--skip-big", action="store_true", help="no 1558M row")
    ap.add_argument("--demo", default=None, help="the folder `npgpt2 demo --out DIR` wrote (quality rows)")
    ap.add_argument("--worker", nargs=3, metavar=("SIDE", "BENCH", "JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker_main(a.worker[0], a.worker[1], json.loads(a.worker[2]))
    RESULTS.mkdir(exist_ok=True)
    res = {"load_average_start": load_average(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "new": a.new, "reps": a.reps}
    with open(RESULTS / "int8.log", "a") as log:
        hw = subprocess.run([sys.executable, str(HERE / "hardware.py"), "--reps", "3"], stdout=subprocess.PIPE,
                            stderr=log, text=True, env=env(), cwd=ROOT, check=True)
        res["hardware"] = json.loads(hw.stdout)
        res["decode"] = bench_decode(a.reps, a.new, log)
        res["load_average_after_decode"] = load_average()
        if not a.skip_big:
            res["big"] = bench_big(log)
        if a.demo:
            res["quality"] = quality(a.demo)
    res["load_average_end"] = load_average()
    with open(RESULTS / "int8.json", "w") as f:
        json.dump(res, f, indent=1)
    print_table(res)


def print_table(res):
    d = res["decode"]
    bw = res["hardware"]["bandwidth_gbs"]["gemv"]
    hp = workers.SIZES["124M"]
    i8, f32, pt = (d[s]["tok_per_s"] for s in ("npgpt2-int8", "npgpt2-float32", "torch"))
    bound8 = bw * 1e9 / bytes_per_token(hp, True)
    bound32 = bw * 1e9 / bytes_per_token(hp, False)
    print(f"int8 weights, 124M shapes, 2 threads, medians of {res['reps']} alternating repetitions; {res['started']}; load average {res['load_average_start']} at start, "
          f"{res['load_average_end']} at end; measured GEMV bandwidth {bw:.1f} GB/s\n")
    print("| benchmark | npgpt2 int8 | reference | ratio | hardware limit | target | met |")
    print("|---|---|---|---|---|---|---|")
    print(f"| decode 16+{res['new']} tokens vs npgpt2 float32 | {i8:.1f} tok/s | {f32:.1f} tok/s | {i8 / f32:.2f}x | "
          f"int8 {bound8:.0f} tok/s, float32 {bound32:.0f} tok/s; int8 at {100 * i8 / bound8:.0f}% | >= 2.0x | "
          f"{'yes' if i8 / f32 >= 2.0 else 'no'} |")
    print(f"| decode 16+{res['new']} tokens vs PyTorch float32 | {i8:.1f} tok/s | {pt:.1f} tok/s | {i8 / pt:.2f}x |  | >= 2.3x | "
          f"{'yes' if i8 / pt >= 2.3 else 'no'} |")
    if "big" in res:
        b = res["big"]
        print(f"| 1558M int8: load (quantise from mmap) + 20 tokens | peak RSS {b['peak_rss_mib'] / GIB:.2f} GiB "
              f"(load {b['load_s']:.1f} s, {b['tok_per_s']:.2f} tok/s) |  |  | int8 weights 1.45 GiB | < 2.5 GiB | "
              f"{'yes' if b['peak_rss_mib'] < 2.5 * GIB else 'no'} |")
    if "quality" in res:
        q = res["quality"]
        for name, v in q.items():
            if not isinstance(v, dict) or name == "float32":
                continue
            ok = v["delta_loss"] <= 0.02 and v["greedy_agreement"] >= 0.98
            print(f"| demo model, {q['held_out_tokens']} held-out tokens: {name} | loss {v['loss']:.4f}, "
                  f"agreement {100 * v['greedy_agreement']:.2f}% | float32 loss {q['float32']['loss']:.4f} | "
                  f"{v['delta_loss']:+.4f} nats |  | <= +0.02 nats, >= 98% | {'yes' if ok else 'no'} |")
    print(f"\ngreedy ids equal, float32 vs int8 (random weights): {d['greedy_ids_equal_f32_vs_int8']}")


if __name__ == "__main__":
    sys.exit(main())
