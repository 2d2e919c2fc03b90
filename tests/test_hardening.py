"""Regression tests for hardening items that belong to no single module: atomic
writes (non-regular destinations, stale temp files, a full disk), hostile files (deep JSON,
impossible tensor shapes, token files made elsewhere), flags (seed, temperature, memory),
argparse's error line and line-ending normalisation.

Every test here failed before its fix. Expected values are facts about the input (the file
was not replaced, the ids equal those of the text with "\\n"), never npgpt2's own output.
"""
import errno
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from npgpt2 import cli, fsutil
from npgpt2.errors import Npgpt2Error

FIX = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


def one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)
    return msg


def run_main(capsys, *args):
    """npgpt2 <args> in this process -> (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_error(code, err, *parts):
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("npgpt2: error: "), err
    for p in parts:
        assert p in last, (p, last)
    return last


# ---------------------------------------------------------------- atomic writes
def test_atomic_write_refuses_a_fifo_and_a_folder(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(Npgpt2Error) as e:
        with fsutil.atomic_write(fifo) as f:
            f.write(b"x")
    one_line(e, str(fifo), "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the pipe
    (tmp_path / "dir").mkdir()
    with pytest.raises(Npgpt2Error):
        with fsutil.atomic_write(tmp_path / "dir") as f:
            f.write(b"x")
    assert (tmp_path / "dir").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["dir", "pipe"]  # no temp file left


def test_encode_into_a_fifo_is_refused(tmp_path, capsys):
    """`npgpt2 encode x.txt /dev/null` as root replaced the device; a FIFO stands in for it."""
    (tmp_path / "x.txt").write_text("hello world\n")
    fifo = tmp_path / "null"
    os.mkfifo(fifo)
    code, _, err = run_main(capsys, "encode", tmp_path / "x.txt", fifo, "--models_dir", FIX, "--model_name", "full")
    assert_cli_error(code, err, str(fifo), "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_stale_temp_files_are_removed_fresh_ones_kept(tmp_path):
    old = time.time() - 3600
    stale = tmp_path / ".model-3.index.abcd_123.tmp"
    fresh = tmp_path / ".model-4.index.zyxw9876.tmp"   # a write in progress elsewhere
    other = tmp_path / ".notes.tmp"                     # not our pattern
    for p in (stale, fresh, other):
        p.write_bytes(b"partial")
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    fsutil._swept.discard(str(tmp_path))
    with fsutil.atomic_write(tmp_path / "out.bin") as f:
        f.write(b"data")
    assert not stale.exists()
    assert fresh.exists() and other.exists()
    assert (tmp_path / "out.bin").read_bytes() == b"data"


def test_disk_full_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "hparams.json"
    target.write_text("old")

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # a full disk shows up in a write, or (delayed allocation) only when the data is flushed
    for patch in ("write", "fsync"):
        with monkeypatch.context() as m:
            if patch == "fsync":
                m.setattr(fsutil.os, "fsync", full)
            with pytest.raises(Npgpt2Error) as e:
                with fsutil.atomic_write(target, "w", encoding="utf-8") as f:
                    f.write("new")
                    if patch == "write":
                        full()
        one_line(e, str(target), "disk full")
        assert target.read_text() == "old"
        assert os.listdir(tmp_path) == ["hparams.json"]


def test_convert_cleans_up_after_a_killed_conversion(tmp_path):
    """A conversion killed between moving the old model aside and renaming the new one in
    left the user's model only in `.NAME.PID.old`: it is put back, and `.tmp` folders go."""
    from npgpt2.convert import convert
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    shutil.copytree(FIX / "hf_tiny", tmp_path / f".hf.{dead.pid}.old")
    (tmp_path / f".hf.{dead.pid}.tmp").mkdir()
    (tmp_path / f".hf.{dead.pid}.tmp" / "config.json").write_text("{")
    with pytest.raises(Npgpt2Error, match="already|not empty"):  # the restored model needs --force
        convert(FIX / "tiny", tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    for name in os.listdir(FIX / "hf_tiny"):
        assert (tmp_path / "hf" / name).read_bytes() == (FIX / "hf_tiny" / name).read_bytes()


# ---------------------------------------------------------------- hostile files
def _write_index(prefix, shape):
    from npgpt2.checkpoint import proto, table
    items = [(b"", proto.encode_header(num_shards=1, producer=1)),
             (b"w", proto.encode_entry(1, shape, 0, 0, 0))]
    with open(prefix + ".index", "wb") as f:
        f.write(table.build_table(items))
    open(prefix + ".data-00000-of-00001", "wb").close()


@pytest.mark.parametrize("shape, words", [((2**62, 2**62), "2**63 bytes"), ((0, 2**62, 2**62), "2**63 bytes"),
                                          ((1,) * 65, "65 dimensions")])
def test_index_shape_overflow_or_too_many_dims(tmp_path, shape, words):
    from npgpt2.checkpoint import list_variables, read_checkpoint
    prefix = str(tmp_path / "model.ckpt")
    _write_index(prefix, shape)
    for read in (read_checkpoint, list_variables):
        with pytest.raises(Npgpt2Error) as e:
            read(prefix)
        one_line(e, "model.ckpt.index", "'w'", words)


def test_state_file_with_a_bad_escape(tmp_path):
    from npgpt2.checkpoint import latest_checkpoint
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt\\x"\n')
    with pytest.raises(Npgpt2Error) as e:
        latest_checkpoint(str(tmp_path))
    one_line(e, str(tmp_path / "checkpoint"), "bad escape")


DEEP = "[" * 100000 + "]" * 100000


def _deep_model_folder(tmp_path, name):
    d = tmp_path / "m"
    shutil.copytree(FIX / "full", d)
    (d / name).write_text(DEEP)
    return d


def test_deep_json_hparams_and_encoder(tmp_path):
    import npgpt2
    d = _deep_model_folder(tmp_path, "hparams.json")
    with pytest.raises(Npgpt2Error) as e:
        npgpt2.load_model(d)
    one_line(e, "hparams.json", "nested too deeply")
    d = tmp_path / "e"
    d.mkdir()
    (d / "encoder.json").write_text(DEEP)
    shutil.copy(FIX / "full" / "vocab.bpe", d / "vocab.bpe")
    with pytest.raises(Npgpt2Error) as e:
        npgpt2.load_tokenizer(d)
    one_line(e, "encoder.json", "nested too deeply")


def test_deep_json_hf_config_safetensors_header_and_npz_hparams(tmp_path):
    from npgpt2.convert import read_model
    from npgpt2.safetensors_io import read_safetensors
    hf = tmp_path / "hf"
    shutil.copytree(FIX / "hf_tiny", hf)
    (hf / "config.json").write_text(DEEP)
    with pytest.raises(Npgpt2Error) as e:
        read_model(hf)
    one_line(e, "config.json", "nested too deeply")
    raw = DEEP.encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(Npgpt2Error) as e:
        read_safetensors(tmp_path / "x.safetensors")
    one_line(e, "x.safetensors", "nested too deeply")
    np.savez(tmp_path / "m.npz", __hparams__=np.array(DEEP))
    with pytest.raises(Npgpt2Error) as e:
        read_model(tmp_path / "m.npz")
    one_line(e, "m.npz", "__hparams__", "nested too deeply")


@pytest.mark.parametrize("eps", ["1" + "0" * 400, "NaN", "Infinity", "true"])
def test_hf_layer_norm_epsilon_too_big_or_nan(tmp_path, eps):
    from npgpt2.convert import hparams_from_config
    cfg = json.loads((FIX / "hf_tiny" / "config.json").read_text())
    text = json.dumps(cfg).replace('"layer_norm_epsilon": 1e-05', f'"layer_norm_epsilon": {eps}')
    assert eps in text
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(Npgpt2Error) as e:
        hparams_from_config(tmp_path / "config.json")
    one_line(e, "layer_norm_epsilon")


# ---------------------------------------------------------------- token files made elsewhere
def test_npy_renamed_npz(tmp_path):
    from npgpt2.data import load_dataset
    np.save(tmp_path / "t.npy", np.arange(10, dtype=np.uint16))
    os.rename(tmp_path / "t.npy", tmp_path / "t.npz")
    with pytest.raises(Npgpt2Error) as e:
        load_dataset(tmp_path / "t.npz")
    one_line(e, "t.npz", ".npy")


def test_zip_member_that_is_not_npy(tmp_path):
    from npgpt2.data import load_dataset
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as z:
        z.writestr("arr_0.txt", "1 2 3")
    with pytest.raises(Npgpt2Error) as e:
        load_dataset(tmp_path / "t.npz")
    one_line(e, "t.npz", "arr_0.txt", "not a .npy array")


def test_uint64_ids_past_2_63_do_not_wrap(tmp_path):
    from npgpt2.data import load_dataset
    np.savez(tmp_path / "t.npz", np.array([1, 2, 2**63 + 5], dtype=np.uint64))
    with pytest.raises(Npgpt2Error) as e:
        load_dataset(tmp_path / "t.npz")
    one_line(e, "t.npz", str(2**63 + 5))


def test_text_named_npz_says_what_it_is_not(tmp_path):
    from npgpt2.data import load_dataset
    (tmp_path / "t.npz").write_text("just some text\n")
    with pytest.raises(Npgpt2Error) as e:
        load_dataset(tmp_path / "t.npz")
    msg = one_line(e, "t.npz", "not an .npz", "text")
    assert "pickle" not in msg


def test_npz_model_or_sampler_state_made_elsewhere(tmp_path):
    from npgpt2.convert import read_model
    from npgpt2.data import Sampler
    with zipfile.ZipFile(tmp_path / "m.npz", "w") as z:
        z.writestr("__hparams__", "{}")
    with pytest.raises(Npgpt2Error) as e:
        read_model(tmp_path / "m.npz")
    one_line(e, "m.npz", "not a .npy array")
    s = Sampler(np.arange(100, dtype=np.uint16), 5, seed=1)
    for bad, words in ((DEEP, "nested too deeply"), ("5", "JSON object"),
                       ('{"bit_generator": "PCG64", "state": 3}', "damaged")):
        with pytest.raises(Npgpt2Error) as e:
            s.set_state(bad)
        one_line(e, "sampler state", words)


# ---------------------------------------------------------------- --encoding
@pytest.mark.parametrize("codec", ["base64", "hex", "rot13", "zlib", "uu"])
def test_non_text_codecs_are_refused(tmp_path, capsys, codec):
    (tmp_path / "a.txt").write_text("hello\n")
    code, _, err = run_main(capsys, "encode", tmp_path / "a.txt", tmp_path / "o.npz", "--encoding", codec,
                            "--models_dir", FIX, "--model_name", "full")
    assert_cli_error(code, err, "--encoding", codec, "not a text encoding")
    assert not (tmp_path / "o.npz").exists()


def test_utf16_without_bom(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes("hello\n".encode("utf-16-le"))
    code, _, err = run_main(capsys, "encode", tmp_path / "a.txt", tmp_path / "o.npz", "--encoding", "utf-16",
                            "--models_dir", FIX, "--model_name", "full")
    assert_cli_error(code, err, "a.txt", "BOM")


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("command", ["generate", "chat", "train"])
def test_negative_seed(tmp_path, capsys, command):
    extra = ["--dataset", FIX / "full" / "vocab.bpe"] if command == "train" else []
    code, _, err = run_main(capsys, command, "--models_dir", FIX, "--model_name", "full", "--seed", "-1", *extra)
    assert_cli_error(code, err, "--seed", "-1")


def test_negative_seed_in_the_library():
    import npgpt2
    from npgpt2.chat import ChatSession
    model = npgpt2.load_model(FIX / "full")
    with pytest.raises(Npgpt2Error) as e:
        ChatSession(model, npgpt2.load_tokenizer(FIX / "full"), seed=-1)
    one_line(e, "seed", "-1")
    with pytest.raises(Npgpt2Error) as e:
        npgpt2.generate(model, [50256], 3, seed=-1)
    one_line(e, "seed", "-1")


def test_check_seed_and_temperature_rules():
    from npgpt2.sampling import check_seed, check_temperature
    for ok in (None, 0, 2**70, np.int64(3)):
        check_seed(ok)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(Npgpt2Error):
            check_seed(bad)
    for ok in (0, 1e-320, 0.7, 100.0):
        check_temperature(ok)
    for bad in (-1e-9, float("nan"), float("inf"), None, True):
        with pytest.raises(Npgpt2Error) as e:
            check_temperature(bad, '"temperature"')
        one_line(e, '"temperature"')


def test_tiny_temperature_is_greedy_not_nan():
    from npgpt2.sampling import sample_logits
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)) * 5
    want = logits.argmax(axis=-1)
    with np.errstate(all="raise"):  # no overflow or invalid-value warning escapes either
        for t in (1e-320, 5e-324, 1e-308):
            got = sample_logits(logits, np.random.default_rng(1), temperature=t, top_k=10, top_p=0.9)
            assert got.tolist() == want.tolist()


def test_tiny_temperature_cli_matches_greedy(capsys):
    args = ["generate", "--models_dir", FIX, "--model_name", "full", "--length", "6", "--seed", "3"]
    code, greedy, err = run_main(capsys, *args, "--temperature", "0")
    assert code == 0, err
    code, tiny, err = run_main(capsys, *args, "--temperature", "1e-320")
    assert code == 0, err
    assert tiny == greedy


def test_huge_batch_is_refused_with_the_figure(capsys):
    for extra in (["--nsamples", "0"], ["--nsamples", str(10**12)]):
        code, out, err = run_main(capsys, "generate", "--models_dir", FIX, "--model_name", "full",
                                  "--batch_size", str(10**12), *extra)
        assert_cli_error(code, err, "--batch_size", "needs about", "PiB", "available")
        assert out == ""  # refused before the first sample header


def test_generation_estimate_covers_the_cache_it_allocates():
    import npgpt2
    from npgpt2.memory import generation_bytes
    model = npgpt2.load_model(FIX / "full")
    h = model.hparams
    cache = model.new_cache(3)
    need = generation_bytes(h, 3, 1, h["n_ctx"] - 1, model.dtype)
    logits = 3 * h["n_vocab"] * 8
    assert cache.k.nbytes + cache.v.nbytes + logits <= need <= 2 * (cache.k.nbytes + cache.v.nbytes) + 5 * logits


def test_huge_train_batch_or_sample_num_is_refused(tmp_path):
    from npgpt2.train import TrainConfig, fit, restore
    tokens = np.arange(500, dtype=np.uint16) % 90
    for kw, flag in ((dict(batch_size=10**12), "--batch_size"), (dict(sample_num=10**12, sample_every=1), "--sample_num")):
        cfg = TrainConfig(models_dir=str(FIX), model_name="tiny", checkpoint_dir=str(tmp_path / "c"), run_name="r",
                          context=8, seed=1, save_every=0, plot=False, steps=1,
                          **{"sample_every": 0, **kw})
        model, state = restore(cfg, tmp_path / "c" / "r")
        with pytest.raises(Npgpt2Error) as e:
            fit(model, tokens, cfg, None, state=state)
        one_line(e, flag, "needs about", "available")


# ---------------------------------------------------------------- argparse
def test_argparse_errors_end_with_npgpt2_error(capsys):
    for args, words in ((["generate", "--nsamples", "x"], "invalid int value"),
                        (["generate", "--bogus"], "unrecognized arguments: --bogus"),
                        (["nonsense"], "invalid choice"),
                        ([], "required")):
        code, _, err = run_main(capsys, *args)
        assert code == 2
        lines = err.strip().splitlines()
        assert lines[0].startswith("usage: npgpt2"), err
        assert lines[-1].startswith("npgpt2: error: ") and words in lines[-1], err


# ---------------------------------------------------------------- line endings
def test_crlf_and_cr_are_read_as_newlines_across_blocks(tmp_path):
    from npgpt2.data import read_text_blocks
    text = "one\r\ntwo\rthree\r\n\r\nfour\r"
    (tmp_path / "w.txt").write_bytes(text.encode())
    for block_bytes in (1, 2, 3, 1 << 20):  # a "\r\n" split across two reads
        got = "".join(read_text_blocks(tmp_path / "w.txt", block_bytes=block_bytes))
        assert got == "one\ntwo\nthree\n\nfour\n"
        kept = "".join(read_text_blocks(tmp_path / "w.txt", block_bytes=block_bytes, keep_crlf=True))
        assert kept == text


def test_encode_normalises_crlf_unless_keep_crlf(tmp_path, capsys):
    body = "The hacker\r\nwrote code.\r\n" * 5
    (tmp_path / "win.txt").write_bytes(body.encode())
    (tmp_path / "unix.txt").write_bytes(body.replace("\r\n", "\n").encode())
    common = ["--models_dir", FIX, "--model_name", "full"]
    for name in ("win", "unix"):
        code, _, err = run_main(capsys, "encode", tmp_path / f"{name}.txt", tmp_path / f"{name}.npz", *common)
        assert code == 0, err
    code, _, err = run_main(capsys, "encode", tmp_path / "win.txt", tmp_path / "kept.npz", "--keep_crlf", *common)
    assert code == 0, err
    win, unix, kept = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("win", "unix", "kept"))
    assert np.array_equal(win, unix)
    assert not np.array_equal(kept, unix)
    import npgpt2
    assert npgpt2.load_tokenizer(FIX / "full").decode(kept.tolist()) == body


def test_encode_help_mentions_keep_crlf():
    r = subprocess.run([sys.executable, "-m", "npgpt2.cli", "encode", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert "--keep_crlf" in r.stdout and "\\r\\n" in r.stdout


def test_train_reads_text_like_encode_and_takes_keep_crlf(tmp_path, capsys, caplog):
    """`train` on a text file normalises CRLF as `encode` does, and, like `encode` and `eval`,
    takes --keep_crlf (the README: train and eval read text inputs the same way)."""
    body = "The hacker\r\nwrote code.\r\n" * 20
    (tmp_path / "win.txt").write_bytes(body.encode())
    (tmp_path / "unix.txt").write_bytes(body.replace("\r\n", "\n").encode())
    counts = {}
    for name, data, extra in (("unix", "unix.txt", []), ("win", "win.txt", []), ("kept", "win.txt", ["--keep_crlf"])):
        caplog.clear()
        with caplog.at_level("INFO"):
            code, _, err = run_main(capsys, "train", "--dataset", tmp_path / data, "--models_dir", FIX, "--model_name",
                                    "full", "--checkpoint_dir", tmp_path / "ck", "--run_name", name, "--steps",
                                    "1", "--context", "8", "--sample_every", "0", "--seed", "1", *extra)
        assert code == 0, err
        counts[name] = int(re.search(r"dataset: (\d+) tokens", caplog.text).group(1))
    assert counts["win"] == counts["unix"]
    assert counts["kept"] > counts["unix"]  # the "\r" survive as tokens of their own


def test_generation_warns_when_the_tokenizer_does_not_fit_the_model():
    """The tiny fixture has 96 token ids and GPT-2's 50257-id vocabulary files: its samples
    decode through the wrong table. `train` said so; `prompt` / `generate` / `chat` said nothing."""
    r = subprocess.run([sys.executable, "-m", "npgpt2.cli", "prompt", "--models_dir", str(FIX), "--model_name",
                        "tiny", "--length", "3", "--seed", "1"], input="a\n", capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "the tokenizer has 50257 ids but the model 96" in r.stderr
    r = subprocess.run([sys.executable, "-m", "npgpt2.cli", "prompt", "--models_dir", str(FIX), "--model_name",
                        "full", "--length", "3", "--seed", "1"], input="a\n", capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert r.returncode == 0 and "tokenizer has" not in r.stderr, r.stderr


def test_demo_closing_commands_name_a_real_folder_for_out_dot(tmp_path, monkeypatch, capsys):
    """`demo --out .` printed `--models_dir . --model_name ''`: the commands name the folder instead."""
    import npgpt2.demo as demo
    fake = {"params": 1e6, "steps": 1, "train_seconds": 1.0, "corpus": "c", "unigram_entropy": 7.0, "val_loss": 8.0,
            "eval_tokens": 10, "history": {"val_step": [], "val_loss": []}, "samples": [],
            "files": {"checkpoint": str(tmp_path / "model-1")}}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: fake)
    monkeypatch.chdir(tmp_path / ".")
    (tmp_path / "sub").mkdir()
    for out, models_dir, name in ((".", tmp_path.parent, tmp_path.name), ("sub/..", tmp_path.parent, tmp_path.name),
                                  ("sub", ".", "sub")):
        code, stdout, err = run_main(capsys, "demo", "--quick", "--out", out)
        assert code == 0, err
        line = next(x for x in stdout.splitlines() if x.startswith("Prompt it:"))
        assert line.endswith(f"npgpt2 prompt --models_dir {models_dir} --model_name {name}"), line
        # stopped (Ctrl-C) before its first validation: no empty "Validation loss by step: " line
        assert "Validation loss by step" not in stdout


def test_sample_length_is_checked_before_training(tmp_path):
    """--sample_length 0 trained until the first sample step, then stopped, blaming --length
    and --sample_dir; it is a flag error, found before anything runs."""
    from npgpt2.train import TrainConfig, train
    np.savez(tmp_path / "tok.npz", np.arange(500, dtype=np.uint16) % 90)
    cfg = TrainConfig(dataset=str(tmp_path / "tok.npz"), models_dir=str(FIX), model_name="tiny",
                      checkpoint_dir=str(tmp_path / "c"), run_name="r", context=8, seed=1, steps=3, sample_every=2,
                      sample_length=0, plot=False)
    with pytest.raises(Npgpt2Error) as e:
        train(cfg)
    one_line(e, "--sample_length must be >= 1, got 0")
    assert not (tmp_path / "c").exists()


def test_a_non_finite_update_is_one_line_without_numpy_warnings(tmp_path):
    """The run stopped with its one line, after six lines of NumPy RuntimeWarnings (overflow in
    the update, invalid values in the finite check) quoting npgpt2's source."""
    np.savez(tmp_path / "tok.npz", np.arange(500, dtype=np.uint16) % 90)
    r = subprocess.run([sys.executable, "-m", "npgpt2.cli", "train", "--dataset", str(tmp_path / "tok.npz"),
                        "--models_dir", str(FIX), "--model_name", "tiny", "--checkpoint_dir", str(tmp_path / "c"),
                        "--context", "8", "--steps", "3", "--optimizer", "sgd", "--learning_rate", "1e300",
                        "--grad_clip", "0", "--seed", "1"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert r.returncode == 2
    assert "Warning" not in r.stderr, r.stderr
    assert_cli_error(r.returncode, r.stderr, "made the weights non-finite")


def test_explain_runs_after_the_int8_merge(capsys):
    """`npgpt2 explain` crashed with AttributeError: load_for_generation read --dtype, a flag
    explain does not have (it runs the plain float32 layers)."""
    code, out, err = run_main(capsys, "explain", "--models_dir", FIX, "--model_name", "full", "The hacker")
    assert code == 0, err
    assert "Traceback" not in err and out
