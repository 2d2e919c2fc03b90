"""`npgpt2 demo`: train a small GPT-2 from scratch on the bundled Jargon File, offline.

The corpus is The Jargon File 4.4.7 (public domain; npgpt2/assets/jargon.txt.gz, made by
tools/extract_jargon.py from Debian's dict-jargon): ~1.3 MB of text, ~319k GPT-2 tokens.
It is tokenized with GPT-2's BPE; the model's vocabulary is just the GPT-2 tokens that
occur in it (~19.7k of 50,257, mapped to 0..K-1), which makes the output head 2.5x
cheaper and changes nothing else. The last 10% of the text is held out for validation.

A model that has learnt nothing beyond token frequencies scores the corpus' unigram
entropy; the demo reports it beside the validation loss, which must end well below it.
"""
import gzip
import logging
import math
import time
from pathlib import Path

import numpy as np

from .errors import Npgpt2Error
from .fsutil import atomic_write
from .model import init_model
from .train import TrainConfig, evaluate, fit

log = logging.getLogger(__name__)

CORPUS = Path(__file__).parent / "assets" / "jargon.txt.gz"
CORPUS_NAME = "The Jargon File 4.4.7 (public domain)"
SAMPLES_FILE = "samples.txt"

# 2-4 minutes on 2 cores (1.9 measured on an idle AMD EPYC VM);
# quick: about 15 s (plus Numba's compile on a first run), for tests
FULL = dict(n_embd=96, n_head=3, n_layer=3, context=64, batch_size=16, steps=500,
            learning_rate=3e-3, warmup=60, val_every=50, val_batch_count=8, eval_tokens=None)
QUICK = dict(n_embd=32, n_head=2, n_layer=1, context=16, batch_size=8, steps=40,
             learning_rate=1e-2, warmup=5, val_every=10, val_batch_count=2, eval_tokens=2000)
PROMPTS = ["hacker:", "kludge:", "The"]


def unigram_entropy(tokens):
    """-sum p log p (nats) of the token frequencies: the loss of the best context-free model."""
    counts = np.bincount(tokens)
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


def load_corpus(tokenizer):
    """(GPT-2 ids as uint16, the corpus text length in characters)."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        text = f.read()
    return np.asarray(tokenizer.encode(text), dtype=np.uint16), len(text)


def split_corpus(tokens):
    """(training tokens, held-out tokens): the first 90 % of the stream and the last 10 %."""
    split = int(tokens.size * 0.9)
    return tokens[:split], tokens[split:]


def preset(quick=False, steps=None):
    """The model and training settings of a demo run (steps overrides the preset's updates)."""
    out = dict(QUICK if quick else FULL)
    if steps is not None:
        out["steps"] = steps
    return out


def run_demo(steps=None, quick=False, seed=0, sample_num=None, sample_length=48,
             out_dir=None, on_step=None):
    """Train and evaluate; returns a dict with the numbers and the samples.

    steps overrides the preset's number of updates. out_dir (optional) gets a run folder
    that loads like any model folder (`npgpt2 prompt --models_dir <parent> --model_name
    <name>`): the checkpoint, compact_vocab.npy (compact id -> GPT-2 id, read by
    load_tokenizer; see compact_vocab.py), loss.png (with matplotlib) and samples.txt.
    """
    from .compact_vocab import VOCAB_FILE, CompactTokenizer
    from .sampling import generate
    from .tokenizer import load_tokenizer
    from .train import make_run_dir
    preset_ = preset(quick, steps)
    if out_dir is not None:
        if (Path(out_dir) / "checkpoint").exists() and not (Path(out_dir) / VOCAB_FILE).exists():
            # a fine-tune or a released model: the demo would prune its checkpoints
            raise Npgpt2Error(f"{out_dir}: holds a model that is not a demo run; give another --out")
        if (Path(out_dir) / "checkpoint").exists():
            from .checkpoint import latest_checkpoint
            try:
                name = Path(latest_checkpoint(str(out_dir))).name
            except Npgpt2Error:  # a damaged run is replaced all the same
                name = "unreadable"
            log.warning("%s: replacing the demo run there (%s); give another --out to keep it", out_dir, name)
        make_run_dir(out_dir)  # an unwritable --out fails now, not after training
    gpt2 = load_tokenizer()
    t0 = time.time()
    ids, n_chars = load_corpus(gpt2)
    vocab = np.unique(ids)                    # compact id -> GPT-2 id
    tok = CompactTokenizer(gpt2, vocab, "the demo's vocabulary")
    compact = tok.compact_ids(ids).astype(np.uint16)
    train_tokens, val_tokens = split_corpus(compact)
    H = unigram_entropy(compact)
    log.info("corpus: %s, %d characters, %d GPT-2 tokens, %d distinct (encoded in %.1f s)",
             CORPUS_NAME, n_chars, ids.size, vocab.size, time.time() - t0)
    log.info("unigram entropy of the corpus: %.3f nats/token (uniform over its vocabulary: %.3f)",
             H, math.log(vocab.size))

    hparams = dict(n_vocab=int(vocab.size), n_ctx=preset_["context"], n_embd=preset_["n_embd"],
                   n_head=preset_["n_head"], n_layer=preset_["n_layer"])
    model = init_model(hparams, seed=seed)
    n_params = sum(p.size for p in model.params.values())
    log.info("model: %s, %.2fM parameters, trained from scratch (GPT-2 init)", hparams, n_params / 1e6)
    cfg = TrainConfig(dataset=str(CORPUS), run_name="demo", steps=preset_["steps"],
                      context=preset_["context"], batch_size=preset_["batch_size"],
                      learning_rate=preset_["learning_rate"], warmup=preset_["warmup"],
                      lr_schedule="cosine", weight_decay=0.1, grad_clip=1.0, seed=seed,
                      val_every=preset_["val_every"], val_batch_size=8,
                      val_batch_count=preset_["val_batch_count"], sample_every=0,
                      save_every=0, max_to_keep=1, plot=False, log_every=25 if not quick else 10)
    if out_dir is not None:
        # written first: the run folder's ids are compact, and this maps them back to GPT-2's
        with atomic_write(Path(out_dir) / VOCAB_FILE) as f:
            np.save(f, vocab.astype(np.int64))
    t_train = time.time()
    result = fit(model, train_tokens, cfg, run_dir=out_dir, val_tokens=val_tokens, on_step=on_step)
    train_secs = time.time() - t_train

    files = {}
    if out_dir is not None:
        files["checkpoint"] = result["checkpoint"]
        from .plot import plot_losses
        files["loss.png"] = plot_losses(result["history"], Path(out_dir) / "loss.png",
                                        title=f"npgpt2 demo: {CORPUS_NAME}", reference=("unigram entropy", H))
    held_out = val_tokens if preset_["eval_tokens"] is None else val_tokens[:preset_["eval_tokens"]]
    val_loss, n_eval = evaluate(model, held_out, preset_["context"])
    log.info("validation loss over %d held-out tokens: %.3f nats (perplexity %.1f); "
             "unigram entropy %.3f", n_eval, val_loss, math.exp(val_loss), H)

    samples = []
    for i, prompt in enumerate(PROMPTS[:sample_num]):
        try:
            p_ids = tok.encode(prompt)
        except Npgpt2Error:  # a prompt token the corpus never uses
            continue
        out = generate(model, p_ids, min(sample_length, hparams["n_ctx"] - len(p_ids)),
                       temperature=0.8, top_k=40, seed=seed + i)
        samples.append(prompt + tok.decode(out))
    if out_dir is not None:
        files[SAMPLES_FILE] = Path(out_dir) / SAMPLES_FILE
        with atomic_write(files[SAMPLES_FILE], "w", encoding="utf-8") as f:
            f.write("".join(f"======== SAMPLE {i + 1} ========\n{t}\n" for i, t in enumerate(samples)))
    return dict(unigram_entropy=H, val_loss=val_loss, eval_tokens=n_eval, history=result["history"],
                steps=result["step"], train_seconds=train_secs, samples=samples, hparams=hparams,
                params=n_params, corpus=CORPUS_NAME, interrupted=result["interrupted"], files=files)
