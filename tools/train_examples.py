"""Train the example models shipped in npgpt2/examples/ (see npgpt2/examples/__init__.py).

    nice -n 10 python tools/train_examples.py induction   # ~10 minutes on 2 shared cores
    nice -n 10 python tools/train_examples.py jargon      # the demo recipe, full vocabulary, int8

Both use npgpt2's own training code: "induction" init_model + GPT2.loss_and_grads + optim.AdamW
with fresh random batches every step; "jargon" train.fit on the Jargon File with the full GPT-2
vocabulary (n_vocab 50257), then convert.write_int8. Each
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

INDUCTION = dict(n_ctx=32, n_embd=64, n_head=2, n_layer=2, words=64, batch_size=32, steps=6000, learning_rate=1e-3,
                 warmup=100, schedule="cosine", weight_decay=0.1, span=(3, 17), skip_rows=0.0,
                 skip_rule=0.8, seed=0, eval_period=12, save_every=0, log_every=250,
                 # every row loops a span of 3-16 tokens from a random start (loop_rows()): the run that
                 # formed the textbook circuit (examples/__init__.py); no weight decay on wte/wpe.
                 # Knobs for experiments: vocab=N: N GPT-2 " word" tokens instead of `words`; skip_rows:
                 # a fraction of skip-bigram rows; loop_switch/loop_start2: move where loops may start
                 vocab=0, loop_rows=1.0, loop_start=4, loop_switch=0, loop_start2=4, decay_embeddings=False)

JARGON = dict(n_embd=96, n_head=3, n_layer=3, context=64, batch_size=16, steps=500, learning_rate=3e-3, warmup=60,
              val_every=100, seed=0)


def induction_vocab(n_words):
    """The GPT-2 ids of the first n_words WORDS without and with a leading space, ascending."""
    tok = load_tokenizer()
    words = WORDS[:n_words]
    ids = [tok.encode(w)[0] for w in words] + [tok.encode(" " + w)[0] for w in words]
    return np.unique(np.array(ids, dtype=np.int64))


def space_word_vocab(n):
    """The GPT-2 ids of the first n (by id) single tokens that are a leading space and 3-8
    lowercase ASCII letters (" the", " and", ...), ascending: a vocabulary large enough that a
    token rarely recurs by chance within a row, so only the repeat predicts it."""
    enc = load_tokenizer().encoder
    ids = sorted(i for s, i in enc.items()
                 if s[0] == "\u0120" and 3 <= len(s) - 1 <= 8 and s[1:].isascii() and s[1:].isalpha()
                 and s[1:].islower())
    if len(ids) < n:
        raise ValueError(f"vocab: only {len(ids)} such tokens, asked for {n}")
    return np.array(ids[:n], dtype=np.int64)


def loop_rows(rng, n, T, V, span, start=4):
    """(n, T + 1) rows: 1 to start - 1 random tokens, then a random span of length L (span[0] <= L <
    span[1]) over and over to the end: most tokens are predictable by looking up what followed
    the current one last time, and nothing else predicts them."""
    x = rng.integers(0, V, size=(n, T + 1))
    for b in range(n):
        L, s1 = int(rng.integers(*span)), int(rng.integers(1, start))
        x[b, s1:] = np.resize(x[b, s1:s1 + L], T + 1 - s1)
    return x


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
    c = {**INDUCTION, **(overrides or {})}
    c["steps"] = steps or c["steps"]
    log.info("induction recipe: %s", c)
    vocab = space_word_vocab(c["vocab"]) if c["vocab"] else induction_vocab(c["words"])
    V, T = int(vocab.size), c["n_ctx"]
    model = init_model(dict(n_vocab=V, n_ctx=T, n_embd=c["n_embd"], n_head=c["n_head"], n_layer=c["n_layer"]),
                       seed=c["seed"])
    trained = dict(model.params)
    emb = () if c["decay_embeddings"] else ("model/wte", "model/wpe")
    decay = {k: (c["weight_decay"] if p.ndim >= 2 and k not in emb else 0.0) for k, p in trained.items()}
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
        n_loop = int(c["batch_size"] * c["loop_rows"])
        if n_loop:  # a curriculum: the loops start early first, anywhere up to loop_start2 after loop_switch
            start = c["loop_start"] if step <= (c["loop_switch"] or c["steps"]) else c["loop_start2"]
            x[n_skip:n_skip + n_loop] = loop_rows(rng, n_loop, T, V, c["span"], start)
        loss, grads = model.loss_and_grads(x[:, :-1], x[:, 1:])
        optim.clip_grad_norm(grads, 1.0)
        opt.step(grads, lr)
        if step % c["log_every"] == 0 or step == c["steps"]:
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
    """The `npgpt2 demo` recipe with the full GPT-2 vocabulary (n_vocab 50257, so any text
    encodes and every token gets a probability), then written with int8 weights."""
    from npgpt2.convert import write_int8
    from npgpt2.demo import CORPUS, PROMPTS, SAMPLES_FILE, load_corpus, split_corpus, unigram_entropy
    from npgpt2.sampling import generate
    from npgpt2.train import TrainConfig, evaluate, fit
    c = dict(JARGON, steps=steps or JARGON["steps"])
    log.info("jargon recipe: %s", c)
    tok = load_tokenizer()
    ids, _ = load_corpus(tok)
    train_tokens, val_tokens = split_corpus(ids)
    hparams = dict(n_vocab=tok.n_vocab, n_ctx=c["context"], n_embd=c["n_embd"], n_head=c["n_head"],
                   n_layer=c["n_layer"])
    model = init_model(hparams, seed=c["seed"])
    cfg = TrainConfig(dataset=str(CORPUS), run_name="jargon", steps=c["steps"], context=c["context"],
                      batch_size=c["batch_size"], learning_rate=c["learning_rate"], warmup=c["warmup"],
                      lr_schedule="cosine", weight_decay=0.1, grad_clip=1.0, seed=c["seed"],
                      val_every=c["val_every"], val_batch_size=8, val_batch_count=8, sample_every=0,
                      save_every=0, max_to_keep=1, plot=False, log_every=25)
    t0 = time.time()
    fit(model, train_tokens, cfg, val_tokens=val_tokens)
    seconds = time.time() - t0
    model = _int8_roundtrip(model, hparams, write_int8)  # measure and sample what is shipped
    val_loss, n = evaluate(model, val_tokens, c["context"])
    log.info("jargon: held-out loss %.3f nats over %d tokens (unigram entropy %.3f) after %d steps, %.0f s",
             val_loss, n, unigram_entropy(ids), c["steps"], seconds)
    samples = [p + tok.decode(generate(model, tok.encode(p), 48, temperature=0.8, top_k=40, seed=c["seed"] + i))
               for i, p in enumerate(PROMPTS)]

    def write(tmp):
        write_int8(tmp, hparams, dict(model.params))
        with open(Path(tmp) / SAMPLES_FILE, "w", encoding="utf-8") as f:
            f.write("".join(f"======== SAMPLE {i + 1} ========\n{t}\n" for i, t in enumerate(samples)))
    write_folder(out_dir, write)


def _int8_roundtrip(model, hparams, write_int8):
    """The model as the int8 folder loads it (dequantised to float32)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_int8(tmp, hparams, dict(model.params))
        return load_model(tmp)


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
