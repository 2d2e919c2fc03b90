"""Whole-model loss and every gradient against torch autograd (HF transformers' GPT-2) on the
checkpoint written by real TensorFlow. References: tests/fixtures/tiny_reference.npz from
tools/make_fixtures.py; never from npgpt2. Both the Numba and the plain path are checked.

Error measure per parameter: ||ours - torch|| / ||torch||.
"""
from pathlib import Path

import numpy as np
import pytest

import npgpt2
from npgpt2.model import param_shapes

FIX = Path(__file__).parent / "fixtures"
REF = np.load(FIX / "tiny_reference.npz")


def rel(ours, ref):
    return float(np.linalg.norm(ours.astype(np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("dtype, tol, prefix, loss_key", [
    (np.float64, 1e-7, "grad/", "loss_f64"),
    (np.float32, 1e-3, "grad32/", "loss_f32"),
])
def test_loss_and_every_grad_match_torch(path, dtype, tol, prefix, loss_key):
    model = npgpt2.load_model(FIX / "tiny", dtype=dtype)
    loss, grads = model.loss_and_grads(REF["tokens"], REF["targets"])
    assert loss == pytest.approx(float(REF[loss_key]), rel=tol)
    names = list(param_shapes(model.hparams))
    assert sorted(grads) == sorted(names)
    assert sorted(k[len(prefix):] for k in REF.files if k.startswith(prefix)) == sorted(names)
    worst = {}
    for name in names:
        assert grads[name].dtype == dtype and grads[name].shape == REF[prefix + name].shape, name
        worst[name] = rel(grads[name], REF[prefix + name])
    bad = {k: f"{v:.1e}" for k, v in worst.items() if not v <= tol}
    assert not bad, f"gradients off by more than {tol}: {bad}"


@pytest.mark.parametrize("rows, block", [(5, 7), (1, 96), (32, 1)])
def test_head_in_chunks_matches_torch(path, rows, block, monkeypatch):
    """loss_and_grads computes the logits HEAD_ROWS positions at a time and adds the head's
    wte gradient HEAD_VOCAB_BLOCK rows at a time; lowered here so that the fixture's 2 x 16
    positions and 96 tokens take several chunks of each (the last one partial), and the same
    torch references hold."""
    monkeypatch.setattr(npgpt2.model_loss, "HEAD_ROWS", rows)
    monkeypatch.setattr(npgpt2.model_loss, "HEAD_VOCAB_BLOCK", block)
    test_loss_and_every_grad_match_torch(path, np.float64, 1e-7, "grad/", "loss_f64")
    test_loss_and_every_grad_match_torch(path, np.float32, 1e-3, "grad32/", "loss_f32")


def test_tied_embedding_gets_head_gradient(path):
    """Rows of model/wte for tokens never input still get the output head's gradient."""
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    _, grads = model.loss_and_grads(REF["tokens"], REF["targets"])
    unused = sorted(set(range(96)) - set(REF["tokens"].ravel().tolist()))
    assert unused
    np.testing.assert_allclose(grads["model/wte"][unused], REF["grad/model/wte"][unused], rtol=1e-7, atol=1e-12)
    assert np.abs(REF["grad/model/wte"][unused]).max() > 1e-4
