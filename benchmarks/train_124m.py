"""A GPT-2 124M-shaped model with learned weights, for run.py's int8_quality_124M row.

    python benchmarks/train_124m.py DIR [--steps 250]

Real GPT-2 weights cannot be downloaded on this project's machines, so int8's quality at
124M is measured on weights we train here: random init (seed 0), then STEPS updates of
`npgpt2 train` (batch 4 x 128 tokens, AdamW, lr 6e-4 after 25 warm-up steps) on the first
90 % of the bundled corpus in GPT-2 ids -- the split the demo uses, so the last 10 % is
held out for `run.py --trained124 DIR`. 250 steps (~1.1 passes over the 287k training
tokens) took ~27 min on 2 shared cores. DIR ends up a model folder (it loads like one).
"""
import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="the model folder to write (its parent gets a work folder too)")
    ap.add_argument("--steps", type=int, default=250)
    args = ap.parse_args(argv)
    import numpy as np

    from npgpt2.demo import load_corpus, split_corpus
    from npgpt2.model import MODEL_HPARAMS, init_model, save_model
    from npgpt2.tokenizer import load_tokenizer
    out = args.dir.resolve()
    work = out.parent / (out.name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    ids, _ = load_corpus(load_tokenizer())
    np.savez(work / "train.npz", split_corpus(ids)[0])  # the demo's split; the rest is held out
    save_model(init_model(MODEL_HPARAMS["124M"], seed=0), work / "init")
    subprocess.run([sys.executable, "-m", "npgpt2.cli", "train", "--dataset", str(work / "train.npz"),
                    "--models_dir", str(work), "--model_name", "init",
                    "--checkpoint_dir", str(out.parent), "--run_name", out.name,
                    "--steps", str(args.steps), "--batch_size", "4", "--context", "128",
                    "--learning_rate", "6e-4", "--warmup", "25", "--sample_every", "0",
                    "--save_every", "50", "--seed", "0"], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
