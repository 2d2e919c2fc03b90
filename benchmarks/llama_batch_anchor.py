"""llama.cpp's own batched decoding (what its `llama-server --parallel N` runs), timed one step
at a time: one sequence against N, on a GGUF of the same GPT-2 weights (gguf_anchor.py).

    <anchor venv>/bin/python benchmarks/llama_batch_anchor.py MODEL.gguf [--rows 8] [--prompt 32]
        [--new 64] [--threads 1]

llama-cpp-python's server answers one request at a time, so it cannot show what continuous
batching costs in llama.cpp. This script drives the same library (llama-cpp-python's
low-level bindings of llama.h) the way llama.cpp's server does with N slots: every sequence
is prefilled (its own seq_id), then each step is one llama_decode of a batch holding one new
token per sequence, each at its own position, the logits of every row computed. Tokens fed
are the greedy ones (argmax of each row's logits), so both sides do the same work per step.
Prints the median step time (wall, and this thread's CPU time, which a busy machine's other
processes do not inflate) for 1 row and for N rows and their ratios: the number
benchmarks/decode_step.py gives for npgpt2 (run by benchmarks/serve.py, in the anchor venv).
"""
import argparse
import ctypes
import json
import statistics
import time

import numpy as np


def run(llama_cpp, model, rows, prompt, new, threads, n_vocab):
    """-> (wall seconds, this thread's CPU seconds) of each decode step of `rows` sequences
    (after their prefill); with one thread ggml computes on the calling thread."""
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = rows * (prompt + new + 8)
    cp.n_batch = max(512, rows * prompt)
    cp.n_ubatch = cp.n_batch
    cp.n_seq_max = rows
    cp.n_threads = threads
    cp.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    batch = llama_cpp.llama_batch_init(cp.n_batch, 0, rows)
    rng = np.random.default_rng(0)

    def fill(items):
        """items: [(token, pos, seq, want_logits)] -> the batch."""
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i] = int(tok)
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
        batch.n_tokens = len(items)

    try:
        last = []
        for s in range(rows):  # prefill each sequence (its last position's logits kept)
            toks = rng.integers(0, 50000, prompt)
            fill([(t, p, s, p == prompt - 1) for p, t in enumerate(toks)])
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed in the prefill")
            last.append(_argmax(llama_cpp, ctx, prompt - 1, n_vocab))  # its batch index
        steps = []
        for step in range(new):
            fill([(last[s], prompt + step, s, True) for s in range(rows)])
            t0, c0 = time.perf_counter(), time.thread_time()
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            last = [_argmax(llama_cpp, ctx, s, n_vocab) for s in range(rows)]
            steps.append((time.perf_counter() - t0, time.thread_time() - c0))
        return steps
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def _argmax(llama_cpp, ctx, i, n_vocab):
    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
    return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_vocab,)).argmax())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import llama_cpp
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(args.gguf.encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise SystemExit(f"{args.gguf}: llama.cpp could not load it")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    try:
        run(llama_cpp, model, 1, args.prompt, 4, args.threads, n_vocab)  # warm-up: pages of the weights
        rounds = [[run(llama_cpp, model, b, args.prompt, args.new // 2, args.threads, n_vocab) for b in (1, args.rows)]
                  for _ in range(2)]  # alternating, as the machine's load comes and goes
        one = [t for r in rounds for t in r[0]]
        many = [t for r in rounds for t in r[1]]
    finally:
        llama_cpp.llama_model_free(model)
    wall = [statistics.median(t[0] for t in x) for x in (one, many)]
    cpu = [statistics.median(t[1] for t in x) for x in (one, many)]
    print(json.dumps({"version": llama_cpp.__version__, "threads": args.threads, "rows": args.rows,
                      "step_1": wall[0], "step_n": wall[1], "ratio": wall[1] / wall[0],
                      "cpu_1": cpu[0], "cpu_n": cpu[1], "cpu_ratio": cpu[1] / cpu[0]}))


if __name__ == "__main__":
    main()
