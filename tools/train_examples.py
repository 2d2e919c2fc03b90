"""Train the example models shipped in npgpt2/examples/ (see npgpt2/examples/__init__.py).

    nice -n 10 python tools/train_examples.py induction   # ~10 minutes on 2 shared cores
    nice -n 10 python tools/train_examples.py jargon      # the `npgpt2 demo` recipe, then int8

Both use npgpt2's own training code: "induction" init_model + GPT2.loss_and_grads + optim.AdamW
with fresh random batches every step; "jargon" demo.run_demo (which calls train.fit). Each
folder is written to a temporary folder next to its place and renamed over it at the end, so
an interrupted run leaves the shipped model as it was. Seeds are fixed: a rerun gives the same
model up to BLAS roundoff. The induction run logs the loss on the first and the second copy of
a repeated block and the heads' scores as it goes (it prints its own numbers; the tests
measure the committed folder independently).
"""
import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npgpt2 import optim  # noqa: E402
from npgpt2.compact_vocab import VOCAB_FILE  # noqa: E402
from npgpt2.examples import HERE, WORDS  # noqa: E402
from npgpt2.interp import induction_score, previous_token_score  # noqa: E402
from npgpt2.model import init_model, load_model, save_model  # noqa: E402
from npgpt2.tokenizer import load_tokenizer  # noqa: E402

log = logging.getLogger("train_examples")

INDUCTION = dict(n_ctx=32, n_embd=64, n_head=4, n_layer=2, words=64, batch_size=32, steps=6000, learning_rate=3e-3,
                 warmup=100, schedule="cosine", weight_decay=0.1, span=(3, 13), skip_rows=0.25,
                 skip_rule=0.8, seed=0, eval_period=12, save_every=0)


def induction_vocab(n_words):
    """The GPT-2 ids of the first n_words WORDS without and with a leading space, ascending."""
    tok = load_tokenizer()
    words = WORDS[:n_words]
    ids = [tok.encode(w)[0] for w in words] + [tok.encode(" " + w)[0] for w in words]
    return np.unique(np.array(ids, dtype=np.int64))


def repeat_batch(rng, B, T, V, span):
    """(B, T + 1) random tokens with repeats after a random-length prefix (>= 1 token), a
    span of random length L (span[0] <= L < span[1]). Even rows: the span once more at a random
    later offset (maybe after a gap); odd rows: the span over and over to the end (period L),
    which gives the gradient more repeated tokens to learn from. The offsets vary, so copying
    by position cannot work, only looking up what followed the current token last time."""
    x = rng.integers(0, V, size=(B, T + 1))
    for b in range(B):
        L = int(rng.integers(*span))
        s1 = int(rng.integers(1, T + 2 - 2 * L))       # the first copy: x[s1:s1 + L]
        if b % 2:
            n = T + 1 - s1                              # to the end: x[s1 + L + i] = x[s1 + i]
            x[b, s1:] = np.resize(x[b, s1:s1 + L], n)
        else:
            s2 = int(rng.integers(s1 + L, T + 2 - L))  # the second, after it (maybe with a gap)
            x[b, s2:s2 + L] = x[b, s1:s1 + L]
    return x


def skip_bigram_rows(rng, n, T, perm, p_rule):
    """(n, T + 1) rows in which each token from the third on is, with probability p_rule,
    perm[the token two back] (a fixed random permutation), else random. Predicting it needs
    the previous token at the current position, which a previous-token head in layer 0
    provides: random repeats alone reward that head only once the layer-1 head that uses it
    exists, and without these rows no run here formed one in 8k-15k steps."""
    V = perm.size
    x = rng.integers(0, V, size=(n, T + 1))
    rule = rng.random((n, T + 1)) < p_rule
    for t in range(2, T + 1):
        x[:, t] = np.where(rule[:, t], perm[x[:, t - 2]], x[:, t])
    return x


def measure(model, rng, period):
    """Loss on the first / second copy of a random block repeated once, and the heads' scores."""
    V = model.hparams["n_vocab"]
    r = rng.integers(0, V, size=(16, period))
    toks = np.concatenate([r, r], axis=1)                                       # (16, 2 period)
    logits, acts = model.run_with_cache(toks, names=["h0.attn.pattern", "h1.attn.pattern"])
    z = logits[:, :-1].astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, toks[:, 1:, None], axis=-1)[..., 0]          # (16, 2 period - 1)
    return dict(first=float(ce[:, :period - 1].mean()), second=float(ce[:, period:].mean()),
                prev=previous_token_score(acts["h0.attn.pattern"]).round(2).tolist(),
                induction=induction_score(acts["h1.attn.pattern"], period).round(2).tolist(),
                # one place further: what the shipped model's layer-1 heads attend to
                further=induction_score(acts["h1.attn.pattern"][:, :, 1:, 1:], period - 1).round(2).tolist())


def train_induction(out_dir, steps=None, overrides=None):
    c = dict(INDUCTION, steps=steps or INDUCTION["steps"], **(overrides or {}))
    log.info("induction recipe: %s", c)
    vocab = induction_vocab(c["words"])
    V, T = int(vocab.size), c["n_ctx"]
    model = init_model(dict(n_vocab=V, n_ctx=T, n_embd=c["n_embd"], n_head=c["n_head"], n_layer=c["n_layer"]),
                       seed=c["seed"])
    trained = dict(model.params)
    decay = {k: (c["weight_decay"] if p.ndim >= 2 else 0.0) for k, p in trained.items()}
    opt = optim.AdamW(trained, lr=c["learning_rate"], weight_decay=decay)
    rng, eval_rng = np.random.default_rng(c["seed"]), np.random.default_rng(c["seed"] + 1)
    perm = rng.permutation(V)
    t0 = time.time()
    for step in range(1, c["steps"] + 1):
        lr = optim.learning_rate(step - 1, c["learning_rate"], c["warmup"], c["schedule"], c["steps"])
        x = repeat_batch(rng, c["batch_size"], T, V, c["span"])                  # [B, T+1]
        n_skip = int(c["batch_size"] * c["skip_rows"])
        if n_skip:
            x[:n_skip] = skip_bigram_rows(rng, n_skip, T, perm, c["skip_rule"])
        loss, grads = model.loss_and_grads(x[:, :-1], x[:, 1:])
        optim.clip_grad_norm(grads, 1.0)
        opt.step(grads, lr)
        if step % 250 == 0 or step == c["steps"]:
            log.info("step %d (%.0f s): loss %.3f; %s (log V = %.2f)", step, time.time() - t0, loss,
                     measure(model, eval_rng, c["eval_period"]), math.log(V))
        if c["save_every"] and step % c["save_every"] == 0 and step != c["steps"]:  # to watch a long run
            write_folder(Path(f"{out_dir}-{step}"), lambda tmp: _save_compact(model, tmp, vocab))
    write_folder(out_dir, lambda tmp: _save_compact(model, tmp, vocab))


def _save_compact(model, folder, vocab):
    save_model(model, folder)
    with open(Path(folder) / VOCAB_FILE, "wb") as f:
        np.save(f, vocab)


def train_jargon(out_dir, steps=None):
    from npgpt2.convert import write_int8
    from npgpt2.demo import run_demo
    with tempfile.TemporaryDirectory(dir=HERE) as run:
        result = run_demo(steps=steps, seed=0, out_dir=Path(run) / "demo", sample_num=3)
        log.info("jargon: validation loss %.3f (unigram entropy %.3f) after %d steps, %.0f s",
                 result["val_loss"], result["unigram_entropy"], result["steps"], result["train_seconds"])
        model = load_model(Path(run) / "demo")

        def write(tmp):
            write_int8(tmp, model.hparams, dict(model.params))
            shutil.copyfile(Path(run) / "demo" / VOCAB_FILE, Path(tmp) / VOCAB_FILE)
            shutil.copyfile(Path(run) / "demo" / "samples.txt", Path(tmp) / "samples.txt")
        write_folder(out_dir, write)


def write_folder(out_dir, write):
    """write(tmp) fills a fresh folder; the packaged tokenizer files are dropped (load_tokenizer
    falls back to them), then the folder replaces out_dir."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the shipped folder is read by everyone
    try:
        write(tmp)
        for name in ("encoder.json", "vocab.bpe"):
            (tmp / name).unlink(missing_ok=True)
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %s", out_dir, ", ".join(sorted(p.name for p in out_dir.iterdir())))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=["induction", "jargon"])
    p.add_argument("--steps", type=int, default=None, help="override the recipe's steps (a quick try)")
    p.add_argument("--out", default=None, help="folder to write (default npgpt2/examples/NAME)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="induction: change one INDUCTION setting (a Python literal), e.g. --set n_ctx=48")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out) if args.out else HERE / args.name
    if args.name == "induction":
        import ast
        train_induction(out, args.steps, {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    else:
        train_jargon(out, args.steps)


if __name__ == "__main__":
    main()
