"""Data-parallel pieces (npgpt2/dist.py): the launcher check, seeds, and the bucketed in-place
Allreduce run for real under `mpirun -n 2` (skipped with a reason where MPI is not installed)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npgpt2 import dist
from npgpt2.errors import Npgpt2Error

ROOT = Path(__file__).resolve().parents[1]


def mpi_available():
    if shutil.which("mpirun") is None:
        return "mpirun not found (install Debian's openmpi-bin)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install '.[mpi]')"
    return None


needs_mpi = pytest.mark.skipif(mpi_available() is not None, reason=str(mpi_available()))


def mpirun(n, args, timeout=120, env=None):
    """Run `python args...` as n ranks on this machine; returns the CompletedProcess."""
    e = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
         "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(["mpirun", "-n", str(n), sys.executable, *args], env=e, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_not_launched_means_local_and_no_mpi4py():
    env = {"PATH": "/usr/bin"}
    assert not dist.launched_by_mpi(env)
    comm = dist.get_comm(env)
    assert isinstance(comm, dist.LocalComm) and (comm.rank, comm.size) == (0, 1)
    g = {"a": np.arange(3.0)}
    comm.allreduce_grads(g, ["a"])
    assert g["a"].tolist() == [0.0, 1.0, 2.0]
    # a plain run never imports mpi4py
    code = "import npgpt2.train, npgpt2.dist, sys; print('mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))},
                         cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_launched_without_mpi4py_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` raise ImportError
    with pytest.raises(Npgpt2Error, match=r"mpi4py is not installed.*npgpt2\[mpi\]"):
        dist.get_comm({"OMPI_COMM_WORLD_SIZE": "2"})


def test_rank_seeds_are_distinct_and_stable():
    seeds = [dist.rank_seed(1234, r) for r in range(8)]
    assert seeds[0] == 1234 and len(set(seeds)) == 8
    assert seeds == [dist.rank_seed(1234, r) for r in range(8)]
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_packs_keep_dtype_and_bucket():
    ts = [np.zeros(10, np.float32), np.zeros(10, np.float32), np.zeros(3, np.float64), np.zeros(30, np.float32)]
    groups = dist._packs(ts, bucket_bytes=80)
    assert [[t.size for t in g] for g in groups] == [[10, 10], [3], [30]]


WORKER = r"""
import sys, numpy as np
from npgpt2 import dist
comm = dist.get_comm()
assert isinstance(comm, dist.MPIComm), type(comm)
r, n = comm.rank, comm.size
def grads(rank, dtype):
    rng = np.random.default_rng(100 + rank)
    return {"big": rng.standard_normal((40, 25)).astype(dtype),     # 1000 elements: sliced
            "small1": rng.standard_normal(7).astype(dtype),         # packed
            "small2": rng.standard_normal((3, 5)).astype(dtype),    # packed
            "skip": rng.standard_normal(4).astype(dtype)}           # not in names: untouched
for dtype in (np.float64, np.float32):
    c = dist.MPIComm(bucket_bytes=64 * np.dtype(dtype).itemsize)
    g = grads(r, dtype)
    before = {k: v.copy() for k, v in g.items()}
    ids = {k: id(v) for k, v in g.items()}
    c.allreduce_grads(g, ["big", "small1", "small2"])
    assert {k: id(v) for k, v in g.items()} == ids   # in place
    want = {k: sum(grads(q, np.float64)[k] for q in range(n)) for k in ("big", "small1", "small2")}
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for k, w in want.items():
        assert np.abs(g[k] - w).max() <= tol, (k, np.abs(g[k] - w).max())
    assert np.array_equal(g["skip"], before["skip"])
assert comm.sum(r + 1.0) == n * (n + 1) / 2
assert comm.any(r == n - 1) and not comm.any(False)
got = comm.gather({"rank": r})
assert (got == [{"rank": q} for q in range(n)]) if r == 0 else got is None
assert comm.scatter([f"to{q}" for q in range(n)] if r == 0 else None) == f"to{r}"
print("ok", r)
"""


@needs_mpi
def test_allreduce_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = mpirun(2, [str(script)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(line for line in out.stdout.splitlines() if line.startswith("ok")) == ["ok 0", "ok 1"]
