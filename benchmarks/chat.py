"""Training to chat (issue 18), measured on held-out conversations of `npgpt2 demo --chat`.

    nice -n 10 python benchmarks/chat.py [--out DIR] [--quick] [--reps 11] [--json FILE]

Trains the chat demo's recipe once (demo_chat.py: stage 1 pretraining, the "plain demo model"),
then fine-tunes it twice on the training conversations from the same weights and batch seed:
with the loss on the answers (the loss mask) and with --train_on all. Then, on the held-out test
terms' conversations (never trained on, not even their Jargon File entries):

(a) loss on the answer tokens (the mask's 1s: each answer and its <|endoftext|>), each
    conversation scored on its own after an <|endoftext|> as in training; targets: the chat
    model's is below the plain model's and below the --train_on all model's;
(b) greedy replies (ChatSession, temperature 0, --length 100) to each held-out question that end
    by themselves (a speaker tag or <|endoftext|>); target >= 95 %;
(c) one training step (train.train_step: micro-batch, loss and gradients, clip, AdamW) with the
    mask against the same step without it, same shapes, alternating repetitions; target: the
    median ratio <= 1.05.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npgpt2 import chat_data, demo_chat, train  # noqa: E402
from npgpt2.chat import BOT, USER  # noqa: E402
from npgpt2.data import Sampler  # noqa: E402


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def answer_loss(model, tok, convs):
    """(mean loss over the answers' trained tokens, their count) of each conversation on its own."""
    total, count = 0.0, 0
    for c in convs:
        turns = [(USER if m["role"] == "user" else BOT, m["content"], 1) for m in c["messages"]]
        ids, mask = chat_data.conversation_ids(tok, "", turns, demo_chat.TEMPLATE["user_tag"],
                                               demo_chat.TEMPLATE["bot_tag"], tok.eot_token)
        seq = np.array([[tok.eot_token] + ids], dtype=np.int64)  # [1, n + 1]: as in the training stream
        losses = train.forward_losses(model, seq[:, :-1], seq[:, 1:])[0]  # [n]
        m = np.asarray(mask, dtype=np.float64)
        total, count = total + float((losses * m).sum()), count + int(m.sum())
    return total / count, count


def step_ratio(model, tokens, mask, cfg, reps):
    """Median over alternating repetitions of (masked step seconds / unmasked step seconds)."""
    names = list(model.params)
    opt = train.make_run_optimizer(model, names, cfg)
    masked, plain = Sampler(tokens, cfg.context + 1, 1, mask), Sampler(tokens, cfg.context + 1, 1)
    comm = train.SingleProcess()
    times = {"masked": [], "plain": []}
    for rep in range(reps + 1):
        for name, sampler in (("masked", masked), ("plain", plain)) if rep % 2 else (("plain", plain),
                                                                                   ("masked", masked)):
            t0 = time.perf_counter()
            train.train_step(model, opt, sampler, names, cfg, 1e-5, 0, comm)
            if rep:  # the first round warms up (Numba, BLAS buffers)
                times[name].append(time.perf_counter() - t0)
    ratios = [m / p for m, p in zip(times["masked"], times["plain"])]
    return statistics.median(ratios), statistics.median(times["masked"]), statistics.median(times["plain"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="the quick preset (a smoke test; targets not expected)")
    ap.add_argument("--reps", type=int, default=11, help="step-time repetitions per side (default %(default)s)")
    ap.add_argument("--length", type=int, default=100, help="most tokens per greedy reply (default %(default)s)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="npgpt2-chat-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    preset = dict(demo_chat.QUICK if args.quick else demo_chat.FULL)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    prep = demo_chat.prepare(work, seed=0)
    tok, test = prep["tokenizer"], prep["data"]["test"]
    plain = demo_chat.pretrain(prep, preset, seed=0)
    models, runs = {"plain demo model (stage 1)": plain}, {}
    for train_on in ("assistant", "all"):
        m = type(plain)(plain.hparams, {k: v.copy() for k, v in plain.params.items()})
        runs[train_on] = demo_chat.finetune(m, prep, preset, None, seed=0, train_on=train_on)
        models[f"fine-tuned, --train_on {train_on}"] = m
    losses = {name: answer_loss(m, tok, test) for name, m in models.items()}
    chat_model = models["fine-tuned, --train_on assistant"]
    replies = demo_chat.answers(chat_model, tok, [c["messages"][0]["content"] for c in test], length=args.length)
    ended = sum(e for _, _, e in replies) / len(replies)
    tokens, mask, _ = chat_data.load_masked_dataset(str(prep["paths"]["train_npz"]))
    _, cfg = demo_chat.stage_configs(preset)
    ratio, t_masked, t_plain = step_ratio(chat_model, tokens, mask, cfg, args.reps)

    chat_loss = losses["fine-tuned, --train_on assistant"][0]
    rows = [(f"(a) answer loss, {name}", f"{v:.3f} nats over {n} tokens",
             "" if "assistant" in name else f"chat < this: {chat_loss < v}") for name, (v, n) in losses.items()]
    rows.append((f"(b) greedy replies ending within --length {args.length}",
                 f"{ended:.1%} of {len(replies)}", f">= 95 %: {ended >= 0.95}"))
    rows.append((f"(c) masked / unmasked step (B={cfg.batch_size}, T={cfg.context})",
                 f"{ratio:.3f} ({t_masked * 1e3:.0f} / {t_plain * 1e3:.0f} ms)", f"<= 1.05: {ratio <= 1.05}"))
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end; {time.time() - t0:.0f} s in all")
    print(f"held-out: {len(test)} conversations about terms never trained on; fine-tuning steps: "
          + ", ".join(f"{k} {r['step']}{' (early stop)' if r['early_stopped'] else ''}" for k, r in runs.items()))
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | value | target |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for r in rows:
        print(f"| {r[0].ljust(width)} | {r[1]} | {r[2]} |")
    print("examples:")
    for q, a, e in replies[:5]:
        print(f"  Q: {q}\n  A: {a}{'' if e else ' [did not end]'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "loss": {k: v[0] for k, v in losses.items()}, "ended": ended,
                       "step_ratio": ratio, "step_ms": [t_masked * 1e3, t_plain * 1e3],
                       "steps": {k: r["step"] for k, r in runs.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
