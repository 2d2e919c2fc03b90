"""Write tests/fixtures/dtypes/: small checkpoints written by real TensorFlow for the reader's tests.

Run in the fixture environment (never in CI; versions in tools/fixtures-requirements.txt):

    /opt/fixenv/bin/python tools/make_dtype_fixture.py

Writes (values from a fixed seed; a re-run gives byte-identical checkpoints):
- model.ckpt.{index,data-00000-of-00001}: tf.raw_ops.SaveV2 of every dtype npgpt2 supports
  (float32, float16, float64, int32, int64, bool) with odd, 0-d and empty shapes, special float
  values, a non-ASCII name, a 300-byte name and 40 names sharing a prefix (several restart points).
- values.npz: the exact arrays given to SaveV2, keyed by tensor name.
- strings.ckpt.*: a float32 tensor and a DT_STRING tensor (npgpt2 must refuse the string one).
- partitioned.ckpt.*: tf.compat.v1.train.Saver of a variable split in 2 by a partitioner, plus a
  plain one (npgpt2 must refuse partitioned variables).
- checkpoint: written by tf.compat.v1.train.update_checkpoint_state with *absolute* paths under a
  folder that does not exist (as after moving a model folder), plus timestamp fields.
- README.md: this description.
"""
import os
import shutil
import sys

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "dtypes")
MOVED_FROM = "/home/someone/old-place/dtypes"


def supported_values():
    rng = np.random.default_rng(2024)
    f16 = rng.standard_normal((4, 7)).astype(np.float16)
    f16.flat[:6] = [np.inf, -np.inf, np.nan, -0.0, np.float16(6e-8), 65504]
    values = {
        "f32/odd": rng.standard_normal((3, 1, 5)).astype(np.float32),
        "f16/matrix": f16,
        "f64/vector": np.array([np.pi, -np.e, 1e-300, -1e300, 5e-324]),
        "f64/scalar": np.array(-2.5),
        "i32/scalar": np.array(-123, dtype=np.int32),
        "i32/range": np.arange(-5, 7, dtype=np.int32).reshape(2, 6),
        "i64/extremes": np.array([[2**62, -2**63, 2**63 - 1], [0, -1, 1]], dtype=np.int64),
        "bool/mask": rng.random((2, 2, 3)) < 0.5,
        "empty/f32": np.zeros((0,), np.float32),
        "empty/i64": np.zeros((3, 0, 2), np.int64),
        "unicod\u00e9/\u540d\u524d": rng.standard_normal(2).astype(np.float32),
        "long/" + "x" * 295: rng.standard_normal((1, 1)).astype(np.float32),
    }
    for i in range(40):
        values[f"many/layer{i:02d}/w"] = rng.standard_normal(i % 4 + 1).astype(np.float32)
    return values


def save_v2(prefix, tensors):
    names = list(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])


def check_readback(prefix, expected):
    """TensorFlow's own reader must give back exactly what was saved."""
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    assert set(shapes) == set(expected), set(shapes) ^ set(expected)
    for name, want in expected.items():
        got = reader.get_tensor(name)
        if want.dtype.kind == "S":
            assert got.tolist() == want.tolist(), name
        else:
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert got.tobytes() == want.tobytes(), name


def write_partitioned(prefix):
    graph = tf.Graph()
    with graph.as_default():
        v1 = tf.compat.v1
        part = v1.get_variable("part/w", shape=(6, 4), dtype=tf.float32,
                               initializer=v1.constant_initializer(0.5),
                               partitioner=v1.fixed_size_partitioner(2))
        plain = v1.get_variable("plain", initializer=np.ones(3, np.float32))
        saver = v1.train.Saver(save_relative_paths=True)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            saver.save(sess, prefix, write_meta_graph=False, write_state=False)
        del part, plain


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    values = supported_values()
    save_v2(os.path.join(OUT, "model.ckpt"), values)
    check_readback(os.path.join(OUT, "model.ckpt"), values)
    np.savez(os.path.join(OUT, "values.npz"), **values)

    strings = {"a_float": np.array([1.5, -2.0], np.float32), "text": np.array([b"hello", b"world!"])}
    save_v2(os.path.join(OUT, "strings.ckpt"), strings)
    check_readback(os.path.join(OUT, "strings.ckpt"), strings)

    write_partitioned(os.path.join(OUT, "partitioned.ckpt"))

    tf.compat.v1.train.update_checkpoint_state(
        OUT, model_checkpoint_path=MOVED_FROM + "/model.ckpt",
        all_model_checkpoint_paths=[MOVED_FROM + "/partitioned.ckpt", MOVED_FROM + "/model.ckpt"],
        all_model_checkpoint_timestamps=[1500000000.5, 1600000000.25],
        last_preserved_timestamp=1400000000.0)

    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("# tests/fixtures/dtypes: TensorFlow-written checkpoints for the checkpoint reader\n\n")
        f.write("Made by `tools/make_dtype_fixture.py`. ")
        f.write(__doc__.split("\n\n", 1)[1].replace("Writes (", "Files (", 1))
    for name in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, name)):8d}  {name}")
    print("TensorFlow", tf.__version__, "numpy", np.__version__, "python", sys.version.split()[0])


if __name__ == "__main__":
    main()
