"""`npgpt2 serve` under 8 concurrent streaming clients, against one client alone (issue 20).

    python benchmarks/serve.py [--clients 8] [--prompt 32] [--new 64] [--max_batch 8]

A GPT-2 124M-shaped model with random weights (init_model, save_model to a temporary folder)
is served by `npgpt2 serve` in a child process on a loopback port. Each client streams
`POST /v1/completions` (a `prompt`-token id list, `max_tokens` new, the usage chunk at the end)
and records when each chunk of text arrives. One run:

- solo: one client alone (after one warm-up request);
- batched: `clients` clients started together, each with its own prompt;
- --repeat times solo then batched, then solo once more: each measure is the median over
  the phases of its kind (the machine is shared: load comes and goes within a run).

Rows: aggregate tokens/s (all clients' tokens over the wall time from the first request to
the last token), time to first token, each client's median time between tokens, and the
server's peak RSS (VmHWM) after each phase. Targets (issue 20): aggregate >= 4x solo; each
client's median gap <= 2.5x solo; TTFT under load <= solo TTFT + clients x one prefill (the
prefill of a prompt measured in-process, median of 5); peak RSS over the solo server's <= the
active requests' KV cache rows.

Anchor (issue 20): llama.cpp's server through llama-cpp-python (`python -m llama_cpp.server`,
from the venv --llama_python; versions pinned in benchmarks/requirements-anchors.txt) on the
same random weights written as a float32 GGUF (gguf_anchor.write_gguf), under the same load
through its OpenAI endpoint (the prompts as text: GPT-2's decoding of the same ids). Skipped,
with the reason printed, when that venv is missing. llama-cpp-python's server has no
--parallel slots (llama.cpp's own `llama-server` has; the package does not build it): one
lock around its one model, so it answers requests one after another, and by default a new
request interrupts the one streaming (--interrupt_requests False here, so they queue).
"""
import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import npgpt2  # noqa: E402
from npgpt2.batch_decode import BatchDecoder, Row  # noqa: E402
from npgpt2.model import MODEL_HPARAMS  # noqa: E402


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stream_client(url, body, out, start=None):
    """One streaming completion of `body` (an OpenAI /v1/completions request with
    stream true); out gets {t0, arrivals: [chunk arrival times], tokens} (tokens: the usage
    chunk's count, or the chunks with text when the server sends no usage)."""
    if start is not None:
        start.wait(timeout=60)
    t0 = time.perf_counter()
    arrivals, tokens = [], None
    with requests.post(url + "v1/completions", json=body, stream=True, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
    out.update(t0=t0, arrivals=arrivals, tokens=len(arrivals) if tokens is None else tokens)


def step_time(model, prompts, new):
    """-> [(wall, this thread's CPU seconds)] of `new` BatchDecoder steps (sample + feed) with
    len(prompts) rows, in-process: what the server's worker does per token, without HTTP."""
    dec = BatchDecoder(model, len(prompts))
    for i, p in enumerate(prompts):
        dec.add(Row(p, new + 2, rng=np.random.default_rng(i)))
    dec.sample()
    dec.feed()
    times = []
    for _ in range(new):
        t0, c0 = time.perf_counter(), time.thread_time()
        dec.sample()
        dec.feed()
        times.append((time.perf_counter() - t0, time.thread_time() - c0))
    return times


def npgpt2_body(prompt, new):
    return {"model": "124M", "prompt": prompt, "max_tokens": new, "temperature": 1.0, "seed": 1, "stream": True,
            "stream_options": {"include_usage": True}}


def run_load(url, bodies, pid, repeat=1):
    """One warm-up request (bodies[-1]); then, `repeat` times, one client alone (bodies[0])
    and len(bodies) - 1 clients together, and a last solo run: the machine is shared, so solo
    and batched phases alternate and each measure is the median over its phases ->
    (solo, many, {phase: the server's peak RSS in MB}); see combine()."""
    stream_client(url, bodies[-1], {})  # warm-up: Numba's compiled kernels, pages
    rss = {"idle": peak_rss_mb(pid)}
    n = len(bodies) - 1
    solos, manys = [], []
    for phase in range(repeat + 1):
        solo_run = {}
        stream_client(url, bodies[0], solo_run)
        solos.append(stats([solo_run]))
        if phase == 0:
            rss["solo"] = peak_rss_mb(pid)
        if phase == repeat:
            break
        runs = [{} for _ in range(n)]
        start = threading.Barrier(n)
        threads = [threading.Thread(target=stream_client, args=(url, bodies[i], runs[i], start)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        manys.append(stats(runs))
    rss["many"] = peak_rss_mb(pid)
    return combine(solos), combine(manys), rss


def combine(phases):
    """Phases' stats -> {tok_s, worst gap, worst ttft: medians over the phases; last: the last phase's stats}."""
    return {"tok_s": statistics.median(p["tok_s"] for p in phases),
            "worst_gap": statistics.median(max(p["gap"]) for p in phases),
            "worst_ttft": statistics.median(max(p["ttft"]) for p in phases),
            "phases": len(phases), "last": phases[-1]}


def stats(runs):
    """Per client: TTFT, median time between text chunks (one token each but for the rare
    token that ends inside a UTF-8 character); overall: tokens (the usage counts), wall, tokens/s."""
    t_start = min(r["t0"] for r in runs)
    t_end = max(r["arrivals"][-1] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    ttft = [r["arrivals"][0] - r["t0"] for r in runs]
    gaps = [statistics.median(b - a for a, b in zip(r["arrivals"], r["arrivals"][1:])) for r in runs]
    return {"tokens": tokens, "wall": t_end - t_start, "tok_s": tokens / (t_end - t_start),
            "ttft": ttft, "gap": gaps}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_anchor(args, hp, prompts, tmp):
    """llama.cpp's server (llama-cpp-python) on the same weights and load -> {solo, many, rss,
    version, prompt_tokens} or {note: why it was not run}."""
    py = Path(args.llama_python)
    if not py.exists():
        return {"note": f"not run: {py} does not exist (a venv with benchmarks/requirements-anchors.txt)"}
    probe = subprocess.run([str(py), "-c", "import gguf, llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return {"note": f"not run: llama_cpp.server or gguf does not import in {py}: "
                        f"{probe.stderr.strip().splitlines()[-1:]}"}
    # the weights npgpt2 serve had, written as GGUF in the venv (gguf_anchor.write_gguf needs `gguf`)
    model = npgpt2.load_model(Path(tmp) / "124M")
    np.savez(Path(tmp) / "params.npz", **{k.replace("/", "|"): np.asarray(v) for k, v in model.params.items()})
    del model
    (Path(tmp) / "hparams.json").write_text(json.dumps(hp))
    gguf = Path(tmp) / "gpt2-124m-f32.gguf"
    write = ("import json, sys; import numpy as np; sys.path.insert(0, sys.argv[1]); from gguf_anchor import write_gguf; "
             "f = np.load(sys.argv[2]); write_gguf({k.replace('|', '/'): f[k] for k in f.files}, "
             "json.loads(open(sys.argv[3]).read()), sys.argv[4], 'f32')")
    subprocess.run([str(py), "-c", write, str(ROOT / "benchmarks"), str(Path(tmp) / "params.npz"),
                    str(Path(tmp) / "hparams.json"), str(gguf)], check=True)
    (Path(tmp) / "params.npz").unlink()
    port = free_port()
    # interrupt_requests False: by default a new request interrupts the one streaming (the
    # server runs one request at a time); n_ctx: GPT-2's context
    cmd = [str(py), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "124M", "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(hp["n_ctx"]), "--n_threads", str(args.anchor_threads),
           "--n_threads_batch", str(args.anchor_threads), "--interrupt_requests", "False"]
    log_path = Path(tmp) / "llama-server.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text().strip().splitlines()[-3:]
                return {"note": f"not run: llama_cpp.server exited {proc.returncode}: {' / '.join(tail)}"}
            try:
                if requests.get(url + "v1/models", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                return {"note": "not run: llama_cpp.server did not answer within 300 s"}
            time.sleep(0.5)
        enc = npgpt2.load_tokenizer()
        bodies = [{"model": "124M", "prompt": enc.decode(p), "max_tokens": args.new, "temperature": 1.0, "seed": 1,
                   "stream": True} for p in prompts]
        # how many tokens llama.cpp makes of the prompt text (GPT-2's BPE again: about the same ids)
        r = requests.post(url + "v1/completions", json={**bodies[0], "stream": False, "max_tokens": 1}, timeout=300)
        prompt_tokens = r.json().get("usage", {}).get("prompt_tokens") if r.ok else None
        solo, many, rss = run_load(url, bodies, proc.pid)  # one request at a time: one batched phase (~40 s)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # llama.cpp's own batching (llama_decode of n sequences at once), which its server does not use
    r = subprocess.run([str(py), str(ROOT / "benchmarks" / "llama_batch_anchor.py"), str(gguf), "--rows", str(args.clients),
                        "--prompt", str(args.prompt), "--new", str(args.new), "--threads", str(args.anchor_threads)],
                       capture_output=True, text=True)
    batch = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    return {"solo": solo, "many": many, "rss": rss, "version": probe.stdout.strip(), "prompt_tokens": prompt_tokens,
            "batch": batch, "batch_error": None if batch else r.stderr.strip().splitlines()[-1:]}


def print_anchor(anchor, n):
    if "solo" not in anchor:
        print("| llama.cpp server anchor | not run | not run | same load | - |")
        return
    if anchor["batch"]:
        b = anchor["batch"]
        print(f"| llama.cpp's batched decode (llama_decode of {n} sequences, {b['threads']} thread), one step (s): wall | "
              f"{b['step_1']:.4f} | {b['step_n']:.4f} | {b['ratio']:.2f}x one row | - |")
        print(f"| the same, CPU time of the decoding thread (s) | {b['cpu_1']:.4f} | {b['cpu_n']:.4f} | "
              f"{b['cpu_ratio']:.2f}x one row | - |")
    solo, many, rss = anchor["solo"], anchor["many"], anchor["rss"]
    name = f"llama.cpp server anchor (llama-cpp-python {anchor['version']}, F32 GGUF)"
    print(f"| {name}: aggregate tokens/s | {solo['tok_s']:.1f} | {many['tok_s']:.1f} | "
          f"{many['tok_s'] / solo['tok_s']:.2f}x solo | - |")
    print(f"| {name}: median time between tokens (s), worst client | {solo['worst_gap']:.4f} | {many['worst_gap']:.4f} | "
          f"{many['worst_gap'] / solo['worst_gap']:.2f}x solo | - |")
    print(f"| {name}: time to first token (s), worst client | {solo['worst_ttft']:.3f} | {many['worst_ttft']:.3f} | "
          f"- | - |")
    print(f"| {name}: server peak RSS (MB) | {rss['solo']:.0f} | {rss['many']:.0f} | - | - |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per client")
    ap.add_argument("--max_batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3,
                    help="batched phases, each between two solo runs (medians over them; the anchor server: 1)")
    ap.add_argument("--llama_python", default="/opt/llamaenv/bin/python",
                    help="the python of a venv with llama-cpp-python[server] and gguf (the anchor row)")
    ap.add_argument("--anchor_threads", type=int, default=1,
                    help="llama.cpp's --n_threads (1: the two cores are shared; npgpt2 chooses 1 or 2 by load)")
    args = ap.parse_args()
    hp = MODEL_HPARAMS["124M"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50000, args.prompt).tolist() for _ in range(args.clients + 1)]
    with tempfile.TemporaryDirectory(prefix="npgpt2-serve-bench-") as tmp:
        model = npgpt2.init_model(hp, seed=0)
        npgpt2.save_model(model, Path(tmp) / "124M")
        # one prefill of a prompt, in-process: the unit of the TTFT target
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model.forward(np.asarray([prompts[0]]), cache=model.new_cache(1), last_only=True)
            times.append(time.perf_counter() - t0)
        prefill = statistics.median(times)
        # one decode step in-process, 1 row and `clients` rows alternating (3 rounds of 24 steps)
        rounds = [{b: step_time(model, prompts[:b], 24) for b in (1, args.clients)} for _ in range(3)]
        steps = {b: [statistics.median(t[k] for r in rounds for t in r[b]) for k in (0, 1)] for b in (1, args.clients)}
        del model
        env = {**os.environ, "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
        os.environ.update(no_proxy="127.0.0.1", NO_PROXY="127.0.0.1")
        proc = subprocess.Popen([sys.executable, "-m", "npgpt2.cli", "serve", "--models_dir", tmp, "--model_name",
                                 "124M", "--port", "0", "--max_batch", str(args.max_batch)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        try:
            url = proc.stdout.readline().split(" on ")[1].split()[0]
            bodies = [npgpt2_body(p, args.new) for p in prompts]
            solo, many, rss = run_load(url, bodies, proc.pid, args.repeat)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        anchor = run_anchor(args, hp, prompts, tmp)
    rss_idle, rss_solo, rss_many = rss["idle"], rss["solo"], rss["many"]
    L, C, n_ctx = hp["n_layer"], hp["n_embd"], hp["n_ctx"]
    row_used = 2 * L * (args.prompt + args.new) * C * 4 / 2**20   # MB of k and v one request fills
    row_full = 2 * L * n_ctx * C * 4 / 2**20                       # MB of one preallocated cache row
    n = args.clients
    checks = [
        ("aggregate tokens/s", f"{solo['tok_s']:.1f}", f"{many['tok_s']:.1f}",
         f">= 4x solo = {4 * solo['tok_s']:.1f}", many["tok_s"] >= 4 * solo["tok_s"]),
        ("median time between tokens (s), worst client", f"{solo['worst_gap']:.4f}", f"{many['worst_gap']:.4f}",
         f"<= 2.5x solo = {2.5 * solo['worst_gap']:.4f}", many["worst_gap"] <= 2.5 * solo["worst_gap"]),
        ("time to first token (s), worst client", f"{solo['worst_ttft']:.3f}", f"{many['worst_ttft']:.3f}",
         f"<= solo + {n} x {prefill:.3f} = {solo['worst_ttft'] + n * prefill:.3f}",
         many["worst_ttft"] <= solo["worst_ttft"] + n * prefill),
        ("server peak RSS (MB)", f"{rss_solo:.0f}", f"{rss_many:.0f}",
         f"<= solo + {n} rows x {row_used:.1f} MB used ({row_full:.0f} MB at n_ctx) = {rss_solo + n * row_used:.0f}",
         rss_many - rss_solo <= n * row_used),
    ]
    print(f"npgpt2 serve, GPT-2 124M shapes (random weights, float32), {n} streaming clients x {args.new} new "
          f"tokens after a {args.prompt}-token prompt, --max_batch {args.max_batch}")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; load average at end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared machine)")
    print(f"server RSS after warm-up {rss_idle:.0f} MB; one {args.prompt}-token prefill in-process {prefill:.3f} s; "
          f"medians over {solo['phases']} solo and {many['phases']} batched phases, alternating")
    print()
    print(f"| measure | 1 client | {n} clients | target | met |")
    print("|---|---|---|---|---|")
    for name, a, b, target, ok in checks:
        print(f"| {name} | {a} | {b} | {target} | {'yes' if ok else 'NO'} |")
    print(f"| npgpt2's batched decode in-process (BatchDecoder sample + feed), one step (s): wall | {steps[1][0]:.4f} | "
          f"{steps[n][0]:.4f} | {steps[n][0] / steps[1][0]:.2f}x one row | - |")
    print(f"| the same, CPU time of the decoding thread (s) | {steps[1][1]:.4f} | "
          f"{steps[n][1]:.4f} | {steps[n][1] / steps[1][1]:.2f}x one row | - |")
    print_anchor(anchor, n)
    print()
    print(f"per client, {n} clients, last phase: TTFT " + " ".join(f"{x:.3f}" for x in many["last"]["ttft"])
          + "; median gap " + " ".join(f"{x:.4f}" for x in many["last"]["gap"]))
    if anchor.get("note"):
        print(f"llama.cpp anchor: {anchor['note']}")
    elif not anchor.get("batch"):
        print(f"llama.cpp batched decode: failed: {anchor.get('batch_error')}")
    else:
        print(f"llama.cpp anchor: llama-cpp-python {anchor['version']}'s server takes one request at a time "
              f"(no --parallel slots); its prompt is GPT-2's text of the same ids ({anchor['prompt_tokens']} tokens "
              f"as llama.cpp tokenizes it). Its batched row is the library driven as llama-server --parallel does.")

if __name__ == "__main__":
    main()
