"""`npgpt2 convert` between OpenAI TF folders, .npz files and Hugging Face folders.

References are independent of npgpt2: tests/fixtures/tiny/ and full/ were written by
TensorFlow from the values in tiny_values.npz / full_sha256.json; hf_tiny/ was written by
transformers' save_pretrained from the same tiny values; the logits come from transformers.
"""
import errno
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import npgpt2
from npgpt2 import convert as cv
from npgpt2.checkpoint import read_checkpoint, write_checkpoint, write_checkpoint_state
from npgpt2.convert import convert, detect_format, read_model
from npgpt2.errors import Npgpt2Error
from npgpt2.safetensors_io import read_safetensors, write_safetensors

FIX = Path(__file__).parent / "fixtures"
TINY_HP = {"n_vocab": 96, "n_ctx": 16, "n_embd": 24, "n_head": 3, "n_layer": 2}


@pytest.fixture(scope="module")
def tiny_values():
    with np.load(FIX / "tiny_values.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def hf_tensors():
    """hf_tiny/model.safetensors as written by transformers, parsed from the bytes here
    (not by npgpt2) so the comparison does not rest on the reader under test."""
    raw = (FIX / "hf_tiny" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        assert info["dtype"] == "F32"
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], "<f4").reshape(info["shape"])
    return out


def assert_same_params(params, reference):
    assert sorted(params) == sorted(reference)
    for k in reference:
        assert params[k].dtype == np.float32 and params[k].shape == reference[k].shape, k
        assert np.array_equal(params[k], reference[k]), k  # bit-equal (no NaNs in fixtures)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------- round trips
def test_tf_to_npz_to_tf_is_exact(tmp_path, tiny_values):
    convert(FIX / "tiny", tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        assert json.loads(str(z["__hparams__"])) == TINY_HP
        assert_same_params({k: z[k] for k in z.files if k != "__hparams__"}, tiny_values)
    convert(tmp_path / "m.npz", tmp_path / "back")
    out = tmp_path / "back"
    assert sorted(os.listdir(out)) == ["checkpoint", "encoder.json", "hparams.json",
                                       "model.ckpt.data-00000-of-00001", "model.ckpt.index",
                                       "vocab.bpe"]
    assert json.loads((out / "hparams.json").read_text()) == TINY_HP
    assert_same_params(read_checkpoint(str(out / "model.ckpt")), tiny_values)
    # without tokenizer files in the source, the packaged OpenAI ones are used
    assert (out / "vocab.bpe").read_bytes() == (Path(npgpt2.__file__).parent / "assets" /
                                                "vocab.bpe").read_bytes()


def test_full_tf_to_hf_to_tf_is_exact(tmp_path):
    convert(FIX / "full", tmp_path / "hf", fmt="hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "merges.txt",
                                                   "model.safetensors", "vocab.json"]
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == (FIX / "full" / "encoder.json").read_bytes()
    assert (tmp_path / "hf" / "merges.txt").read_bytes() == (FIX / "full" / "vocab.bpe").read_bytes()
    convert(tmp_path / "hf", tmp_path / "tf", fmt="tf")
    want = json.loads((FIX / "full_sha256.json").read_text())
    got = read_checkpoint(str(tmp_path / "tf" / "model.ckpt"))
    assert sorted(got) == sorted(want)
    for k, arr in got.items():
        assert arr.dtype == np.float32
        assert hashlib.sha256(arr.tobytes()).hexdigest() == want[k], k
    assert json.loads((tmp_path / "tf" / "hparams.json").read_text()) == \
        json.loads((FIX / "full" / "hparams.json").read_text())
    for name in ("encoder.json", "vocab.bpe"):  # carried through the HF folder's copies
        assert (tmp_path / "tf" / name).read_bytes() == (FIX / "full" / name).read_bytes()


def test_tf_to_hf_matches_what_transformers_wrote(tmp_path, hf_tensors):
    convert(FIX / "tiny", tmp_path / "hf")  # default target from a TF folder: hf
    tensors, metadata = read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert metadata == {"format": "pt"}  # transformers refuses files without it
    assert sorted(tensors) == sorted(hf_tensors)
    for k in hf_tensors:
        assert tensors[k].shape == hf_tensors[k].shape and np.array_equal(tensors[k], hf_tensors[k]), k
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    ref = json.loads((FIX / "hf_tiny" / "config.json").read_text())
    for key in ("model_type", "architectures", "activation_function", "vocab_size",
                "n_positions", "n_embd", "n_head", "n_layer", "n_inner", "layer_norm_epsilon",
                "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        assert cfg[key] == ref[key], key


def test_hf_written_by_transformers_converts_to_the_tf_values(tmp_path, tiny_values):
    assert detect_format(FIX / "hf_tiny") == "hf"
    convert(FIX / "hf_tiny", tmp_path / "tf")  # default target from HF: tf
    assert json.loads((tmp_path / "tf" / "hparams.json").read_text()) == TINY_HP
    assert_same_params(read_checkpoint(str(tmp_path / "tf" / "model.ckpt")), tiny_values)


def test_converted_logits_equal_the_original(tmp_path):
    ref = np.load(FIX / "hf_tiny_logits.npz")
    convert(FIX / "hf_tiny", tmp_path / "tf")
    converted = npgpt2.load_model(tmp_path / "tf")
    original = npgpt2.load_model(FIX / "tiny")
    logits = converted.forward(ref["tokens"])
    assert np.array_equal(logits, original.forward(ref["tokens"]))
    assert np.abs(logits - ref["logits"]).max() <= 5e-5  # transformers' own logits, float32
    tiny_ref = np.load(FIX / "tiny_reference.npz")
    l64 = npgpt2.load_model(tmp_path / "tf", dtype=np.float64).forward(tiny_ref["tokens"])
    assert np.abs(l64 - tiny_ref["logits_f64"]).max() <= 1e-9


def test_hf_to_npz_to_hf_is_exact(tmp_path, hf_tensors):
    convert(FIX / "hf_tiny", tmp_path / "m.npz")
    convert(tmp_path / "m.npz", tmp_path / "hf", fmt="hf")
    tensors, _ = read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert sorted(tensors) == sorted(hf_tensors)
    assert all(np.array_equal(tensors[k], hf_tensors[k]) for k in hf_tensors)


def test_old_style_hf_file_with_buffers_and_tied_head(tmp_path, hf_tensors, tiny_values):
    """Older files: names without `transformer.`, the attn.bias/masked_bias buffers saved,
    and lm_head.weight stored though tied."""
    old = {k[len("transformer."):]: v for k, v in hf_tensors.items()}
    for i in range(2):
        old[f"h.{i}.attn.bias"] = np.tril(np.ones((16, 16), np.float32))[None, None]
        old[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    old["lm_head.weight"] = hf_tensors["transformer.wte.weight"]
    src = tmp_path / "old"
    src.mkdir()
    (src / "config.json").write_bytes((FIX / "hf_tiny" / "config.json").read_bytes())
    write_safetensors(src / "model.safetensors", old)
    hparams, params, _ = read_model(src)
    assert hparams == TINY_HP
    assert_same_params(params, tiny_values)


# ---------------------------------------------------------------- detection and destinations
def test_detect_format(tmp_path):
    assert detect_format(FIX / "tiny") == "tf"
    assert detect_format(FIX / "hf_tiny") == "hf"
    convert(FIX / "tiny", tmp_path / "x.npz")
    assert detect_format(tmp_path / "x.npz") == "npz"
    (tmp_path / "renamed").write_bytes((tmp_path / "x.npz").read_bytes())
    assert detect_format(tmp_path / "renamed") == "npz"  # by content, not by name


@pytest.mark.parametrize("make, words", [
    (lambda p: p.mkdir(), "not a model folder"),
    (lambda p: p.write_text("hello"), "not a model"),
    (lambda p: None, "no such"),
])
def test_not_a_model_is_one_line(tmp_path, make, words):
    src = tmp_path / "src"
    make(src)
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "out.npz")
    assert words in one_line(e) and str(src) in one_line(e)
    assert not (tmp_path / "out.npz").exists()


def test_a_file_inside_a_model_folder_is_refused(tmp_path):
    with pytest.raises(Npgpt2Error) as e:
        convert(FIX / "hf_tiny" / "model.safetensors", tmp_path / "out")
    assert "pass the folder" in one_line(e)


def test_folder_with_both_layouts_needs_from(tmp_path, tiny_values):
    both = tmp_path / "both"
    both.mkdir()
    for name in os.listdir(FIX / "tiny"):
        (both / name).write_bytes((FIX / "tiny" / name).read_bytes())
    for name in os.listdir(FIX / "hf_tiny"):
        (both / name).write_bytes((FIX / "hf_tiny" / name).read_bytes())
    with pytest.raises(Npgpt2Error) as e:
        convert(both, tmp_path / "o.npz")
    assert "--from" in one_line(e)
    convert(both, tmp_path / "o.npz", src_fmt="hf")
    assert_same_params(read_model(tmp_path / "o.npz")[1], tiny_values)


def test_existing_destination_needs_force(tmp_path, tiny_values):
    convert(FIX / "tiny", tmp_path / "m.npz")
    with pytest.raises(Npgpt2Error) as e:
        convert(FIX / "hf_tiny", tmp_path / "m.npz")
    assert "--force" in one_line(e)
    convert(FIX / "hf_tiny", tmp_path / "m.npz", force=True)

    dst = tmp_path / "hf"
    convert(FIX / "tiny", dst)
    with pytest.raises(Npgpt2Error) as e:
        convert(tmp_path / "m.npz", dst, fmt="hf")
    assert "--force" in one_line(e)
    convert(tmp_path / "m.npz", dst, fmt="tf", force=True)  # replaces the HF folder
    assert detect_format(dst) == "tf" and not (dst / "config.json").exists()
    assert_same_params(read_model(dst)[1], tiny_values)
    assert sorted(os.listdir(tmp_path)) == ["hf", "m.npz"]  # no temp or old folders left


def test_force_never_replaces_a_folder_that_is_not_a_model(tmp_path):
    dst = tmp_path / "photos"
    dst.mkdir()
    (dst / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(Npgpt2Error) as e:
        convert(FIX / "tiny", dst, force=True)
    assert "refusing" in one_line(e)
    assert os.listdir(dst) == ["cat.jpg"]


def test_force_never_deletes_files_beside_the_model(tmp_path, tiny_values):
    # a training run folder: a model, plus the run's state and the user's notes
    run = tmp_path / "run1"
    run.mkdir()
    params = {k: v for k, v in tiny_values.items() if k.startswith("model/")}
    write_checkpoint(str(run / "model-70"), params)
    write_checkpoint_state(run, "model-70", ["model-70"])
    (run / "hparams.json").write_text(json.dumps(TINY_HP))
    (run / "train_state-70.npz").write_bytes(b"optimizer moments")
    (run / "NOTES.txt").write_text("lr 1e-4 was too high")
    before = {p: (run / p).read_bytes() for p in os.listdir(run)}
    with pytest.raises(Npgpt2Error) as e:
        convert(FIX / "hf_tiny", run, fmt="tf", force=True)
    msg = one_line(e)
    assert "NOTES.txt" in msg and "train_state-70.npz" in msg and "refusing" in msg
    assert {p: (run / p).read_bytes() for p in os.listdir(run)} == before
    assert os.listdir(tmp_path) == ["run1"]


def test_empty_existing_folder_is_fine(tmp_path, tiny_values):
    (tmp_path / "out").mkdir()
    convert(FIX / "hf_tiny", tmp_path / "out")
    assert_same_params(read_model(tmp_path / "out")[1], tiny_values)


def test_missing_parent_folders_are_made(tmp_path, tiny_values):
    convert(FIX / "hf_tiny", tmp_path / "weights" / "tiny")
    assert_same_params(read_model(tmp_path / "weights" / "tiny")[1], tiny_values)


def test_failure_half_way_leaves_no_folder(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(cv, "write_safetensors", full_disk)
    with pytest.raises(Npgpt2Error) as e:
        convert(FIX / "tiny", tmp_path / "hf")
    assert "No space left" in one_line(e)
    assert os.listdir(tmp_path) == []


def test_failure_half_way_keeps_the_model_being_replaced(tmp_path, monkeypatch, hf_tensors):
    convert(FIX / "tiny", tmp_path / "hf")
    before = {p: (tmp_path / "hf" / p).read_bytes() for p in os.listdir(tmp_path / "hf")}
    monkeypatch.setattr(cv, "write_safetensors",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(Npgpt2Error):
        convert(FIX / "hf_tiny", tmp_path / "hf", fmt="hf", force=True)
    assert {p: (tmp_path / "hf" / p).read_bytes() for p in os.listdir(tmp_path / "hf")} == before
    assert os.listdir(tmp_path) == ["hf"]


def test_source_and_destination_the_same(tmp_path):
    convert(FIX / "tiny", tmp_path / "m.npz")
    with pytest.raises(Npgpt2Error) as e:
        convert(tmp_path / "m.npz", tmp_path / "m.npz", force=True)
    assert "source itself" in one_line(e)


def test_unknown_target_format(tmp_path):
    with pytest.raises(Npgpt2Error) as e:
        convert(FIX / "tiny", tmp_path / "x", fmt="onnx")
    assert "--to" in one_line(e)


# ---------------------------------------------------------------- bad input
def copy_of(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_tf_missing_data_file(tmp_path):
    src = copy_of(FIX / "tiny", tmp_path / "src")
    (src / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "o.npz")
    assert "model.ckpt.data-00000-of-00001" in one_line(e)


def test_tf_missing_hparams(tmp_path):
    src = copy_of(FIX / "tiny", tmp_path / "src")
    (src / "hparams.json").unlink()
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "o.npz")
    assert "hparams.json" in one_line(e)


def test_tf_checkpoint_with_an_extra_layer(tmp_path, tiny_values):
    src = tmp_path / "src"
    src.mkdir()
    (src / "hparams.json").write_text(json.dumps(TINY_HP))
    extra = dict(tiny_values)
    extra["model/h2/ln_1/g"] = np.ones(24, np.float32)
    write_checkpoint(str(src / "model.ckpt"), extra)
    write_checkpoint_state(src, "model.ckpt")
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "o.npz")
    assert "model/h2/ln_1/g" in one_line(e)


def test_tf_checkpoint_with_optimizer_slots_converts(tmp_path, tiny_values):
    src = tmp_path / "src"
    src.mkdir()
    (src / "hparams.json").write_text(json.dumps(TINY_HP))
    write_checkpoint(str(src / "model-5"), {**tiny_values, "adam/m/model/wte": tiny_values["model/wte"]})
    write_checkpoint_state(src, "model-5")
    convert(src, tmp_path / "o.npz")
    assert_same_params(read_model(tmp_path / "o.npz")[1], tiny_values)


def test_hparams_that_disagree_with_shapes(tmp_path):
    src = copy_of(FIX / "tiny", tmp_path / "src")
    (src / "hparams.json").write_text(json.dumps({**TINY_HP, "n_embd": 12, "n_head": 3}))
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "o.npz")
    assert "shape" in one_line(e)


def test_npz_without_hparams(tmp_path, tiny_values):
    np.savez(tmp_path / "bare.npz", **tiny_values)
    with pytest.raises(Npgpt2Error) as e:
        convert(tmp_path / "bare.npz", tmp_path / "out")
    assert "__hparams__" in one_line(e)


def test_npz_missing_a_tensor(tmp_path, tiny_values):
    part = {k: v for k, v in tiny_values.items() if k != "model/ln_f/b"}
    np.savez(tmp_path / "m.npz", __hparams__=np.array(json.dumps(TINY_HP)), **part)
    with pytest.raises(Npgpt2Error) as e:
        convert(tmp_path / "m.npz", tmp_path / "out")
    assert "model/ln_f/b" in one_line(e) and "missing" in one_line(e)


def test_truncated_npz(tmp_path):
    convert(FIX / "tiny", tmp_path / "m.npz")
    raw = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "m.npz").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(Npgpt2Error) as e:
        convert(tmp_path / "m.npz", tmp_path / "out")
    assert "m.npz" in one_line(e)


def test_hf_missing_safetensors(tmp_path):
    src = copy_of(FIX / "hf_tiny", tmp_path / "src")
    (src / "model.safetensors").unlink()
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "out")
    assert "model.safetensors" in one_line(e) and "missing" in one_line(e)
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "out")
    assert "pytorch_model.bin" in one_line(e)


def test_hf_missing_config(tmp_path):
    src = copy_of(FIX / "hf_tiny", tmp_path / "src")
    (src / "config.json").unlink()
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "out")
    assert "config.json" in one_line(e)


def test_hf_extra_tensor(tmp_path, hf_tensors):
    src = copy_of(FIX / "hf_tiny", tmp_path / "src")
    write_safetensors(src / "model.safetensors",
                      {**hf_tensors, "score.weight": np.zeros((2, 24), np.float32)})
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "out")
    assert "score.weight" in one_line(e)


def test_hf_untied_head_is_refused(tmp_path, hf_tensors):
    src = copy_of(FIX / "hf_tiny", tmp_path / "src")
    write_safetensors(src / "model.safetensors",
                      {**hf_tensors, "lm_head.weight": hf_tensors["transformer.wte.weight"] + 1})
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "out")
    assert "lm_head.weight" in one_line(e)


@pytest.mark.parametrize("key, value", [
    ("activation_function", "relu"), ("n_inner", 50), ("layer_norm_epsilon", 1e-6),
    ("model_type", "gpt_neo"), ("scale_attn_by_inverse_layer_idx", True), ("n_head", 5),
])
def test_hf_config_npgpt2_cannot_run(tmp_path, key, value):
    src = copy_of(FIX / "hf_tiny", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "out")
    assert "config.json" in one_line(e)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- safetensors by hand
def raw_safetensors(header, data, length=None):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def test_reader_on_a_file_built_from_the_spec(tmp_path):
    bf16_one, bf16_minus_two = 0x3F80, 0xC000  # bfloat16 bit patterns of 1.0 and -2.0
    data = struct.pack("<2f", 1.5, -0.25) + struct.pack("<2H", bf16_one, bf16_minus_two) \
        + struct.pack("<q", -7) + bytes([1, 0])
    header = {"__metadata__": {"who": "hand"},
              "f": {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8]},
              "b": {"dtype": "BF16", "shape": [2], "data_offsets": [8, 12]},
              "i": {"dtype": "I64", "shape": [], "data_offsets": [12, 20]},
              "t": {"dtype": "BOOL", "shape": [2], "data_offsets": [20, 22]},
              "e": {"dtype": "F16", "shape": [0, 4], "data_offsets": [22, 22]}}
    (tmp_path / "a.safetensors").write_bytes(raw_safetensors(header, data))
    for mmap in (False, True):
        t, meta = read_safetensors(tmp_path / "a.safetensors", mmap=mmap)
        assert meta == {"who": "hand"}
        assert t["f"].tolist() == [[1.5], [-0.25]] and t["f"].dtype == np.float32
        assert t["b"].tolist() == [1.0, -2.0] and t["b"].dtype == np.float32
        assert t["i"].shape == () and int(t["i"]) == -7
        assert t["t"].tolist() == [True, False]
        assert t["e"].shape == (0, 4) and t["e"].dtype == np.float16


def test_writer_bytes_follow_the_spec(tmp_path):
    write_safetensors(tmp_path / "w.safetensors",
                      {"b": np.array([3], np.int32), "a": np.array([[1.0, 2.0]], np.float32)},
                      metadata={"format": "pt"})
    raw = (tmp_path / "w.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8:9] == b"{"
    assert json.loads(raw[8:8 + n]) == {
        "a": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
        "b": {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]},
        "__metadata__": {"format": "pt"}}
    assert raw[8 + n:] == struct.pack("<2f", 1.0, 2.0) + struct.pack("<i", 3)


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "v": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}}


@pytest.mark.parametrize("header, data, length, words", [
    (GOOD, bytes(20), 10 ** 6, "header claims"),
    (GOOD, bytes(20), 10 ** 12, "header claims"),
    (GOOD, bytes(12), None, "ends at data byte 16"),
    ({**GOOD, "v": {"dtype": "F32", "shape": [2], "data_offsets": [16, 20]}}, bytes(20), None,
     "data_offsets span 4 bytes"),
    ({**GOOD, "v": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}}, bytes(24), None,
     "gap"),
    ({**GOOD, "v": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, bytes(16), None,
     "overlaps"),
    (GOOD, bytes(28), None, "covers 20 data bytes but the file holds 28"),
    ({**GOOD, "v": {"dtype": "F32", "shape": [1], "data_offsets": [20, 16]}}, bytes(20), None,
     "bad data_offsets"),
    ({**GOOD, "v": {"dtype": "Q4", "shape": [1], "data_offsets": [16, 20]}}, bytes(20), None,
     "unsupported dtype"),
    ({**GOOD, "v": {"dtype": "F32", "shape": [-1], "data_offsets": [16, 20]}}, bytes(20), None,
     "bad shape"),
])
def test_lying_safetensors_header_is_one_line(tmp_path, header, data, length, words):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw_safetensors(header, data, length))
    with pytest.raises(Npgpt2Error) as e:
        read_safetensors(path)
    assert words in one_line(e) and str(path) in one_line(e)


def test_not_json_and_too_short(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(Npgpt2Error) as e:
        read_safetensors(path)
    assert "JSON" in one_line(e)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(Npgpt2Error) as e:
        read_safetensors(path)
    assert "too short" in one_line(e)


def test_lying_header_in_a_model_folder(tmp_path):
    src = copy_of(FIX / "hf_tiny", tmp_path / "src")
    raw = bytearray((src / "model.safetensors").read_bytes())
    (src / "model.safetensors").write_bytes(bytes(raw[:-100]))  # header now promises too much
    with pytest.raises(Npgpt2Error) as e:
        convert(src, tmp_path / "out")
    assert "model.safetensors" in one_line(e)
    assert not (tmp_path / "out").exists()


def test_a_compact_vocabulary_model_is_not_converted_without_its_ids(tmp_path):
    """A folder with compact_vocab.npy (the demo's) numbers its tokens 0..K-1, not as GPT-2 does;
    converting it wrote GPT-2's vocabulary files beside its weights and dropped the mapping, so
    the copy loaded with the wrong tokenizer and produced other text, silently."""
    import shutil
    src = tmp_path / "demo"
    shutil.copytree(FIX / "tiny", src)
    np.save(src / "compact_vocab.npy", np.arange(96, dtype=np.int64) * 7)
    for dst in ("demo-hf", "demo.npz", "demo-tf"):
        with pytest.raises(Npgpt2Error, match=r"compact_vocab\.npy") as e:
            convert(src, tmp_path / dst, fmt="tf" if dst == "demo-tf" else None)
        assert "\n" not in str(e.value)
        assert not (tmp_path / dst).exists()
