"""Data-parallel pieces (npgpt2/dist.py): the launcher check, seeds, and the bucketed in-place
Allreduce run for real under `mpirun -n 2` (skipped with a reason where MPI is not installed)."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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


# CI (.ci/run) sets NPGPT2_REQUIRE_MPI=1: there a missing MPI fails instead of skipping the tests
REQUIRED = os.environ.get("NPGPT2_REQUIRE_MPI") == "1"
needs_mpi = pytest.mark.skipif(mpi_available() is not None and not REQUIRED, reason=str(mpi_available()))


def test_mpi_is_installed_where_required():
    if REQUIRED:
        assert mpi_available() is None, f"NPGPT2_REQUIRE_MPI=1 but {mpi_available()}"


# mpirun as root on a 2-core machine: allow root, allow more ranks than cores, this checkout first
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONPATH": str(ROOT)}


def mpirun(n, args, timeout=120, env=None):
    """Run `python args...` as n ranks on this machine; returns the CompletedProcess."""
    return subprocess.run(["mpirun", "-n", str(n), sys.executable, *args], env={**os.environ, **MPI_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_not_launched_means_local_and_no_mpi4py():
    env = {"PATH": "/usr/bin"}
    assert not dist.launched_by_mpi(env)
    comm = dist.get_comm(env)
    assert type(comm) is dist.SingleProcess and (comm.rank, comm.world_size, comm.is_main) == (0, 1, True)
    g = {"a": np.arange(3.0)}
    assert comm.allreduce_mean(g, 2.5) == 2.5
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
r, n = comm.rank, comm.world_size
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
    c.allreduce_sum(g, ["big", "small1", "small2"])
    assert {k: id(v) for k, v in g.items()} == ids   # in place
    want = {k: sum(grads(q, np.float64)[k] for q in range(n)) for k in ("big", "small1", "small2")}
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for k, w in want.items():
        assert np.abs(g[k] - w).max() <= tol, (k, np.abs(g[k] - w).max())
    assert np.array_equal(g["skip"], before["skip"])
g = {"a": np.full(3, r + 1.0)}
assert comm.allreduce_mean(g, float(r)) == (n - 1) / 2 and g["a"].tolist() == [(n + 1) / 2] * 3
assert comm.any(r == n - 1) and not comm.any(False)
got = comm.gather({"rank": r})
assert (got == [{"rank": q} for q in range(n)]) if r == 0 else got is None
assert comm.bcast(r + 10) == 10
big = {"x": np.arange(100, dtype=np.float32).reshape(4, 25), "s": np.array("state"), "e": np.zeros(0)}
c = dist.MPIComm(bucket_bytes=64)  # the 400-byte array goes in 7 pieces
got = c.bcast_arrays(big if r == 0 else None)
assert all(np.array_equal(got[k], big[k]) and got[k].dtype == big[k].dtype for k in big)
open(f"{sys.argv[1]}/ok{r}", "w").close()  # a file per rank: their stdout lines can interleave
"""


@needs_mpi
def test_allreduce_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = mpirun(2, [str(script), str(tmp_path)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in tmp_path.glob("ok*")) == ["ok0", "ok1"]


# ---------------------------------------------------------------- training over MPI
FIX = ROOT / "tests" / "fixtures"

EQUIV = r"""
import sys, json, numpy as np
from npgpt2 import dist
from npgpt2.model import init_model
from npgpt2.train import TrainConfig, fit
ranks, dtype = int(sys.argv[1]), sys.argv[2]
comm = dist.get_comm() if ranks > 1 else dist.SingleProcess()
hp = dict(n_vocab=96, n_ctx=16, n_embd=24, n_head=3, n_layer=2)
model = init_model(hp, seed=3, dtype=dtype)
rng = np.random.default_rng(0)
tokens = rng.integers(0, 96, 3000).astype(np.uint16)
cfg = TrainConfig(context=8, batch_size=2, accumulate_gradients=2 if ranks == 1 else 1, learning_rate=3e-3,
                  weight_decay=0.1, warmup=2, seed=11, steps=5, sample_every=0, save_every=0, plot=False,
                  shared_stream=True, grad_clip=1.0)
out = fit(model, tokens, cfg, comm=comm)
if comm.is_main:
    np.savez(sys.argv[3], loss=out["loss"], **{k.replace("/", "|"): v for k, v in model.params.items()})
"""


@needs_mpi
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-6)])
def test_two_ranks_equal_one_rank_accumulating_two(tmp_path, dtype, tol):
    """2 ranks x batch 2 == 1 process x batch 2 x 2 micro-batches on the same batches (shared_stream)."""
    script = tmp_path / "equiv.py"
    script.write_text(EQUIV)
    one = subprocess.run([sys.executable, str(script), "1", dtype, str(tmp_path / "one.npz")], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = mpirun(2, [str(script), "2", dtype, str(tmp_path / "two.npz")], timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert set(a.files) == set(b.files) and len(a.files) > 10
    worst = max(float(np.abs(a[k] - b[k]).max() / max(1.0, np.abs(a[k]).max())) for k in a.files)
    assert worst <= tol, worst
    # the runs trained: the weights moved away from their (shared) initialisation
    from npgpt2.model import init_model
    w0 = init_model(dict(n_vocab=96, n_ctx=16, n_embd=24, n_head=3, n_layer=2), seed=3, dtype=dtype).params
    assert float(np.abs(a["model|wte"] - w0["model/wte"]).max()) > 1e-3


def tiny_dataset(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tok.npz"
    np.savez(path, np.tile(np.arange(40, dtype=np.uint16), 100) ^ (rng.random(4000) < 0.05).astype(np.uint16))
    return path


def train_args(tmp_path, run, *extra):
    return ["-m", "npgpt2.cli", "train", "--dataset", str(tiny_dataset(tmp_path)), "--models_dir", str(FIX),
            "--model_name", "tiny", "--checkpoint_dir", str(tmp_path / "ck"), "--run_name", run, "--context", "8",
            "--batch_size", "2", "--learning_rate", "1e-2", "--seed", "5", "--sample_every", "0",
            "--save_every", "0", *map(str, extra)]


def params_of(folder):
    from npgpt2.model import load_model
    return load_model(folder).params


@needs_mpi
def test_cli_two_ranks_resume_exact_and_logs_world_size(tmp_path):
    """`mpirun -n 2 npgpt2 train`: rank 0 alone logs (with ranks=2) and saves; 3 + 3 steps with a
    resume in between == 6 steps straight, each rank continuing its own batch stream."""
    straight = mpirun(2, train_args(tmp_path, "straight", "--steps", 6))
    assert straight.returncode == 0, straight.stdout + straight.stderr
    lines = [x for x in straight.stderr.splitlines() if "loss=" in x]
    assert len(lines) == 6 and all(x.endswith("ranks=2") for x in lines), straight.stderr
    for _ in range(2):
        r = mpirun(2, train_args(tmp_path, "resumed", "--steps", 3))
        assert r.returncode == 0, r.stdout + r.stderr
    state = np.load(tmp_path / "ck" / "resumed" / "train_state-6.npz")
    assert len(json.loads(str(state["rank_samplers"]))) == 2
    a, b = params_of(tmp_path / "ck" / "straight"), params_of(tmp_path / "ck" / "resumed")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # a different number of processes: weights and optimizer resume, the data order changes
    one = subprocess.run([sys.executable, *train_args(tmp_path, "resumed", "--steps", 1)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and "saved by 2 process(es) and continues with 1" in one.stderr, one.stderr


@needs_mpi
def test_non_finite_loss_stops_every_rank(tmp_path):
    r = mpirun(2, train_args(tmp_path, "nan", "--steps", 5, "--optimizer", "sgd", "--learning_rate", "1e300"))
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if x.startswith("npgpt2: error")]
    assert errors and all("non-finite" in x or "became" in x for x in errors), r.stderr
    assert not list((tmp_path / "ck" / "nan").glob("model-*.index"))  # nothing non-finite saved
    assert "Traceback" not in r.stderr


def _rank_pids(marker):
    """pid -> MPI rank of the processes whose command line holds marker."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker not in (d / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except OSError:
            continue
        if "OMPI_COMM_WORLD_RANK" in env:
            out[int(d.name)] = int(env["OMPI_COMM_WORLD_RANK"])
    return out


@contextlib.contextmanager
def training(tmp_path, run):
    """`mpirun -n 2 npgpt2 train --steps 0` (until stopped) in run folder `run`: yields the
    mpirun process once rank 0 has logged its first step, and kills it on the way out."""
    proc = subprocess.Popen(["mpirun", "-n", "2", sys.executable, *train_args(tmp_path, run, "--steps", 0)],
                            env={**os.environ, **MPI_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        seen, t0 = [], time.time()
        while not any("loss=" in line for line in seen):
            if time.time() - t0 > 120 or proc.poll() is not None:
                raise AssertionError("no training step logged:\n" + "".join(seen))
            seen.append(proc.stderr.readline())
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_mpi
def test_a_dead_rank_ends_the_run_within_30s(tmp_path):
    marker = f"dead-{os.getpid()}"
    with training(tmp_path, marker) as proc:
        victims = [pid for pid, rank in _rank_pids(marker).items() if rank == 1]
        assert victims, "rank 1 not found"
        t0 = time.time()
        os.kill(victims[0], signal.SIGKILL)
        proc.wait(timeout=30)
        assert time.time() - t0 < 30
        assert proc.returncode != 0
    assert not _rank_pids(marker), "a rank outlived the run"


@needs_mpi
def test_sigusr1_saves_once_and_stops_every_rank(tmp_path):
    marker = f"usr1-{os.getpid()}"
    with training(tmp_path, marker) as proc:
        proc.send_signal(signal.SIGUSR1)  # mpirun forwards it to every rank
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = list((tmp_path / "ck" / marker).glob("model-*.index"))
    assert len(saved) == 1, saved
    step = int(saved[0].name[len("model-"):-len(".index")])
    state = np.load(tmp_path / "ck" / marker / f"train_state-{step}.npz")
    assert len(json.loads(str(state["rank_samplers"]))) == 2
