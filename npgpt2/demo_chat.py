"""`npgpt2 demo --chat`: a model that answers questions about hacker jargon, trained offline.

The conversation set is built from the bundled Jargon File (npgpt2/assets/jargon.txt.gz): for
each entry whose first sentence is short, a question in one of a few phrasings ("What does
'kludge' mean?") and, as the answer, that sentence of the entry's definition (pronunciation,
part of speech and etymology removed; cross-reference braces dropped). The terms are split at
random (seeded) into training, validation (early stopping) and held-out test terms; no
question about a validation or test term, and no text of their entries, is ever trained on.

The run has two stages, both the demo's recipe (model widths, AdamW, cosine schedule):
1. pretrain: the model learns the language from the training terms' entries, as plain text;
2. fine-tune: on the training conversations, encoded as `npgpt2 encode --format chat` does
   (chat_data.py), with the loss on the answers only (the loss mask), validated on the
   validation conversations with early stopping.
The run folder loads for `npgpt2 chat` (its chat.json holds the Q:/A: tags). The vocabulary is
the GPT-2 tokens of the corpus and the conversations plus <|endoftext|> (compact_vocab.py).
"""
import gzip
import logging
import re
import time
from pathlib import Path

import numpy as np

from .demo import CORPUS
from .errors import Npgpt2Error
from .fsutil import atomic_write

log = logging.getLogger(__name__)

PHRASINGS = ("What does '{}' mean?", "What is {}?", "Define {}.", "What is meant by '{}'?")
TEMPLATE = {"user_tag": "Q:", "bot_tag": "A:", "system": ""}
MAX_ANSWER_TOKENS = 32  # an entry whose first sentence is longer is left out
SPLIT = (0.9, 0.05, 0.05)  # train, validation, test terms
# stage 2 starts from stage 1's weights: a lower peak rate (tune_lr) and a short warmup
FULL = dict(n_embd=96, n_head=3, n_layer=3, context=128, batch_size=8, pretrain_steps=500, steps=400,
            learning_rate=3e-3, warmup=40, tune_lr=1e-3, tune_warmup=10, val_every=25, val_batch_count=8,
            early_stop=6)
QUICK = dict(n_embd=32, n_head=2, n_layer=1, context=64, batch_size=4, pretrain_steps=20, steps=20,
             learning_rate=1e-2, warmup=4, tune_lr=3e-3, tune_warmup=2, val_every=10, val_batch_count=2,
             early_stop=4)

# what may precede a definition, in any order: a pronunciation, a part of speech, an etymology, a sense number
_LEAD = re.compile(r"(/[^/]*/|[a-z]+\.|\[[^\]]*\]|\d+\.|,)\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z{‘“(\[]|\d+\.)")


def entries(text=None):
    """[(term, definition body)] of the Jargon File, in its (alphabetical) order."""
    if text is None:
        with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
            text = f.read()
    out = []
    for para in text.strip().split("\n\n"):
        term, sep, body = para.partition(": ")
        if sep:
            out.append((term, body))
    return out


def short_definition(body):
    """The first sentence of an entry's definition, without pronunciation, part of speech,
    etymology, sense number and cross-reference braces; None when nothing is left."""
    while (m := _LEAD.match(body)) and m.end():
        body = body[m.end():]
    body = body.replace("{", "").replace("}", "").strip()
    first = _SENTENCE_END.split(body, maxsplit=1)[0].strip()
    return first if len(first) > 3 else None


def conversation(term, answer, phrasing):
    return {"messages": [{"role": "user", "content": PHRASINGS[phrasing].format(term)},
                         {"role": "assistant", "content": answer}]}


def build_conversations(tokenizer, seed=0):
    """{"train", "val", "test": [conversation]} and "train_text": the training terms' entries as
    plain text (what stage 1 learns from). Each training term is asked in two phrasings."""
    rng = np.random.default_rng(seed)
    every = entries()
    items = []
    for term, body in every:
        answer = short_definition(body)
        if answer and len(tokenizer.encode(" " + answer)) <= MAX_ANSWER_TOKENS:
            items.append((term, answer, body))
    order = rng.permutation(len(items))
    n_train, n_val = int(len(items) * SPLIT[0]), int(len(items) * SPLIT[1])
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    out = {}
    for name, idx in parts.items():
        convs = []
        for i in sorted(idx):
            term, answer, _ = items[i]
            picks = rng.choice(len(PHRASINGS), size=2 if name == "train" else 1, replace=False)
            convs += [conversation(term, answer, int(p)) for p in picks]
        out[name] = convs
    # stage 1's text: the training terms' entries and those no question is asked about
    train_terms, asked = {items[i][0] for i in parts["train"]}, {it[0] for it in items}
    out["train_text"] = "\n\n".join(f"{t}: {b}" for t, b in every if t in train_terms or t not in asked) + "\n"
    return out


def write_jsonl(convs, path):
    import json
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs))


def build_vocab(tokenizer, data):
    """The GPT-2 ids of the corpus, of every conversation's transcript and <|endoftext|>, sorted."""
    from . import chat
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        ids = set(tokenizer.encode(f.read()))
    for name in ("train", "val", "test"):
        for c in data[name]:
            turns = [(chat.USER if m["role"] == "user" else chat.BOT, m["content"]) for m in c["messages"]]
            ids.update(tokenizer.encode(chat.transcript_text(turns, TEMPLATE["user_tag"], TEMPLATE["bot_tag"])))
    ids.add(tokenizer.eot_token)
    return np.array(sorted(ids), dtype=np.int64)


def prepare(out_dir, seed=0):
    """Build the conversation set and write it into out_dir: conversations-{train,val,test}.jsonl,
    compact_vocab.npy, chat-{train,val}.npz (encoded as `encode --format chat` does).
    Returns a dict: tokenizer, data (build_conversations), and the paths."""
    from .chat_data import encode_dataset
    from .compact_vocab import VOCAB_FILE, CompactTokenizer
    from .tokenizer import load_tokenizer
    out_dir = Path(out_dir)
    gpt2 = load_tokenizer()
    data = build_conversations(gpt2, seed)
    vocab = build_vocab(gpt2, data)
    tok = CompactTokenizer(gpt2, vocab, "the chat demo's vocabulary")
    with atomic_write(out_dir / VOCAB_FILE) as f:
        np.save(f, vocab)
    paths = {}
    for name in ("train", "val", "test"):
        paths[name] = out_dir / f"conversations-{name}.jsonl"
        write_jsonl(data[name], paths[name])
    for name in ("train", "val"):
        paths[name + "_npz"] = out_dir / f"chat-{name}.npz"
        encode_dataset(paths[name], paths[name + "_npz"], tok, "chat", TEMPLATE["user_tag"], TEMPLATE["bot_tag"])
    log.info("conversations: %d training (%d terms x 2 phrasings), %d validation, %d held-out test; vocabulary %d",
             len(data["train"]), len(data["train"]) // 2, len(data["val"]), len(data["test"]), vocab.size)
    return {"tokenizer": tok, "data": data, "paths": paths, "vocab": vocab}


def stage_configs(preset, seed=0, steps=None, train_on="assistant"):
    """(pretrain TrainConfig, fine-tune TrainConfig) of the recipe."""
    from .train import TrainConfig
    common = dict(context=preset["context"], batch_size=preset["batch_size"], lr_schedule="cosine",
                  weight_decay=0.1, grad_clip=1.0, seed=seed, sample_every=0, save_every=0, max_to_keep=1,
                  plot=False, log_every=25)
    pre = TrainConfig(dataset="jargon (training terms)", run_name="pretrain", steps=preset["pretrain_steps"],
                      learning_rate=preset["learning_rate"], warmup=preset["warmup"], **common)
    tune = TrainConfig(dataset="chat-train.npz", run_name="chat", steps=steps or preset["steps"], train_on=train_on,
                       learning_rate=preset["tune_lr"], warmup=preset["tune_warmup"], val_every=preset["val_every"],
                       val_batch_size=8, val_batch_count=preset["val_batch_count"], early_stop=preset["early_stop"],
                       **common)
    return pre, tune


def pretrain(prep, preset, seed=0, on_step=None):
    """Stage 1: a GPT-2 of the demo's widths from scratch on the training terms' entries."""
    from .model import init_model
    from .train import fit
    tok = prep["tokenizer"]
    tokens = np.asarray(tok.encode(prep["data"]["train_text"]), dtype=np.uint16)
    hparams = dict(n_vocab=int(prep["vocab"].size), n_ctx=preset["context"], n_embd=preset["n_embd"],
                   n_head=preset["n_head"], n_layer=preset["n_layer"])
    model = init_model(hparams, seed=seed)
    cfg, _ = stage_configs(preset, seed)
    log.info("stage 1: pretraining on %d tokens of the training terms' entries", tokens.size)
    fit(model, tokens, cfg, on_step=on_step)
    return model


def finetune(model, prep, preset, out_dir=None, seed=0, steps=None, train_on="assistant", on_step=None):
    """Stage 2: the conversations, loss on the answers (train_on="all": on every token)."""
    from .chat_data import load_masked_dataset, training_mask
    from .train import fit
    _, cfg = stage_configs(preset, seed, steps, train_on)
    tokens, mask, template = load_masked_dataset(str(prep["paths"]["train_npz"]))
    val, val_mask, _ = load_masked_dataset(str(prep["paths"]["val_npz"]))
    mask = training_mask(train_on, mask, "chat-train.npz")
    val_mask = val_mask if mask is not None else None
    log.info("stage 2: fine-tuning on %d conversations (%d tokens, loss on %s)", len(prep["data"]["train"]),
             tokens.size, "the answers" if mask is not None else "every token")
    return fit(model, tokens, cfg, run_dir=out_dir, val_tokens=val, on_step=on_step, mask=mask, val_mask=val_mask,
               template=template)


def answers(model, tokenizer, questions, length=100):
    """[(question, greedy reply, whether it ended by itself)] from fresh ChatSessions."""
    from .chat import ChatSession
    out = []
    for q in questions:
        session = ChatSession(model, tokenizer, length=length, temperature=0,
                              user_tag=TEMPLATE["user_tag"], bot_tag=TEMPLATE["bot_tag"])
        reply = session.reply(q)
        out.append((q, reply, session.ended))
    return out


def run_chat_demo(out_dir, quick=False, seed=0, steps=None, on_step=None, n_answers=4):
    """Both stages into out_dir (a run folder that loads for `npgpt2 chat`); returns a dict with
    the numbers and a few greedy answers to held-out questions."""
    from .compact_vocab import VOCAB_FILE
    from .train import make_run_dir
    out_dir = Path(out_dir)
    if (out_dir / "checkpoint").exists() and not (out_dir / VOCAB_FILE).exists():
        raise Npgpt2Error(f"{out_dir}: holds a model that is not a demo run; give another --out")
    make_run_dir(out_dir)
    preset = dict(QUICK if quick else FULL)
    t0 = time.time()
    prep = prepare(out_dir, seed)
    model = pretrain(prep, preset, seed, on_step)
    t1 = time.time()
    result = finetune(model, prep, preset, out_dir, seed, steps, on_step=on_step)
    t2 = time.time()
    questions = [c["messages"][0]["content"] for c in prep["data"]["test"][:n_answers]]
    return dict(pretrain_seconds=t1 - t0, finetune_seconds=t2 - t1, steps=result["step"],
                early_stopped=result["early_stopped"], history=result["history"], checkpoint=result["checkpoint"],
                n_train=len(prep["data"]["train"]), n_test=len(prep["data"]["test"]),
                answers=answers(model, prep["tokenizer"], questions, length=model.hparams["n_ctx"] // 2))
