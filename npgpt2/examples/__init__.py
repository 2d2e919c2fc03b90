"""Trained models shipped with npgpt2, to look inside (tools/train_examples.py made them).

    import npgpt2
    model = npgpt2.load_model(npgpt2.example_dir("induction"))
    enc = npgpt2.load_tokenizer(npgpt2.example_dir("induction"))

Each is an ordinary OpenAI-layout model folder (hparams.json, checkpoint, model.ckpt.*); with
no encoder.json/vocab.bpe of its own, load_tokenizer uses the GPT-2 files packaged with npgpt2.
"induction" has a compact vocabulary (compact_vocab.npy, see compact_vocab.py).

- "induction": 2 layers, 2 heads, n_embd 64, n_ctx 32; its vocabulary is 128 GPT-2 tokens, 64
  short English words with and without a leading space ("cat", " cat", ...). Trained 6000 steps
  (tools/train_examples.py's INDUCTION recipe: lr 1e-3, no weight decay on wte/wpe) on random
  rows in which a span of 3-16 tokens loops from a random start to the end of the row. What it
  learnt (tests/test_examples.py measures it): the textbook induction circuit. Layer 0's heads
  attend to the token before (the best 0.93, 0.77, 0.68 over repeats of period 8, 12, 16: it
  fades with position); layer 1's two heads attend to the token right after the previous
  occurrence of the current one (0.67-0.74 on t - period + 1; 0.02-0.04 one place further).
  Loss on the first copy of a span 4.9-5.0 nats (chance: log 128 = 4.85); on the second copy,
  from its second token on, 0.04-0.10; with layer 1's attention zeroed, 6.6.
  How other recipes went (the record of the runs that led here):
  An earlier shipped model (4 heads, random-offset repeats plus a quarter of rows where each
  token is, with probability 0.8, a fixed permutation of the token two back) formed a
  previous-token head (0.99) but layer-1 heads that attend two places after the previous
  occurrence (t - period + 2): they match two tokens, so each copy's first token was missed
  (second copy 0.6-1.1 nats).
  Runs without those rows (pure repeats; widths 64-128, 1-4 heads, n_ctx 16-64, up to 10k
  steps, tried since) either stayed at the in-context unigram
  plateau or formed other induction circuits: layer-0 heads at fixed offsets (1 and 3, or 3 and
  4) with a layer-1 head that matches through one and copies through the other (attending
  t - period + 2 or + 4); none formed the textbook one.
  Later tries (`--set` knobs in tools/train_examples.py, off in the shipped recipe; 2-5k steps
  each): a vocabulary of 256-1500 GPT-2 " word" tokens (vocab=N, so a token rarely recurs by
  chance) with pure repeats stays at the in-context unigram plateau (V 1000, n_embd 64 or 128:
  second copy 2.6-5.4 nats, induction 0.05), and with skip-bigram rows all layer-0 heads turn
  previous-token heads (0.8) but no layer-1 head follows. Rows that loop a span from near
  the start (loop_rows=1, lr 1e-3, no decay on wte/wpe) break the plateau within 1000 steps
  and give the textbook layer-1 head (V 128, 2 heads: 0.75 on t - period + 1, 0.04 one place
  further; second copy 0.03-0.4 nats), but the previous-token head only covers the positions
  where the loops start (0.93 over 16 tokens, 0.61 over 32) and copies whose first occurrence
  sits late were missed; spans of 3-12 also left copies 16 apart unpredicted (3.4-3.9 nats).
  Closest so far, spans 3-16 (`--set skip_rows=0 --set loop_rows=1.0 --set learning_rate=1e-3
  --set decay_embeddings=False --set n_head=2 --set "span=(3,17)"`, 6000 steps, ~100 s): the textbook
  head in layer 1 (0.65-0.74 on t - period + 1 for periods 8, 12, 16; 0.03 one further), second
  copy 0.04-0.10 nats at every offset tried, first 4.9-5.1, but the previous-token head fades
  with position (0.93, 0.77, 0.68 over 16, 24, 32 tokens); with loop_switch=2000,
  loop_start2=16 it holds better (0.98, 0.96, 0.83) but second copy 0.05-0.54 nats. With
  V 512-1000 the loops formed other circuits (t - period + 2, or layer-1 heads on
  t - period + 1 at 0.33 with no previous-token head).
- "jargon": the `npgpt2 demo` recipe (3 layers, n_embd 96, n_ctx 64, 500 steps on The Jargon
  File) with the full GPT-2 vocabulary (n_vocab 50257, no compact_vocab.npy: any text encodes),
  stored with int8 weights (`quant.json`, HACKING.md "int8 folder"; 5.4 MB); load_model
  dequantises them to float32 (or keeps them int8 with dtype="int8"). Held-out loss 5.91 nats
  (unigram entropy 7.23).
"""
from pathlib import Path

from ..errors import Npgpt2Error

HERE = Path(__file__).parent
NAMES = ("induction", "jargon")

# The induction model's vocabulary: 64 words, each one GPT-2 token with and without a space
WORDS = ("cat dog red blue sun moon tree fish bird car road rain wind fire stone gold bread cake cup box "
         "hat door wall book pen ship boat star sky sea hill king man boy girl baby friend house town city "
         "farm horse cow egg apple rice corn wood iron rock sand leaf rose green black white brown big small "
         "old new hot cold fast").split()


def example_dir(name):
    """The folder of the shipped example model `name` ("induction" or "jargon") as a Path."""
    if name not in NAMES:
        raise Npgpt2Error(f"--example: unknown example {name!r} (choose one of {', '.join(NAMES)})")
    folder = HERE / name
    if not (folder / "hparams.json").is_file():
        raise Npgpt2Error(f"{folder}: the example model is missing (make it with: "
                          f"python tools/train_examples.py {name})")
    return folder
