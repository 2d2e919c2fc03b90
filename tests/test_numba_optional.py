"""Without Numba, `import npgpt2` works and the plain path runs, after one logged warning.

A subprocess hides numba behind a sys.meta_path finder that raises ImportError for it; the
results it prints are compared with this process's (which has Numba) and with the fixtures.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import npgpt2
from npgpt2.checkpoint.crc32c import crc32c, masked_crc32c

ROOT = Path(__file__).parent.parent
FIX = Path(__file__).parent / "fixtures"

CHILD = r"""
import gzip, importlib.abc, json, logging, sys
import numpy as np

class NoNumba(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "numba" or name.startswith("numba."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, NoNumba())
warnings = []

class Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())

logging.getLogger().addHandler(Collect())
fix, out = sys.argv[1], sys.argv[2]

import npgpt2
from npgpt2 import layers, model as model_module
from npgpt2.checkpoint.crc32c import crc32c, masked_crc32c

assert model_module.ops() is layers
ref = np.load(f"{fix}/tiny_reference.npz")
m64 = npgpt2.load_model(f"{fix}/tiny", dtype=np.float64)  # verify=True: every tensor's crc32c
m32 = npgpt2.load_model(f"{fix}/full")
loss, grads = m64.loss_and_grads(ref["tokens"], ref["targets"])
from npgpt2 import optim
assert optim._adamw_impl() is optim.adamw_update
data = np.random.default_rng(5).integers(0, 256, 100_003, dtype=np.uint8)
enc = npgpt2.load_tokenizer()
text = "Hello world, it's npgpt2 without Numba!"
cases = json.load(gzip.open(f"{fix}/tokenizer_cases.json.gz"))["cases"]
jargon = next(c for c in cases if c["name"] == "jargon 64k")  # long: the fast engine's size
np.savez(out, logits=m64.forward(ref["tokens"]), full=m32.forward(ref["tokens"][:1] % 96),
         loss=loss, grad_wte=grads["model/wte"])
print(json.dumps({"numba_loaded": "numba" in sys.modules, "warnings": warnings,
                  "crc": [crc32c(b"123456789"), crc32c(data), crc32c(data[3:]), masked_crc32c(data[:13])],
                  "ids": enc.encode(text), "decoded": enc.decode(enc.encode(text)),
                  "jargon_ok": enc.encode(jargon["text"]) == jargon["ids"]}))
"""


def test_without_numba_everything_runs_on_the_plain_path(tmp_path):
    out = tmp_path / "child.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NPGPT2_PLAIN", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(FIX), str(out)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["numba_loaded"] is False
    assert len(got["warnings"]) == 1, got["warnings"]
    assert "Numba is unavailable" in got["warnings"][0] and "plain NumPy" in got["warnings"][0]
    # the checksums equal the Numba ones (and the standard check value)
    data = np.random.default_rng(5).integers(0, 256, 100_003, dtype=np.uint8)
    assert got["crc"] == [0xE3069283, crc32c(data), crc32c(data[3:]), masked_crc32c(data[:13])]
    # the forward and the gradients equal this process's (Numba) ones and HF's
    child = np.load(out)
    ref = np.load(FIX / "tiny_reference.npz")
    m64 = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    assert np.abs(child["logits"] - m64.forward(ref["tokens"])).max() <= 1e-12
    assert np.abs(child["logits"] - ref["logits_f64"]).max() <= 1e-9
    m32 = npgpt2.load_model(FIX / "full")
    assert np.abs(child["full"] - m32.forward(ref["tokens"][:1] % 96)).max() <= 1e-5
    loss, grads = m64.loss_and_grads(ref["tokens"], ref["targets"])
    assert abs(float(child["loss"]) - float(ref["loss_f64"])) <= 1e-12
    assert np.abs(child["grad_wte"] - ref["grad/model/wte"]).max() <= 1e-9
    assert np.abs(child["grad_wte"] - grads["model/wte"]).max() <= 1e-12
    # the tokenizer's plain engine gives tiktoken's ids (tokenizer_cases.json.gz) and round-trips
    assert got["jargon_ok"] is True
    enc = npgpt2.load_tokenizer()
    text = "Hello world, it's npgpt2 without Numba!"
    assert got["ids"] == enc.encode(text)
    assert got["decoded"] == text


def test_each_kernel_module_imports_first():
    """The Numba modules import one another (quant_kernels -> gemv_pool -> kernels ->
    quant_kernels): each must import as the first npgpt2 module of a fresh interpreter (a
    name taken from a partly imported module at import time was an ImportError)."""
    mods = ["gemv", "gemv_pool", "int8_dot", "kernels", "quant", "quant_kernels", "model_fast", "batch_decode"]
    code = "import importlib, sys; importlib.import_module('npgpt2.' + sys.argv[1])"
    for mod in mods:
        r = subprocess.run([sys.executable, "-c", code, mod], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, (mod, r.stderr.strip().splitlines()[-1:])
