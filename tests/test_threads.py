"""The thread policy's decisions (npgpt2.threads), as pure functions of their inputs.

Whether the policy makes a busy machine faster cannot be timed reliably in a test; that
proof is benchmarks/run.py's "under load" rows. Here: the choice itself, the readers of
/proc and cgroup files (on written copies), and that a user's environment wins.
"""
import pytest

from npgpt2 import threads
from npgpt2.threads import choose_threads

BIG = 1e12  # a GEMM far above any per-thread minimum


@pytest.mark.parametrize("cpus, others, steal, want", [
    (2, 0.0, 0.0, 2),  # idle 2-core machine: both cores
    (2, 0.2, 0.0, 2),  # a little background noise still leaves 2
    (2, 1.0, 0.0, 1),  # one busy neighbour: the second thread would wait for a core
    (2, 2.0, 0.0, 1),  # two busy loops, or a 2-thread spinning job
    (2, 6.0, 0.0, 1),  # never fewer than one
    (8, 3.0, 0.0, 5),
    (8, 0.0, 0.5, 4),  # half the CPU stolen by the hypervisor
    (1, 0.0, 0.0, 1),
    (4, 0.2, 0.0, 4),
    (4, 0.3, 0.0, 3),  # a core counts as free from 0.75 of it
])
def test_threads_follow_free_cores(cpus, others, steal, want):
    assert choose_threads(BIG, cpus, others, steal) == want


def test_small_work_runs_on_fewer_threads():
    m = threads.MIN_WORK_PER_THREAD["blas"]
    assert choose_threads(0.5 * m, 8, 0.0, min_work=m) == 1  # below one thread's worth
    assert choose_threads(2.5 * m, 8, 0.0, min_work=m) == 2
    assert choose_threads(100 * m, 8, 0.0, min_work=m) == 8
    assert choose_threads(100 * m, 8, 7.0, min_work=m) == 1  # and the machine still counts
    # a decode GEMV of GPT-2 124M (768 x 2304): both cores while they are free, else one
    assert choose_threads(2 * 768 * 2304, 2, 0.0) == 2
    assert choose_threads(2 * 768 * 2304, 2, 1.0) == 1
    assert choose_threads(2 * 64 * 64, 2, 0.0) == 1  # a tiny product stays on one thread


def test_cgroup_quota(tmp_path):
    assert threads.cgroup_cpus(tmp_path) is None  # no files: no quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores -> 2 threads at most
    assert threads.cgroup_cpus(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert threads.cgroup_cpus(tmp_path) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpus(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert threads.cgroup_cpus(v1) == 3


def test_parse_proc_stat():
    text = ("cpu  100 5 50 800 10 1 2 30 0 0\n"
            "cpu0 50 2 25 400 5 0 1 15 0 0\n"
            "intr 12345\nctxt 999\nprocs_running 4\nprocs_blocked 0\n")
    assert threads.parse_proc_stat(text) == (4, 30, 100 + 5 + 50 + 800 + 10 + 1 + 2 + 30)


def test_available_cpus_within_affinity():
    import os
    assert 1 <= threads.available_cpus() <= len(os.sched_getaffinity(0))


def test_own_running_threads_counts_this_one():
    assert threads.own_running_threads() >= 1  # the calling thread is running


@pytest.fixture
def fresh_policy(monkeypatch):
    for k in threads.BLAS_ENV + threads.NUMBA_ENV + ("NPGPT2_THREADS",):
        monkeypatch.delenv(k, raising=False)
    threads.reset()
    yield monkeypatch
    threads.reset()


def test_user_environment_wins(fresh_policy):
    fresh_policy.setenv("OPENBLAS_NUM_THREADS", "2")
    threads.reset()
    assert threads.blas_threads(BIG) is None  # left to the user's setting
    fresh_policy.setenv("NPGPT2_THREADS", "1")
    threads.reset()
    assert threads.blas_threads(BIG) == 1
    assert threads.numba_threads(BIG) == 1


def test_policy_sets_blas_only_on_change(fresh_policy):
    calls = []
    threads.reset()
    p = threads._get()
    p.blas_set = calls.append
    p.next_sample = float("inf")  # no sampling: a machine with nothing else running
    p.others = [0.0]
    p.cpus = 2
    assert threads.blas_threads(BIG) == 2
    assert threads.blas_threads(BIG) == 2
    p.others = [2.0]  # two neighbours appear
    assert threads.blas_threads(BIG) == 1
    assert threads.blas_threads(10.0) == 1
    assert calls == [2, 1]


def test_part_threads_one_blas_thread_each(fresh_policy):
    """Parts on Python threads (kernels' attention forward and backward): one per free core, at most one
    per part, BLAS set to one thread while they run; one part, BLAS untouched, while no second
    core is free or while the user's environment fixes BLAS's own count."""
    calls = []
    p = threads._get()
    p.blas_set = calls.append
    p.next_sample = float("inf")
    p.others, p.cpus, p.steal = [0.0], 4, 0.0
    assert threads.part_threads(12) == 4
    assert threads.part_threads(3) == 3
    assert calls == [1]  # once: only changes are passed on
    p.cpus = 2
    p.others = [1.0]
    assert threads.part_threads(12) == 1
    assert threads.blas_threads(BIG) == 1 and calls == [1]
    fresh_policy.setenv("OPENBLAS_NUM_THREADS", "2")
    threads.reset()
    assert threads.part_threads(12) == 1
    fresh_policy.setenv("NPGPT2_THREADS", "2")  # fixed by npgpt2's own variable: two parts, BLAS 1 each
    threads.reset()
    p = threads._get()
    p.blas_set = calls.append
    assert threads.part_threads(12) == 2 and calls == [1, 1]


def test_numba_layer_never_spins():
    """workqueue's workers sleep between loops (unless the user chose a layer)."""
    import os

    import numba
    if "NUMBA_THREADING_LAYER" not in os.environ:
        assert numba.config.THREADING_LAYER == "workqueue"


def test_gemv_threads_two_only_while_a_core_is_free(fresh_policy):
    """Decode GEMVs (gemv_pool): the worker is used only while the second core is free, never
    more than the pool's two threads, and a fixed NPGPT2_THREADS is obeyed."""
    p = threads._get()
    p.next_sample = float("inf")
    p.others, p.cpus, p.steal = [0.0], 4, 0.0
    assert threads.gemv_threads(768 * 3072) == 2  # four free cores: still the pool's two
    assert threads.gemv_threads(1000) == 1  # too small to share
    p.cpus = 2
    p.others = [1.0]  # one neighbour on a 2-core machine: no free core for the worker
    assert threads.gemv_threads(768 * 3072) == 1
    fresh_policy.setenv("NPGPT2_THREADS", "1")
    threads.reset()
    assert threads.gemv_threads(768 * 3072) == 1
    fresh_policy.setenv("NPGPT2_THREADS", "8")
    threads.reset()
    assert threads.gemv_threads(768 * 3072) == 2


def test_one_passing_neighbour_does_not_take_the_second_thread(fresh_policy, monkeypatch):
    """`others` is the median of the recent samples: a neighbour seen in one sample of three
    (another process's BLAS threads spinning down) leaves both threads; seen in two, one."""
    p = threads._get()
    p.cpus, p.host_cpus, p.steal = 2, 2, 0.0
    seen = iter([0, 0, 2, 0, 2, 2])  # other processes' running threads, one per sample
    monkeypatch.setattr(threads, "parse_proc_stat", lambda text: (next(seen) + 1, 0, 1))
    monkeypatch.setattr(threads, "own_running_threads", lambda: 1)
    got = []
    for _ in range(6):
        p.next_sample = 0.0  # sample on every call
        got.append(threads.blas_threads(BIG))
    assert got == [2, 2, 2, 2, 1, 1]
    assert threads.decisions()["blas 1"] >= 2


@pytest.mark.parametrize("first", ["npgpt2", "numpy"])
def test_openblas_threads_sleep_after_a_call(first):
    """OpenBLAS's idle thread sleeps after a 2-thread GEMM instead of spinning for ~0.1 s, whether
    `import npgpt2` came before NumPy (it sets OPENBLAS_THREAD_TIMEOUT, read when OpenBLAS loads)
    or after it (the thread policy's first use restarts OpenBLAS's workers: blas_idle.py). Measured
    as the process's CPU time while it waits 0.3 s (a spinning thread: ~75-130 ms of it) and as
    the timeout OpenBLAS itself reports. A user's own setting stays."""
    import os
    import subprocess
    import sys
    imports = "import npgpt2, numpy as np" if first == "npgpt2" else "import numpy as np, npgpt2"
    code = ("import ctypes, os, time\n" + imports + "\n"
            "from npgpt2 import threads\n"
            "lib = threads._numpy_blas()[0]\n"
            "if lib.internal_api != 'openblas' or lib.threading_layer != 'pthreads' or lib.num_threads < 2:\n"
            "    print('skip', lib.internal_api, lib.threading_layer, lib.num_threads); raise SystemExit\n"
            "a = np.random.rand(512, 512).astype(np.float32)\n"
            "threads.blas_threads(1e12)\n"
            "a @ a\n"
            "t = time.process_time(); time.sleep(0.3)\n"
            "print(ctypes.CDLL(lib.filepath).openblas_thread_timeout(), round((time.process_time() - t) * 1e3),"
            " float((a @ a)[0, 0] - a[0] @ a[:, 0]))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in threads.BLAS_ENV + ("OPENBLAS_THREAD_TIMEOUT", "NPGPT2_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    if out[0] == "skip":
        pytest.skip(f"NumPy's BLAS here is not a 2-thread pthreads OpenBLAS: {out[1:]}")
    timeout, idle_ms, err = out
    assert timeout == "4"
    assert int(idle_ms) < 30
    assert abs(float(err)) < 1e-3  # the restarted BLAS still multiplies
    env["OPENBLAS_THREAD_TIMEOUT"] = "28"  # the user's own setting stays
    timeout, _, _ = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout.split()
    assert timeout == "28"


def test_blas_idle_leaves_other_blas_libraries_alone():
    """blas_idle.restart_workers only restarts a pthreads OpenBLAS that exports the restart
    functions: MKL, an OpenMP-threaded OpenBLAS (the variable does not apply there) and a
    library without those symbols are left as they are (False), never an exception."""
    import ctypes.util
    import types

    from npgpt2 import blas_idle
    libc = ctypes.util.find_library("c") or "libc.so.6"
    fake = lambda api, layer, path: types.SimpleNamespace(internal_api=api, threading_layer=layer,  # noqa: E731
                                                          filepath=path)
    assert blas_idle.restart_workers(fake("mkl", "intel", libc)) is False
    assert blas_idle.restart_workers(fake("openblas", "openmp", libc)) is False
    assert blas_idle.restart_workers(fake("openblas", "pthreads", libc)) is False  # no openblas_read_env
    assert blas_idle.restart_workers(fake("openblas", "pthreads", "/nonexistent/libopenblas.so")) is False
