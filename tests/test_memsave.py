"""`train --memory_saving_gradients`: the forward keeps only each block's input and the backward
re-runs one block at a time, so the gradients are the normal path's (which tests/test_grads.py
holds against PyTorch autograd and finite differences) while the activations kept shrink
from n_layer blocks' to one block's (tracemalloc). Also: training with the flag, with
--accumulate_gradients, over MPI and across a resume; the up-front memory estimate.
"""
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from test_dist import FIX, ROOT, mpirun, needs_mpi, params_of, train_args
from test_train import run_fit, tiny_cfg, tiny_tokens

from npgpt2 import memory
from npgpt2.model import init_model

HP = dict(n_vocab=64, n_ctx=32, n_embd=16, n_head=2, n_layer=3)


def batch(B=3, T=20, V=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def worst_relative(a, b):
    """max over params of max|a - b| / max|a|."""
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-14), (np.float32, 1e-6)])
def test_loss_and_grads_equal_the_normal_path(path, dtype, tol):
    model = init_model(HP, seed=1, dtype=dtype)
    inputs, targets = batch()
    loss, grads = model.loss_and_grads(inputs, targets)
    grads = {k: v.copy() for k, v in grads.items()}
    loss_ms, grads_ms = model.loss_and_grads(inputs, targets, memory_saving=True)
    assert loss_ms == loss  # the forward is not changed at all
    assert set(grads_ms) == set(grads) == set(model.params)
    assert all(grads_ms[k].shape == model.params[k].shape and grads_ms[k].dtype == dtype for k in grads)
    assert all(np.abs(grads[k]).max() > 0 for k in grads)  # every gradient is there to compare
    assert worst_relative(grads, grads_ms) <= tol


def test_forward_with_saves_keeps_block_inputs_only_and_backward_matches(path):
    model = init_model(HP, seed=2, dtype=np.float64)
    inputs, _ = batch(seed=1)
    dlogits = np.random.default_rng(2).standard_normal((3, 20, HP["n_vocab"]))
    logits, saved = model.forward_with_saves(inputs)
    full_blocks = [dict(b) for b in saved["blocks"]]
    grads, dembed = model.backward(dlogits, saved)
    logits_ms, saved_ms = model.forward_with_saves(inputs, memory_saving=True)
    assert np.array_equal(logits, logits_ms)
    # each block kept its input, the very array the normal forward saved as resid_pre, and nothing else
    assert [list(b) for b in saved_ms["blocks"]] == [["resid_pre"]] * HP["n_layer"]
    assert all(np.array_equal(b["resid_pre"], f["resid_pre"]) for b, f in zip(saved_ms["blocks"], full_blocks))
    assert all(len(f) > 1 for f in full_blocks)
    grads_ms, dembed_ms = model.backward(dlogits, saved_ms)
    assert saved_ms["blocks"] == []  # consumed, as the normal path's
    assert worst_relative(grads, grads_ms) <= 1e-14
    assert np.abs(dembed - dembed_ms).max() <= 1e-14 * np.abs(dembed).max()


def peak_traced_bytes(n_layer, memory_saving):
    """Peak Python-traced memory of one loss_and_grads on the plain layers (their arrays are
    NumPy's, which tracemalloc sees; the Numba kernels allocate where it cannot look)."""
    hp = dict(n_vocab=32, n_ctx=64, n_embd=16, n_head=4, n_layer=n_layer)
    model = init_model(hp, seed=0, dtype=np.float64)
    inputs, targets = batch(B=8, T=64, V=32)
    model.loss_and_grads(inputs, targets, memory_saving=memory_saving)  # warm-up (imports, caches)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        model.loss_and_grads(inputs, targets, memory_saving=memory_saving)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_activations_are_not_kept(monkeypatch):
    """Six more layers add six blocks' activations to the normal path's peak, but less than one
    block's to the memory-saving path's (only their inputs, and their gradients)."""
    monkeypatch.setenv("NPGPT2_PLAIN", "1")
    B, T, C, NH, item = 8, 64, 16, 4, 8
    # what one block saves on the plain path, counted from the layer shapes: resid_pre, qkv (3C),
    # z, resid_mid, mlp.pre (4C) a token, and the (B, NH, T, T) attention probabilities
    block = (B * T * 10 * C + B * NH * T * T) * item
    normal = peak_traced_bytes(8, False) - peak_traced_bytes(2, False)
    saving = peak_traced_bytes(8, True) - peak_traced_bytes(2, True)
    assert normal >= 6 * block * 0.9, (normal, block)
    assert saving < block, (saving, block)
    assert peak_traced_bytes(8, True) < peak_traced_bytes(8, False) / 2
    # the up-front memory check's estimate follows the same flag: an upper bound within 2x
    hp = dict(n_vocab=32, n_ctx=64, n_embd=16, n_head=4, n_layer=8)
    for flag in (False, True):
        measured = peak_traced_bytes(8, flag)
        estimate = memory.training_bytes(hp, B, T, np.float64, memory_saving=flag)
        assert measured / 2 <= estimate, (flag, measured, estimate)


def test_memory_estimate_counts_one_chunk_of_rows(monkeypatch):
    """With the block re-run 2 rows at a time, the memory-saving estimate holds one chunk's
    block activations, not the batch's: smaller, and still an upper bound of the traced peak."""
    from npgpt2 import memsave
    monkeypatch.setenv("NPGPT2_PLAIN", "1")
    hp = dict(n_vocab=32, n_ctx=64, n_embd=16, n_head=4, n_layer=8)
    whole = memory.training_bytes(hp, 8, 64, np.float64, memory_saving=True)
    monkeypatch.setattr(memsave, "CHUNK_POSITIONS", 128)
    assert memsave.chunk_rows(8, 64) == 2
    chunked = memory.training_bytes(hp, 8, 64, np.float64, memory_saving=True)
    block = (10 * 16 + 2 * 4 * 64) * 64 * 8  # a row's block saves (bytes)
    assert whole - chunked == (8 - 2) * block
    assert peak_traced_bytes(8, True) / 2 <= chunked


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-14), (np.float32, 5e-6)])
@pytest.mark.parametrize("adapters", [False, True])
def test_chunks_of_rows_give_the_normal_paths_gradients(monkeypatch, dtype, tol, adapters):
    """A batch of several chunks (memsave.py re-runs a block 2 rows at a time here; 1 row of
    T=1024 at 124M): the same loss, and the gradients within rounding (the chunks' weight
    gradients are added one after another instead of inside one GEMM), with LoRA adapters too."""
    from npgpt2 import lora, memsave
    model = init_model(HP, seed=3, dtype=dtype)
    if adapters:
        lora.attach(model, lora.init_adapters(HP, lora.LoraConfig(r=2, alpha=4)))
        rng = np.random.default_rng(4)
        for a in model.lora.params.values():  # B is zero at init: make every gradient non-zero
            a[...] = rng.standard_normal(a.shape) * 0.1
    inputs, targets = batch(B=5, T=20)
    loss, grads = model.loss_and_grads(inputs, targets)
    grads = {k: v.copy() for k, v in grads.items()}
    monkeypatch.setattr(memsave, "CHUNK_POSITIONS", 40)
    assert memsave.chunk_rows(5, 20) == 2  # chunks of rows 0-1, 2-3, 4
    loss_ms, grads_ms = model.loss_and_grads(inputs, targets, memory_saving=True)
    assert loss_ms == loss  # each row's forward is the whole batch's, bit for bit
    assert set(grads_ms) == set(grads) and all(np.abs(grads[k]).max() > 0 for k in grads)
    assert worst_relative(grads, grads_ms) <= tol


def test_one_chunks_activations_at_a_time(monkeypatch):
    """At B*T > memsave.CHUNK_POSITIONS the memory-saving step re-runs each block a chunk of
    rows at a time, in the forward too, so its peak is set by one chunk's (B/4, NH, T, T)
    attention arrays (the plain softmax and its backward hold about five at once), not the
    whole batch's: under two full-batch (B, NH, T, T) matrices. (Measured: the normal path
    6.1 of them; re-running whole blocks, the code before the chunks, 4.6; chunks 1.35.)"""
    monkeypatch.setenv("NPGPT2_PLAIN", "1")
    from npgpt2 import memsave
    B, T, C, NH, L, item = 32, 128, 16, 2, 2, 8
    assert memsave.chunk_rows(B, T) == 8  # four chunks
    attention = B * NH * T * T * item  # one (B, NH, T, T) float64 array: 8 MiB
    hp = dict(n_vocab=32, n_ctx=T, n_embd=C, n_head=NH, n_layer=L)
    model = init_model(hp, seed=0, dtype=np.float64)
    inputs, targets = batch(B=B, T=T, V=32)

    def peak(memory_saving):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            model.loss_and_grads(inputs, targets, memory_saving=memory_saving)
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    normal, saving = peak(False), peak(True)
    assert normal > 4 * attention, (normal, attention)  # the shape is one where attention sets the peak
    # besides a chunk's block: the L block inputs, the gradient flowing back and the
    # parameters' gradients, each B*T*C floats or fewer (1/16 of `attention` here)
    assert saving < 2 * attention, (saving, attention)


def test_memory_check_accepts_with_the_flag_what_it_refuses_without(monkeypatch):
    from npgpt2.errors import Npgpt2Error
    from npgpt2.train import TrainConfig, check_train_memory
    model = init_model(dict(n_vocab=64, n_ctx=256, n_embd=32, n_head=4, n_layer=8))
    cfg = TrainConfig(batch_size=16)
    need = memory.training_bytes(model.hparams, 16, 256, np.float32)
    monkeypatch.setattr(memory, "available_bytes", lambda: need // 2)
    with pytest.raises(Npgpt2Error, match="--batch_size 16 needs about .* or --memory_saving_gradients"):
        check_train_memory(model, cfg, 256)
    check_train_memory(model, TrainConfig(batch_size=16, memory_saving_gradients=True), 256)


def test_training_with_the_flag_equals_training_without(tmp_path):
    """fit with --memory_saving_gradients and --accumulate_gradients 2: the same losses and
    the same weights, bit for bit, as without the flag; and it resumes exactly."""
    tokens = tiny_tokens()
    kw = dict(accumulate_gradients=2, steps=6, weight_decay=0.1)
    plain = run_fit(tiny_cfg(tmp_path, run_name="plain", **kw), tokens)
    saving = run_fit(tiny_cfg(tmp_path, run_name="saving", memory_saving_gradients=True, **kw), tokens)
    assert saving["history"]["loss"] == plain["history"]["loss"]
    assert len(set(plain["history"]["loss"])) == 6
    a, b = params_of(tmp_path / "checkpoint" / "plain"), params_of(tmp_path / "checkpoint" / "saving")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for _ in range(2):
        run_fit(tiny_cfg(tmp_path, run_name="split", memory_saving_gradients=True, **{**kw, "steps": 3}), tokens)
    c = params_of(tmp_path / "checkpoint" / "split")
    assert all(np.array_equal(a[k], c[k]) for k in a)


def test_cli_flag(tmp_path):
    r = subprocess.run([sys.executable, *train_args(tmp_path, "ms", "--steps", 2, "--memory_saving_gradients")],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ck" / "ms" / "model-2.index").is_file()


@needs_mpi
def test_two_ranks_with_the_flags_resume_exactly(tmp_path):
    """mpirun -n 2 with --memory_saving_gradients --noise 0.2: 2 + 2 steps with a resume between
    == 4 steps straight (each rank's noise stream saved and restored)."""
    flags = ("--memory_saving_gradients", "--noise", 0.2)
    straight = mpirun(2, train_args(tmp_path, "straight", "--steps", 4, *flags), timeout=300)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    for _ in range(2):
        r = mpirun(2, train_args(tmp_path, "resumed", "--steps", 2, *flags), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    states = json.loads(str(np.load(tmp_path / "ck" / "resumed" / "train_state-4.npz")["noise/rank_states"]))
    assert len(states) == 2 and states[0] != states[1]
    a, b = params_of(tmp_path / "ck" / "straight"), params_of(tmp_path / "ck" / "resumed")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model/wte"], params_of(FIX / "tiny")["model/wte"])
