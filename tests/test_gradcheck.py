"""`npgpt2 gradcheck` and npgpt2.gradcheck: passes on correct backward passes (the fixture
models and a tiny random one) and fails, naming the layer, when a backward is broken.

The references are central finite differences of the forward pass (npgpt2.gradcheck's
numeric_grad), here itself checked on functions whose derivative is known in closed form.
"""
from pathlib import Path

import numpy as np
import pytest

from npgpt2 import gradcheck, layers
from npgpt2.cli import main

FIX = Path(__file__).parent / "fixtures"


def test_numeric_grad_on_known_derivatives():
    x = np.array([[0.3, -1.2, 2.0], [0.7, 0.0, -0.4]])
    # L = sum(sin(x) * x^2): dL/dx = cos(x) x^2 + 2 x sin(x)
    g = gradcheck.numeric_grad(lambda: float((np.sin(x) * x * x).sum()), x)
    np.testing.assert_allclose(g, np.cos(x) * x * x + 2 * x * np.sin(x), rtol=1e-8, atol=1e-10)
    assert x[0, 0] == 0.3  # every nudge is undone
    picked = gradcheck.numeric_grad(lambda: float(np.exp(x).sum()), x, entries=[(1, 2), (0, 1)])
    np.testing.assert_allclose(picked, np.exp([x[1, 2], x[0, 1]]), rtol=1e-8)


def test_rel_error():
    assert gradcheck.rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert gradcheck.rel_error([1.0, 0.0], [0.0, 1.0]) == pytest.approx(np.sqrt(2))
    assert gradcheck.rel_error(3e-10, 0.0, floor=1e-6) == pytest.approx(3e-4)  # noise on an exact zero


def test_every_layer_passes():
    rows = gradcheck.check_layers()
    assert [r.name for r in rows] == ["layernorm", "matmul", "lora", "attention", "gelu", "crossentropy_softmax",
                                    "embedding"]
    for r in rows:
        assert r.ok and r.error < 1e-8, r


@pytest.mark.parametrize("plain", ["1", "0"])
@pytest.mark.parametrize("fixture", ["tiny", "full"])
def test_cli_passes_on_fixture_models(fixture, plain, monkeypatch, capsys):
    monkeypatch.setenv("NPGPT2_PLAIN", plain)
    assert main(["gradcheck", "--models_dir", str(FIX), "--model_name", fixture]) == 0
    out = capsys.readouterr().out
    for name in ("layernorm", "attention", "gelu", "crossentropy_softmax", "embedding",
                 "model/wte", "model/h*/attn/c_attn/w", "model/h*/mlp/c_proj/b", "model/ln_f/g"):
        assert name in out
    assert "23 of 23 checks passed" in out and " NO " not in out


def test_cli_default_tiny_model(capsys):
    assert main(["gradcheck", "--entries", "3"]) == 0
    assert "a tiny random 2-layer model" in capsys.readouterr().out


# ---------------------------------------------------------------- broken backward passes
def _wrong_gelu_backward(dout, inp):
    return dout * 0.5 * (1.0 + np.tanh(inp))  # a plausible-looking but wrong derivative


def _wrong_layernorm_backward(dout, inp, weight, mean, rstd):
    _, dw, db = BACKWARDS["layernorm_backward"](dout, inp, weight, mean, rstd)
    dnorm = dout * weight
    return (dnorm - dnorm.mean(axis=-1, keepdims=True)) * rstd[..., None], dw, db  # one mean term forgotten


def _wrong_attention_backward(dout, qkv, att, NH):
    d = BACKWARDS["attention_backward"](dout, qkv, att, NH)
    C = qkv.shape[-1] // 3
    d[..., :C] *= np.sqrt(C // NH)  # the 1/sqrt(hs) scale forgotten on the queries
    return d


def _wrong_embedding_backward(dout, inp, V, maxT):
    _, T, C = dout.shape
    dwte = np.zeros((V, C), dtype=dout.dtype)
    dwte[inp.reshape(-1)] += dout.reshape(-1, C)  # repeated tokens overwrite instead of accumulating
    dwpe = np.zeros((maxT, C), dtype=dout.dtype)
    dwpe[:T] = dout.sum(axis=0)
    return dwte, dwpe


def _wrong_matmul_backward(dout, inp, weight):
    dinp, dweight, dbias = BACKWARDS["matmul_backward"](dout, inp, weight)
    return dinp, dweight, dbias * 2


def _wrong_crossentropy_backward(dlosses, probs, targets, out=None):
    return np.multiply(probs, dlosses[..., None], out=out)  # the -onehot forgotten


def _wrong_lora_backward(dout, inp, weight, lora_A, lora_B, scaling, h):
    dinp, dA, dB = BACKWARDS["lora_backward"](dout, inp, weight, lora_A, lora_B, scaling, h)
    return dinp - (scaling * dout @ lora_B.T) @ lora_A.T, dA, dB  # x's second use (through A) forgotten


BACKWARDS = {k: getattr(layers, k) for k in ("layernorm_backward", "attention_backward", "matmul_backward",
                                             "lora_backward")}


@pytest.mark.parametrize("func, wrong, layer, model_row", [
    ("gelu_backward", _wrong_gelu_backward, "gelu", "model/h*/mlp/c_fc/w"),
    ("layernorm_backward", _wrong_layernorm_backward, "layernorm", "model/wpe"),
    ("attention_backward", _wrong_attention_backward, "attention", "model/h*/attn/c_attn/w"),
    ("embedding_backward", _wrong_embedding_backward, "embedding", "model/wte"),
    ("matmul_backward", _wrong_matmul_backward, "matmul", "model/h*/mlp/c_proj/b"),
    ("crossentropy_softmax_backward", _wrong_crossentropy_backward, "crossentropy_softmax", "model/ln_f/b"),
    ("lora_backward", _wrong_lora_backward, "lora", None),  # the fixture has no adapters: the layer row alone
])
def test_cli_fails_naming_the_broken_layer(func, wrong, layer, model_row, monkeypatch, capsys):
    monkeypatch.setattr(layers, func, wrong)
    monkeypatch.setenv("NPGPT2_PLAIN", "1")  # the model then runs the broken layers.py code too
    assert main(["gradcheck", "--models_dir", str(FIX), "--model_name", "tiny"]) == 1
    out = capsys.readouterr().out
    failed = out.split("FAILED: ", 1)[1]
    assert failed.startswith(layer + " (")
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert lines[layer][3] == "NO"
    assert all(lines[other][3] == "yes" for other in ("layernorm", "matmul", "lora", "attention", "gelu",
                                                      "crossentropy_softmax", "embedding") if other != layer)
    if model_row:  # the whole model's check catches it too
        assert lines[model_row][3] == "NO" and model_row in failed


def test_bad_entries_flag(capsys):
    assert main(["gradcheck", "--entries", "0"]) == 2
    assert "--entries must be >= 1" in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    assert main(["gradcheck", "--models_dir", str(tmp_path), "--model_name", "nope"]) == 2
    out, err = capsys.readouterr()
    assert "model folder not found" in err and out == ""  # before any check ran
