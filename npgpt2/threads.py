"""How many threads BLAS and Numba may use, decided per call from the work and the machine.

Why: on a 2-core machine that also runs other work, OpenBLAS's two threads and Numba's
parallel loops make npgpt2 10-20x slower (a thread that must wait at a barrier for a
partner that has no core wastes its own slice too); one thread is barely slower there.
On an idle machine the second thread is worth up to 2x. So the count is chosen, per
call, as

    choose_threads(work, cpus, others, steal)   (a pure function, unit-tested)

- `cpus`: the cores this process may use: os.sched_getaffinity and the cgroup CPU quota
  (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), whichever is smaller.
- `others`: how many threads of other processes want a core right now: /proc/stat's
  `procs_running` minus this process's own running threads (/proc/self/task/*/stat),
  scaled to our share of the machine's cores, the median of the last few samples (a
  neighbour seen once, for a fraction of a second, does not count; see HISTORY).
- `steal`: the fraction of CPU time the hypervisor gave to other guests since the
  previous sample (/proc/stat), which takes cores away just the same.
- `work`: the size of the call (FLOPs of a GEMM, elements of a loop); below
  MIN_WORK_PER_THREAD per extra thread, a thread's wake-up costs more than it saves.
  A decode GEMV gains little from a second thread and loses most when that thread
  cannot run: it gets the second thread only while a core is free.

The machine is sampled at most every SAMPLE_S seconds (about 0.1 ms of file reads), so a
call costs a clock read and a comparison; the BLAS library's own set_num_threads (a
ctypes call, ~3 us) runs only when the count changes. threadpoolctl's context managers
are not used per call: `threadpool_limits()` takes ~0.9 ms and `controller.limit()`
~30 us (measured on this project's machine), so the controller is built once and its
BLAS library's `set_num_threads` cached.

A user's explicit choice wins: with OPENBLAS_NUM_THREADS / OMP_NUM_THREADS /
MKL_NUM_THREADS / GOTO_NUM_THREADS / BLIS_NUM_THREADS set, the BLAS count is left alone;
with NUMBA_NUM_THREADS / OMP_NUM_THREADS set, Numba's count is. NPGPT2_THREADS=N fixes
both at N (no sampling).

Numba's threading layer is set to `workqueue` (unless NUMBA_THREADING_LAYER is set):
its workers sleep on a condition variable between parallel loops, so they never spin on
a core that OpenBLAS's threads need next (libgomp, the default `omp` layer here, spins
after each loop; TBB's workers spin briefly too and TBB is rarely installed).
workqueue's one limit, no concurrent parallel launches from two Python threads, cannot
arise from npgpt2: its parallel kernels hold the GIL while they run (the attention's parts,
on Python threads, call only BLAS and serial `nogil` Numba loops; part_threads).
"""
import logging
import math
import os
import time

import numba

from . import blas_idle

log = logging.getLogger(__name__)

SAMPLE_S = 0.2  # seconds between two looks at the machine
# `others` is the median of the last HISTORY samples (the lower one while there are two), not
# their mean: a neighbour seen in one sample only (another process's BLAS threads spinning for
# ~0.1 s after its last call before they sleep, or a thread of ours caught between states by
# the two reads of a sample) must not take our second thread for the next 0.6 s. With the mean,
# one such sample among three gave others = 0.33 and so one thread: on the idle AMD VM the
# default policy ran 1.29x (forward B=1,T=1024) and 1.15x (train B=4,T=64) slower than
# NPGPT2_THREADS=2 in benchmarks/run.py's policy row, whose three workers take turns (each
# one's first sample sees the previous worker's OpenBLAS threads still spinning). Measured on
# the Intel Xeon VM: an idle process's OpenBLAS keeps one thread running 110-130 ms after its
# last call, torch's 20-40 ms, both shorter than SAMPLE_S, so one sample at most. A neighbour
# that stays (two samples of three: 0.2-0.4 s) is still seen.
HISTORY = 3
# work per thread below which a further thread does not pay: FLOPs for BLAS calls (waking
# a thread costs ~10 us on bare metal, what one core does with ~1 MFLOP; GPT-2 124M's decode
# GEMVs are 1.2-77 MFLOP and, memory-bound, do gain from a second core's bandwidth when it is
# free), elements for Numba loops. The BLAS figure is 0.5 MFLOP, not 1: at 1, decode's
# 768 x 768 projection (1.2 MFLOP) got one thread and the others two, so OpenBLAS's count
# flipped 2 -> 1 -> 2 in every layer; on a VM, where a parked thread takes up to ~1 ms to
# wake, that cost 29-42 ms a token against 26 ms with the count held at 2.
# "gemv": multiply-adds of a decode GEMV handed to gemv_pool's spinning worker (a job costs
# ~5 us to post and claim; below ~64K multiply-adds the caller alone is as fast)
# "parts": a thread per independent part, the caller having judged the call big enough
MIN_WORK_PER_THREAD = {"blas": 5e5, "numba": 1 << 19, "gemv": 1 << 16, "parts": 1}
GEMV_POOL_THREADS = 2  # gemv_pool: the caller and one worker

BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS",
            "BLIS_NUM_THREADS")
NUMBA_ENV = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


# ---------------------------------------------------------------- the decision (pure)
def choose_threads(work, cpus, others, steal=0.0, min_work=MIN_WORK_PER_THREAD["blas"]):
    """Threads for one call: as many as there are free cores, and no more than the work
    can use.

    work: size of the call (same unit as min_work); cpus: cores this process may use;
    others: threads of other processes running (may be fractional); steal:
    fraction of CPU taken by the hypervisor (0..1). Returns 1..cpus.
    A half-free core counts as not free: a thread that waits at a barrier for a partner
    without a core loses far more than one thread fewer costs.
    """
    cpus = max(1, int(cpus))
    free = cpus * (1.0 - min(max(steal, 0.0), 1.0)) - max(others, 0.0)
    n = min(cpus, math.floor(free + 0.25))  # 0.75 of a core free counts as free
    n = min(n, int(work // min_work) if min_work > 0 else cpus)
    return max(1, n)


def cgroup_cpus(root="/sys/fs/cgroup"):
    """The CPU quota of this process's cgroup in cores (rounded up), or None if unlimited.

    cgroup v2: `cpu.max` holds "QUOTA PERIOD" or "max PERIOD"; v1: cpu/cpu.cfs_quota_us
    (-1 = unlimited) and cpu/cpu.cfs_period_us.
    """
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus():
    """Cores this process may use: its affinity mask and its cgroup's quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpus()
    return max(1, min(n, quota) if quota else n)


def parse_proc_stat(text):
    """/proc/stat -> (procs_running, steal jiffies, total jiffies) of the `cpu` line."""
    running, steal, total = 0, 0, 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            fields = [int(x) for x in line.split()[1:]]
            total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
            steal = fields[7] if len(fields) > 7 else 0
        elif line.startswith("procs_running"):
            running = int(line.split()[1])
    return running, steal, total


def own_running_threads():
    """Threads of this process in state R (running or runnable) now."""
    n = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2:][:1] == b"R":
            n += 1
    return max(1, n)


# ---------------------------------------------------------------- the machine, sampled
class _Policy:
    def __init__(self):
        self.cpus = available_cpus()
        self.host_cpus = os.cpu_count() or self.cpus
        self.fixed = _env_int("NPGPT2_THREADS")
        self.blas_user = self.fixed is not None or any(os.environ.get(k) for k in BLAS_ENV)
        self.numba_user = self.fixed is not None or any(os.environ.get(k) for k in NUMBA_ENV)
        self.next_sample = 0.0
        self.others = []  # recent samples
        self.prev_stat = None
        self.steal = 0.0
        self.blas_set = None  # the BLAS library's set_num_threads, found on first use
        self.blas_n = None
        self.numba_n = None
        self.numba_max = numba.config.NUMBA_NUM_THREADS

    def sample(self, now):
        self.next_sample = now + SAMPLE_S
        try:
            with open("/proc/stat") as f:
                running, steal, total = parse_proc_stat(f.read())
        except OSError:
            self.others = [0.0]
            return
        if self.prev_stat and total > self.prev_stat[1]:
            self.steal = (steal - self.prev_stat[0]) / (total - self.prev_stat[1])
        self.prev_stat = (steal, total)
        others = max(0, running - own_running_threads())
        # procs_running counts the whole machine: scale to the cores we may use
        self.others = (self.others + [others * self.cpus / self.host_cpus])[-HISTORY:]

    def count(self, work, kind):
        if self.fixed is not None:
            return self.fixed
        now = time.monotonic()
        if now >= self.next_sample:
            self.sample(now)
        others = sorted(self.others)[(len(self.others) - 1) // 2]
        n = choose_threads(work, self.cpus, others, self.steal, MIN_WORK_PER_THREAD[kind])
        key = (kind, n)
        STATS[key] = STATS.get(key, 0) + 1
        return n


MAX_THREADS = 4096  # BLAS and Numba take a C int; a larger setting is a typo, not a machine


def _env_int(name):
    v = os.environ.get(name, "")
    try:
        n = max(1, int(v)) if v else None
    except ValueError:
        log.warning("%s=%r is not a whole number; ignored", name, v)
        return None
    if n is not None and n > MAX_THREADS:
        log.warning("%s=%s is more threads than any machine has; using %d", name, v, MAX_THREADS)
        n = MAX_THREADS
    return n


_policy = None
_blas_libs = None  # NumPy's BLAS (threadpoolctl controllers), found once a process by _numpy_blas
# decisions since import, by (kind, threads): the benchmarks report what the policy chose
STATS = {}


def decisions():
    """{"kind N threads": calls} of the decisions made so far (benchmarks/workers.py)."""
    return {f"{k} {n}": c for (k, n), c in sorted(STATS.items())}


def _get():
    global _policy
    if _policy is None:
        _numpy_blas()  # the first use: OpenBLAS's workers restarted if NumPy came first (blas_idle)
        _policy = _Policy()
    return _policy


def _numpy_blas():
    """The BLAS libraries NumPy uses (threadpoolctl controllers; [] without threadpoolctl),
    found once a process; OpenBLAS's among them restarted then so that its idle workers sleep
    (blas_idle.restart_workers: they spin after each call when NumPy was imported first).

    A process may hold several BLAS libraries (another package's OpenBLAS, torch's MKL):
    the ones shipped with NumPy are chosen, or all of them if none is recognisably NumPy's.
    """
    global _blas_libs
    if _blas_libs is None:
        try:
            from threadpoolctl import ThreadpoolController
            libs = ThreadpoolController().select(user_api="blas").lib_controllers
        except Exception as e:  # threadpoolctl missing or a library it cannot drive
            log.warning("threadpoolctl cannot control BLAS threads (%s): BLAS keeps its own count", e)
            libs = []
        numpys = [lib for lib in libs if "numpy" in os.path.basename(os.path.dirname(lib.filepath))]
        _blas_libs = numpys or libs
        for lib in _blas_libs:
            blas_idle.restart_workers(lib)
    return _blas_libs


def _find_blas_setter():
    """The set_num_threads of the BLAS NumPy uses, or a no-op."""
    setters = [lib.set_num_threads for lib in _numpy_blas()]
    if len(setters) == 1:
        return setters[0]

    def set_all(n):
        for f in setters:
            f(n)
    return set_all


def blas_threads(work):
    """Set BLAS's thread count for a call of `work` FLOPs; returns the count (None when
    the user's environment fixes it)."""
    p = _get()
    if p.blas_user and p.fixed is None:
        return None
    n = p.count(work, "blas")
    _set_blas(p, n)
    return n


def _set_blas(p, n):
    if n != p.blas_n:
        if p.blas_set is None:
            p.blas_set = _find_blas_setter()
        p.blas_set(n)
        p.blas_n = n


def part_threads(parts):
    """Threads for a call its caller splits into `parts` independent parts on Python threads,
    each calling BLAS on one thread (kernels._on_threads; the caller decides whether the call
    is big enough): as many as there are free cores, at most `parts`. Sets BLAS to one thread
    when that is more than one. 1 (the caller alone, with BLAS's count to set) while no
    second core is free, and whenever the user's environment fixes BLAS's own count (two of
    those pools side by side would ask for more cores than there are).
    """
    p = _get()
    if p.blas_user and p.fixed is None:
        return 1
    n = max(1, min(parts, p.count(parts, "parts")))
    if n > 1:
        _set_blas(p, 1)
    return n


def numba_threads(work):
    """Threads for a Numba loop over `work` elements (1 means: run the serial twin);
    sets Numba's count for the parallel twin."""
    p = _get()
    if p.numba_user and p.fixed is None:
        return p.numba_max
    n = min(p.count(work, "numba"), p.numba_max)
    if n != p.numba_n:  # also for 1: a few loops have no serial twin
        numba.set_num_threads(n)
        p.numba_n = n
    return n


def gemv_threads(work):
    """Threads for a decode GEMV of `work` multiply-adds (gemv_pool: 1 or 2): 2 only while a
    core is free, so on a busy machine the pool's worker is never posted to (and sleeps)."""
    p = _get()
    if p.fixed is not None:
        return min(p.fixed, GEMV_POOL_THREADS)
    if p.numba_user:
        return min(p.numba_max, GEMV_POOL_THREADS)
    return min(GEMV_POOL_THREADS, p.count(work, "gemv"))


def reset():
    """Forget the samples and the environment read (tests; after changing os.environ)."""
    global _policy
    _policy = None
