"""Check, with real TensorFlow, that a run folder written by `npgpt2.save_model` (what
`npgpt2 train` writes) reads like a released GPT-2 folder.

Run in the fixture environment (never in CI; it commits nothing):

    /opt/fixenv/bin/python tools/check_tf_reads.py

In a temporary folder it builds a small random GPT-2 with npgpt2.init_model, saves it twice
with save_model(step=..., keep=1) like a training run, then with TensorFlow:
`tf.train.latest_checkpoint` names the newest `model-<step>`, `tf.train.list_variables`
lists exactly OpenAI's variable names and shapes, and `tf.train.load_variable` returns every
tensor bit-exactly (TF verifies each tensor's crc32c as it reads). Prints one line per
check and exits non-zero on the first failure.
"""
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import npgpt2  # noqa: E402
from npgpt2.model import param_shapes  # noqa: E402


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        sys.exit(1)


def main():
    hparams = dict(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=3)
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run1")
        model = npgpt2.init_model(hparams, seed=5)
        npgpt2.save_model(model, run, step=10, keep=1)
        for p in model.params.values():  # a different second checkpoint, as after more training
            p += 0.25
        npgpt2.save_model(model, run, step=20, keep=1)
        check(sorted(os.listdir(run)) == sorted(["checkpoint", "encoder.json", "hparams.json", "vocab.bpe",
                                                  "model-20.index", "model-20.data-00000-of-00001"]),
              f"run folder holds the OpenAI layout, newest checkpoint only: {sorted(os.listdir(run))}")
        latest = tf.train.latest_checkpoint(run)
        check(latest == os.path.join(run, "model-20"), f"tf.train.latest_checkpoint -> {latest}")
        listed = dict(tf.train.list_variables(run))
        expected = {k: list(v) for k, v in param_shapes(hparams).items()}
        check(listed == expected, f"tf.train.list_variables: {len(listed)} variables, OpenAI names and shapes")
        bad = []
        for name, value in model.params.items():
            back = tf.train.load_variable(run, name)
            if back.dtype != np.float32 or back.tobytes() != np.asarray(value, np.float32).tobytes():
                bad.append(name)
        check(not bad, f"tf.train.load_variable bit-exact for all {len(model.params)} tensors (bad: {bad[:3]})")
        # and npgpt2 reads its own folder back the same way
        again = npgpt2.load_model(run)
        check(all(np.array_equal(again.params[k], v) for k, v in model.params.items()),
              "npgpt2.load_model reads the same values")
    print("all checks passed")


if __name__ == "__main__":
    main()
