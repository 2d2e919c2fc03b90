"""Check, with real TensorFlow, that checkpoints written by npgpt2.checkpoint are what TF writes.

Run in the fixture environment (never in CI; it commits nothing):

    /opt/fixenv/bin/python tools/make_checkpoint_fixture_check.py

In a temporary folder it
1. writes tensors of every supported dtype and odd shape (0-d, empty, a 40 MB one that spans
   TF's 8 MB write buffer, 8000 small ones with long names so the index has several 256 KiB
   blocks) with npgpt2's `write_checkpoint`, then reads every one back with TensorFlow
   (`tf.train.list_variables`, `tf.train.load_variable`, which verifies each crc32c) bit-exactly;
2. writes the same tensors with TensorFlow's SaveV2 (names in sorted order, as tf.train.Saver
   passes them) and compares both files byte for byte;
3. writes a `checkpoint` state file with `write_checkpoint_state` and with TF's
   `update_checkpoint_state`, compares them byte for byte, and checks `tf.train.latest_checkpoint`;
4. reads TF's files back with npgpt2's `read_checkpoint` (verify on, plain and memory-mapped).
Prints one line per check and exits non-zero on the first failure.
"""
import os
import sys
import tempfile
import types

import numpy as np
import tensorflow as tf

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# Import only the checkpoint subpackage (the rest of npgpt2 is not needed here).
_pkg = types.ModuleType("npgpt2")
_pkg.__path__ = [os.path.join(REPO, "npgpt2")]
sys.modules["npgpt2"] = _pkg
from npgpt2.checkpoint import read_checkpoint, write_checkpoint, write_checkpoint_state  # noqa: E402


def tensors():
    rng = np.random.default_rng(11)
    t = {
        "a/f32": rng.standard_normal((3, 1, 5)).astype(np.float32),
        "a/f16": rng.standard_normal((7,)).astype(np.float16),
        "a/f64": np.array(np.pi),
        "a/i32": np.arange(-6, 6, dtype=np.int32).reshape(3, 2, 2),
        "a/i64": np.array([2**63 - 1, -2**63, 0], dtype=np.int64),
        "a/bool": rng.random((2, 3)) < 0.5,
        "a/empty": np.zeros((2, 0), np.float32),
        "a/scalar_i64": np.array(42, np.int64),
        "big/matrix": rng.standard_normal((2500, 4000)).astype(np.float32),  # 40 MB
        "unicod\u00e9/\u540d\u524d": np.ones(3, np.float16),
    }
    for i in range(8000):  # the index number comes early, so ~90 bytes per key are not shared
        t[f"many/t{i:05d}/" + "w" * 80] = np.full(i % 3 + 1, i, dtype=np.float32)
    return t


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        sys.exit(1)


def tf_reads_back(prefix, expected):
    listed = dict(tf.train.list_variables(prefix))
    check(set(listed) == set(expected), f"tf.train.list_variables names ({len(listed)})")
    check(all(tuple(listed[k]) == v.shape for k, v in expected.items()),
          "tf.train.list_variables shapes")
    reader = tf.train.load_checkpoint(prefix)  # same reader tf.train.load_variable uses
    bad = [k for k, v in expected.items()
           if (lambda g: g.dtype != v.dtype or g.shape != v.shape or g.tobytes() != v.tobytes())(
               np.asarray(reader.get_tensor(k)))]
    check(not bad, f"tf.train.load_variable bit-exact for every tensor (mismatches: {bad[:3]})")
    k = "a/f16"
    check(np.asarray(tf.train.load_variable(prefix, k)).tobytes() == expected[k].tobytes(),
          "tf.train.load_variable itself")


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def main():
    expected = tensors()
    with tempfile.TemporaryDirectory() as tmp:
        ours = os.path.join(tmp, "ours", "model-100")
        write_checkpoint(ours, expected)
        size = os.path.getsize(ours + ".index")
        print(f"      npgpt2 wrote {len(expected)} tensors; index {size} bytes")
        check(size > 2 * 262144, "index spans several 256 KiB blocks")
        tf_reads_back(ours, expected)

        theirs = os.path.join(tmp, "tf", "model-100")
        names = sorted(expected, key=lambda s: s.encode("utf-8"))
        tf.raw_ops.SaveV2(prefix=theirs, tensor_names=names, shape_and_slices=[""] * len(names),
                          tensors=[tf.constant(expected[n]) for n in names])
        check(same_bytes(ours + ".index", theirs + ".index"),
              ".index byte-identical to TensorFlow's SaveV2")
        check(same_bytes(ours + ".data-00000-of-00001", theirs + ".data-00000-of-00001"),
              ".data byte-identical to TensorFlow's SaveV2")

        for mmap in (False, True):
            got = read_checkpoint(theirs, verify=True, mmap=mmap)
            bad = [k for k, v in expected.items()
                   if got[k].dtype != v.dtype or got[k].shape != v.shape or got[k].tobytes() != v.tobytes()]
            check(set(got) == set(expected) and not bad,
                  f"npgpt2 read_checkpoint(mmap={mmap}) of TF's files bit-exact")

        os.makedirs(os.path.join(tmp, "state_tf"))
        write_checkpoint_state(os.path.join(tmp, "ours"), "model-100", ["model-50", "model-100"])
        tf.compat.v1.train.update_checkpoint_state(
            os.path.join(tmp, "state_tf"), "model-100", ["model-50", "model-100"])
        check(same_bytes(os.path.join(tmp, "ours", "checkpoint"), os.path.join(tmp, "state_tf", "checkpoint")),
              "`checkpoint` file byte-identical to tf.compat.v1.train.update_checkpoint_state")
        latest = tf.train.latest_checkpoint(os.path.join(tmp, "ours"))
        check(latest == ours, f"tf.train.latest_checkpoint follows our state file ({latest})")
    print("TensorFlow", tf.__version__, "numpy", np.__version__)


if __name__ == "__main__":
    main()
