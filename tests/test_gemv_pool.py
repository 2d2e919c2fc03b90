"""gemv_pool's job machinery: the parameters a job is posted with, and a clean exit.

The kernels a job runs are held equal to NumPy in test_gemv.py and test_quant_int8dot.py.
"""
import os
import shutil
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


# One int8 GEMV's data in a child process: a (256, 64) weight, one row of activations.
GEMV_DATA = """
import numpy as np
from npgpt2 import quant_kernels
rng = np.random.default_rng(0)
q = rng.integers(-127, 128, (256, 64), dtype=np.int8)
s = rng.random((256, 1), dtype=np.float32)
x = rng.standard_normal((1, 64)).astype(np.float32)
"""

# A short run: int8 GEMVs on two threads (the worker used) for a while, then the process ends
# at once, as a user's script that prints one generation does.
SHORT_RUN = GEMV_DATA + """
import time
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


# Both thread counts of one int8 GEMV, through the fallback kernel (_dot_rows: every machine
# runs it): the one-thread call runs int8_dot's kernel itself, the two-thread call the copy
# compiled into gemv_pool._chunk.
BOTH_PATHS = GEMV_DATA + """
from npgpt2 import threads
threads.gemv_threads = lambda work: 1
one = quant_kernels.int8_matmul(x, q, s)
threads.gemv_threads = lambda work: 2
two = quant_kernels.int8_matmul(x, q, s)
print(float(one.sum()), float(two.sum()))
"""


def test_an_edited_kernel_reaches_the_pool_through_numbas_cache(tmp_path):
    """Numba keys gemv_pool._chunk's cache on gemv_pool.py alone: after an edit of int8_dot.py
    (or an upgrade over an old cache) the two-thread GEMV ran the old kernel while the
    one-thread GEMV ran the new one. jit.drop_stale_cache now drops gemv_pool's cache then."""
    shutil.copytree(ROOT / "npgpt2", tmp_path / "npgpt2", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"), NPGPT2_INT8_DOT="madd")

    def both():
        r = subprocess.run([sys.executable, "-c", BOTH_PATHS], env=env, capture_output=True, text=True,
                           cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return [float(v) for v in r.stdout.split()]

    one, two = both()  # compiles both into the cache
    assert one == two
    kernel = tmp_path / "npgpt2" / "int8_dot.py"
    line = "acc += np.float32(np.int32(s)) * (ws[r, g] * xs[n, g])"
    source = kernel.read_text()
    assert source.count(line) == 1
    kernel.write_text(source.replace(line, line + " + np.float32(1000.0)"))  # each output + 1000 per group
    one_after, two_after = both()
    assert abs(one_after - (one + 1000.0 * 256)) < 1.0  # the edit is in effect on one thread ...
    assert two_after == one_after  # ... and on two
