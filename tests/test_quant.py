"""8-bit weights (quant.py, quant_kernels.py): quantisation bounds, the int8 matmul against an
independent float64 dequantise-then-matmul, the Numba twin against the plain one, the int8
folder format, and int8 models against the fixtures' Hugging Face logits."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npgpt2 import layers, quant
from npgpt2.errors import Npgpt2Error
from npgpt2.model import load_model, save_model

FIX = Path(__file__).parent / "fixtures"
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}
# int8 logits against HF's float32 logits on the fixtures (random weights): max |diff| as a
# fraction of the largest |logit|. Measured 1.1 % (tiny) and 1.0 % (full).
FIXTURE_REL_TOL = 0.03


def ref_dequant64(q, scale):
    """Independent of the code under test: float64 q * scale, each scale repeated over its group."""
    G = q.shape[1] // scale.shape[1]
    return q.astype(np.float64) * np.repeat(scale.astype(np.float64), G, axis=1)


def rand_matrix(rng, R, K):
    m = rng.standard_normal((R, K)).astype(np.float32)
    m[0] = 0  # an all-zero output channel: scale 0, q 0
    m[1, :5] *= 50  # an outlier: one channel with a much larger range
    return m


@pytest.mark.parametrize("group", [None, 64, 32])
def test_round_trip_error_within_half_a_step(group):
    rng = np.random.default_rng(0)
    m = rand_matrix(rng, 37, 192)
    w = quant.quantize(m, group)
    G = 192 if group is None else group
    assert w.q.dtype == np.int8 and w.q.shape == (37, 192) and w.scale.shape == (37, 192 // G)
    assert np.abs(w.q.astype(int)).max() <= 127
    groups = m.reshape(37, 192 // G, G)
    np.testing.assert_allclose(w.scale, np.abs(groups).max(-1) / 127, rtol=1e-6)
    err = np.abs(ref_dequant64(w.q, w.scale) - m)
    bound = np.repeat(w.scale.astype(np.float64), G, axis=1) / 2
    assert np.all(err <= bound * (1 + 1e-6) + 1e-12)
    assert np.all(w.q[0] == 0) and np.all(w.scale[0] == 0)
    assert np.array_equal(w.dequantize(), w.rows(slice(None)))
    assert w.T.shape == (192, 37) and np.array_equal(w.T.dequantize(), w.dequantize().T)


def test_group_size_must_divide_the_inputs():
    with pytest.raises(Npgpt2Error, match="group_size"):
        quant.quantize(np.ones((4, 10), np.float32), 4)


@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("N", [1, 3, 8, 9, 40])
def test_plain_int8_matmul_matches_float64_dequantise_then_matmul(N, group):
    rng = np.random.default_rng(N)
    w = quant.quantize(rand_matrix(rng, 96, 128), group)
    x = rng.standard_normal((1, N, 128)).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    expected = x.astype(np.float64) @ ref_dequant64(w.q, w.scale).T + b  # [1, N, 96]
    got = layers.matmul_forward(x, w.T, b)
    assert got.dtype == np.float32 and got.shape == (1, N, 96)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("N", [1, 2, 16, 17, 70])
@pytest.mark.parametrize("R", [96, 3000])  # 3000 x 128: the parallel loops
def test_numba_twin_equals_plain(N, R, group, monkeypatch):
    kernels = pytest.importorskip("npgpt2.kernels")
    from npgpt2 import quant_kernels
    # the dequantising kernels (float activations); the default int8 x int8 GEMV of <= 16
    # rows is held to its own reference in test_quant_int8dot.py
    monkeypatch.setattr(quant_kernels, "KERNEL", "dequant")
    rng = np.random.default_rng(R + N)
    w = quant.quantize(rand_matrix(rng, R, 128), group)
    x = rng.standard_normal((N, 1, 128)).astype(np.float32)
    b = rng.standard_normal(R).astype(np.float32)
    plain = layers.matmul_forward(x, w.T, b)
    fast = kernels.matmul_forward(x, w.T, b)
    assert fast.shape == plain.shape == (N, 1, R) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-4)
    head = quant_kernels.matmul_forward(x, w.T, None)  # the tied head: no bias
    np.testing.assert_allclose(head, plain - b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("N", [17, 32])  # a prompt: the GEMV kernel with the rows split between threads
@pytest.mark.parametrize("R", [7, 3000])
def test_parallel_gemv_equals_plain(N, R, monkeypatch):
    pytest.importorskip("npgpt2.kernels")
    from npgpt2 import quant_kernels
    calls = []
    monkeypatch.setattr(quant_kernels.threads, "numba_threads", lambda work: 2)  # as if a core were free
    monkeypatch.setattr(quant_kernels, "_gemv", lambda *a: calls.append(a))  # must not be taken
    rng = np.random.default_rng(R * N)
    w = quant.quantize(rand_matrix(rng, R, 128), 64)
    x = rng.standard_normal((1, N, 128)).astype(np.float32)
    b = rng.standard_normal(R).astype(np.float32)
    fast = quant_kernels.matmul_forward(x, w.T, b)
    np.testing.assert_allclose(fast, layers.matmul_forward(x, w.T, b), rtol=1e-5, atol=1e-4)
    assert calls == []


def test_embedding_rows_are_dequantised_rows():
    rng = np.random.default_rng(3)
    w = quant.quantize(rand_matrix(rng, 50, 16))
    ids = np.array([[3, 0, 49], [3, 3, 7]])
    np.testing.assert_array_equal(w[ids], ref_dequant64(w.q, w.scale)[ids].astype(np.float32))


@pytest.mark.parametrize("name,key,last", [("tiny", "logits_f32", None), ("full", "logits_f32_last2", 2)])
@pytest.mark.parametrize("plain", [False, True])
def test_int8_model_logits_near_hf_float32(name, key, last, plain, monkeypatch):
    if plain:
        monkeypatch.setenv("NPGPT2_PLAIN", "1")
    ref = np.load(FIX / f"{name}_reference.npz")
    model = load_model(FIX / name, dtype="int8")
    assert model.weight_dtype == "int8" and model.dtype == np.float32
    assert isinstance(model.params["model/h0/attn/c_attn/w"], quant.QuantizedWeight)
    logits = model.forward(ref["tokens"])
    logits = logits if last is None else logits[:, -last:]
    expected = ref[key]
    assert np.abs(logits - expected).max() <= FIXTURE_REL_TOL * np.abs(expected).max()
    assert np.array_equal(logits.argmax(-1), expected.argmax(-1))


def test_int8_decode_with_cache_equals_full_recompute():
    model = load_model(FIX / "full", dtype="int8")
    tokens = np.array([[464, 3290, 318, 257, 922, 11]])
    full = model.forward(tokens)
    cache = model.new_cache(1)
    steps = [model.forward(tokens[:, :3], cache=cache)] + [
        model.forward(tokens[:, t:t + 1], cache=cache) for t in range(3, 6)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=2e-4)


def test_convert_int8_round_trip(tmp_path):
    from npgpt2.convert import convert
    dst = convert(FIX / "full", tmp_path / "full8", dtype="int8")
    info = quant.read_quant_info(dst)
    assert info["dtype"] == "int8" and info["group_size"] is None and info["embedding"] is True
    on_load = load_model(FIX / "full", dtype="int8")
    from_file = load_model(dst, dtype="int8")
    for name, w in on_load.params.items():
        got = from_file.params[name]
        if isinstance(w, quant.QuantizedWeight):
            assert got.shape == w.shape and got.transposed == w.transposed
            assert np.array_equal(got.q, w.q) and np.array_equal(got.scale, w.scale)
        else:
            assert np.array_equal(got, w)
    # loaded without dtype="int8": the dequantised float32 weights, in the checkpoint's shapes
    f32 = load_model(dst)
    assert f32.weight_dtype == "float32"
    w = from_file.params["model/h1/mlp/c_fc/w"]
    np.testing.assert_array_equal(f32.params["model/h1/mlp/c_fc/w"][0], ref_dequant64(w.q, w.scale).T.astype(np.float32))
    with pytest.raises(Npgpt2Error, match="int8"):
        convert(FIX / "full", tmp_path / "hf8", fmt="hf", dtype="int8")
    with pytest.raises(Npgpt2Error, match="quant.json"):
        convert(dst, tmp_path / "again", dtype="int8")


def test_int8_folder_with_a_wrong_tensor_is_one_line_error(tmp_path):
    from npgpt2.checkpoint import read_checkpoint, write_checkpoint
    from npgpt2.convert import convert
    dst = convert(FIX / "full", tmp_path / "full8", dtype="int8")
    tensors = dict(read_checkpoint(str(dst / "model.ckpt")))
    tensors["model/h0/mlp/c_fc/w/scale"] = tensors["model/h0/mlp/c_fc/w/scale"][:3]
    write_checkpoint(str(dst / "model.ckpt"), tensors)
    with pytest.raises(Npgpt2Error) as e:
        load_model(dst, dtype="int8")
    assert "model/h0/mlp/c_fc/w" in str(e.value) and "\n" not in str(e.value)


# Quantising at load peaks at one float32 tensor's pages above the int8 result; reading the whole
# float32 mapping first (the finite check did, before quantising) put all of it in RSS: 1558M's
# int8 load peaked at 6.1 GiB against the < 2.5 GiB it is meant to need.
LOAD_PEAK_CODE = """
import sys
import npgpt2
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
npgpt2.load_model(sys.argv[2], dtype="int8")  # the code's one-time costs (imports, cached kernels) first
before = hwm()
npgpt2.load_model(sys.argv[1], dtype="int8")
print(hwm() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_int8_load_of_a_float32_folder_never_maps_the_whole_file_in(tmp_path):
    from npgpt2.model import init_model
    hp = dict(n_vocab=2000, n_ctx=64, n_embd=256, n_head=4, n_layer=48)  # many small tensors
    save_model(init_model(hp, seed=0), tmp_path / "m")
    file_bytes = sum(f.stat().st_size for f in (tmp_path / "m").glob("*.data-*"))  # ~155 MB float32
    r = subprocess.run([sys.executable, "-c", LOAD_PEAK_CODE, str(tmp_path / "m"), str(FIX / "tiny")], capture_output=True,
                       text=True, env=ENV, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    grew = int(r.stdout.split()[-1])  # the int8 weights are a quarter of the file, plus one tensor's pages
    print(f"peak RSS grew {grew / 2**20:.0f} MiB loading a {file_bytes / 2**20:.0f} MiB file")
    assert grew < file_bytes / 2, f"peak RSS grew {grew / 2**20:.0f} MiB loading a {file_bytes / 2**20:.0f} MiB file"


def test_int8_load_refuses_a_non_finite_float_weight_in_one_line(tmp_path):
    """The finite check runs tensor by tensor inside quantize_params for dtype="int8": still one
    line naming the tensor, before any NumPy warning about casting a NaN to int8."""
    import shutil
    import warnings

    from npgpt2.checkpoint import read_checkpoint, write_checkpoint
    shutil.copytree(FIX / "tiny", tmp_path / "tiny")
    prefix = str(tmp_path / "tiny" / "model.ckpt")
    tensors = dict(read_checkpoint(prefix))
    tensors["model/h1/mlp/c_fc/w"] = tensors["model/h1/mlp/c_fc/w"].copy()
    tensors["model/h1/mlp/c_fc/w"].flat[3] = np.inf
    write_checkpoint(prefix, tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Npgpt2Error) as e:
            load_model(tmp_path / "tiny", dtype="int8")
    assert "model/h1/mlp/c_fc/w" in str(e.value) and "NaN or infinite" in str(e.value) and "\n" not in str(e.value)
    with np.errstate(invalid="ignore"):  # quantising the inf (the user skipped the checks)
        load_model(tmp_path / "tiny", dtype="int8", verify=False)  # verify=False skips the check, as the CRCs


def test_training_and_saving_an_int8_model_are_refused(tmp_path):
    model = load_model(FIX / "tiny", dtype="int8")
    tokens = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(Npgpt2Error) as e:
        model.loss_and_grads(tokens, tokens)
    assert "int8" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(Npgpt2Error, match="convert"):
        save_model(model, tmp_path / "m")


def run(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "npgpt2.cli", *args], input=stdin, text=True,
                          capture_output=True, timeout=300, env=ENV, encoding="utf-8", check=False)


def test_cli_dtype_int8_end_to_end(tmp_path):
    where = ["--models_dir", str(FIX), "--model_name", "full"]
    r = run("prompt", *where, "--dtype", "int8", "--length", "6", "--temperature", "0", stdin="The hacker\n")
    assert r.returncode == 0, r.stderr
    assert " SAMPLE 1 " in r.stdout
    text = tmp_path / "held_out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")
    losses = {}
    for dtype in ("float32", "int8"):
        r = run("eval", *where, "--dtype", dtype, "--dataset", str(text), "--context", "32")
        assert r.returncode == 0, r.stderr
        losses[dtype] = float(r.stdout.split()[1])
    assert abs(losses["int8"] - losses["float32"]) < 0.05  # random weights: int8 keeps the loss
    r = run("convert", str(FIX / "full"), str(tmp_path / "full8"), "--dtype", "int8")
    assert r.returncode == 0, r.stderr
    r = run("prompt", "--models_dir", str(tmp_path), "--model_name", "full8", "--dtype", "int8",
            "--length", "3", "--temperature", "0", stdin="The hacker\n")
    assert r.returncode == 0, r.stderr


def test_bad_dtype_is_one_line_error():
    r = run("prompt", "--models_dir", str(FIX), "--model_name", "full", "--dtype", "int4")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "--dtype" in lines[0] and "int4" in lines[0]
    with pytest.raises(Npgpt2Error, match="--dtype"):
        quant.check_dtype("bfloat16")
    assert run("train", "--help").stdout.replace("\n", " ").count("float32") >= 1
