"""gemv_pool's job machinery: the parameters a job is posted with, and a clean exit.

The kernels a job runs are held equal to NumPy in test_gemv.py and test_quant_int8dot.py.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from npgpt2 import gemv_pool

ROOT = Path(__file__).resolve().parents[1]


def test_job_params_are_numpys_addresses_then_the_sizes():
    a = np.zeros((3, 5), np.float32)
    b = np.zeros((7, 11), np.int8)[:, 2:]  # a view: its own address, not its base's
    c = np.zeros(0, np.float32)  # an empty bias
    d = np.zeros((4, 2), np.int32)
    got = gemv_pool.job_params((a, b, c, d), (1, 768, 2 ** 40, 0))
    assert got.dtype == np.int64
    assert got.tolist() == [a.ctypes.data, b.ctypes.data, c.ctypes.data, d.ctypes.data, 1, 768, 2 ** 40, 0]


# A short run: int8 GEMVs on two threads (the worker used) for a while, then the process ends
# at once, as a user's script that prints one generation does.
SHORT_RUN = """
import time, numpy as np
from npgpt2 import quant_kernels
rng = np.random.default_rng(0)
q = rng.integers(-127, 128, (256, 64), dtype=np.int8)
s = rng.random((256, 1), dtype=np.float32)
x = rng.standard_normal((1, 64)).astype(np.float32)
t = time.perf_counter()
quant_kernels.int8_matmul(x, q, s)
while time.perf_counter() - t < {seconds}:
    quant_kernels.int8_matmul(x, q, s)
print("done")
"""


def _short_run(cache, seconds):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NPGPT2_THREADS="2", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", SHORT_RUN.format(seconds=seconds)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_short_run_exits_cleanly_when_the_worker_loop_is_not_cached(tmp_path):
    """The worker thread's loop used to compile in the worker: a process that ended before it
    was done (a short script, once Numba's cache lacked it) died in LLVM at exit (abort or
    segfault, after its output), and so never cached it. It now compiles on the posting thread
    before the worker starts, and the worker is stopped and joined at exit."""
    cache = tmp_path / "numba-cache"
    r = _short_run(cache, 0)  # a fresh cache: compiles every kernel the run needs
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr[-2000:]
    loop = list(cache.rglob("gemv_pool._worker_spin-*"))
    assert loop, "the worker's loop was not cached by a process that used the worker"
    for _ in range(2):  # the state that crashed: everything cached but the worker's loop
        for f in cache.rglob("gemv_pool._worker_spin-*"):
            f.unlink()
        r = _short_run(cache, 1.5)
        assert r.returncode == 0 and r.stdout.strip() == "done", (r.returncode, r.stderr[-2000:])
        assert "Assertion" not in r.stderr and "Fatal" not in r.stderr, r.stderr[-2000:]
