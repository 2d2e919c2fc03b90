"""A second core for decoding's GEMVs, without the cost of waking a thread for each.

Decoding a token is ~50 GEMVs of 0.05-3 ms each, with layernorm and attention in between.
Numba's parallel loops (and OpenBLAS) park their threads between calls; on a VM a parked
thread takes up to ~1 ms to wake, as long as a whole GEMV. So this module keeps one worker
thread of its own that, between jobs, spins on a flag for SPIN_S seconds (a token's GEMVs
and the Python between them come well within that), then sleeps on an Event until the next.

A job is split into chunks (ranges of rows or columns). Both threads claim chunks with an
atomic compare-and-swap on one counter and run them in nogil Numba code; the caller, after
posting the job, claims chunks itself too. So a worker that is asleep, slow to wake or
without a core never holds the caller up by more than the one chunk it has claimed: the
caller has run the rest. The counter also holds the job's sequence number, so a worker that
wakes late cannot claim a chunk of a job it did not read.

Who decides: `run(kind, params, nchunks, threads)` with threads=1 runs every chunk on the
caller's thread (no worker involved at all). The callers (gemv.py, quant_kernels.py) ask
threads.gemv_threads(), which says 2 only while a core is free: on a busy machine the
worker is never posted to and goes back to sleep after SPIN_S.

Numba's on-disk cache keys _chunk on this file's contents only (a hash: touching a file does
nothing), though it compiles in int8_dot's, gemv's and kernels' code: at import,
jit.drop_stale_cache deletes this module's cache files whenever those files' contents changed,
so the worker never runs an old copy of a kernel the caller runs new.

Jobs (kind, params as int64 addresses and sizes; the caller keeps the arrays alive):
- KIND_INT8: int8_dot._dot_rows on rows [c*R/n, (c+1)*R/n) for chunk c;
- KIND_INT8_VNNI: int8_dot._dot_rows_vnni on the same rows (offset activations, vpdpbusd);
- KIND_F32_ROWS: gemv._rows on rows [c*OC/n, (c+1)*OC/n) of w (OC, C);
- KIND_F32_COLS: gemv._cols on columns [c*OC/n, (c+1)*OC/n) of w (C, OC) (both: see gemv.py, 2026-12-06);
- KIND_DECODE_ATTN: kernels._decode_attention_kernel on heads [c*U/n, (c+1)*U/n), U = B*NH.
"""
import atexit
import platform
import threading
import time

import numpy as np
from llvmlite import ir
from numba import carray, literal_unroll, njit, types
from numba.extending import intrinsic

from . import cpu_target, gemv, int8_dot, jit, kernels

SPIN_S = 0.005  # a worker spins this long after its last job before sleeping
STOP_WAIT_S = 1.0  # at exit, how long to wait for the worker to leave its loop (it checks STOP every spin)

# ctl: one int64 array shared by the threads; the hot fields one cache line apart
SEQ, CLAIM, DONE, STOP = 0, 8, 16, 24
KIND, NCHUNKS, P = 32, 33, 34  # the job: kind, chunks, parameters P..P+13
CTL_SIZE = 48
SEQ_SHIFT = 24  # CLAIM = seq << SEQ_SHIFT | next chunk
CHUNK_MASK = (1 << SEQ_SHIFT) - 1
KIND_INT8, KIND_F32_ROWS, KIND_F32_COLS, KIND_INT8_VNNI, KIND_DECODE_ATTN = 1, 2, 3, 4, 5

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


# ---------------------------------------------------------------- atomics (LLVM intrinsics)
def _ptr(context, builder, arrty, arr, idx):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.gep(ary.data, [idx])


@intrinsic
def _load(typingctx, arr, idx):
    """arr[idx] as a sequentially consistent atomic load (never hoisted out of a loop)."""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_ptr(context, builder, sig.args[0], *args), "seq_cst", 8)
    return types.int64(arr, idx), codegen


@intrinsic
def _store(typingctx, arr, idx, val):
    def codegen(context, builder, sig, args):
        builder.store_atomic(args[2], _ptr(context, builder, sig.args[0], args[0], args[1]), "seq_cst", 8)
        return context.get_dummy_value()
    return types.none(arr, idx, val), codegen


@intrinsic
def _add(typingctx, arr, idx, val):
    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _ptr(context, builder, sig.args[0], args[0], args[1]), args[2], "seq_cst")
    return types.int64(arr, idx, val), codegen


@intrinsic
def _cas(typingctx, arr, idx, old, new):
    """arr[idx] = new if it is old (atomically); -> whether it was."""
    def codegen(context, builder, sig, args):
        res = builder.cmpxchg(_ptr(context, builder, sig.args[0], args[0], args[1]), args[2], args[3],
                              "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)
    return types.boolean(arr, idx, old, new), codegen


@intrinsic
def _pause(typingctx):
    """The spin-wait hint (x86 `pause`: lets the sibling hyperthread run, saves power)."""
    def codegen(context, builder, sig, args):
        if _X86:
            fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def _as_ptr(typingctx, addr):
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return types.voidptr(addr), codegen


# ---------------------------------------------------------------- the jobs (nogil Numba)
@njit(cache=True, nogil=True)
def job_params(arrays, sizes):
    """arrays: a tuple of arrays, sizes: a tuple of ints -> int64 (len(arrays) + len(sizes),):
    the arrays' data addresses, then the sizes (a job's parameters, as _chunk reads them).
    Numba reads an address for free; `a.ctypes.data` from Python builds a ctypes object
    (~1.3 us an array: 10 of the 30 us an int8 768 x 768 GEMV took, measured 2026-12-06)."""
    out = np.empty(len(arrays) + len(sizes), np.int64)
    i = 0
    for a in literal_unroll(arrays):
        out[i] = a.ctypes.data
        i += 1
    for s in sizes:
        out[i] = s
        i += 1
    return out


@njit(cache=True, nogil=True)
def _chunk(ctl, c):
    """Run chunk c of the posted job (its parameters in ctl[P:])."""
    kind, n = ctl[KIND], ctl[NCHUNKS]
    if kind == KIND_INT8:  # xq xs q ws bias out N K R NG has_bias
        N, K, R, NG, nb = ctl[P + 6], ctl[P + 7], ctl[P + 8], ctl[P + 9], ctl[P + 10]
        xq = carray(_as_ptr(ctl[P]), (N, K), np.int8)
        xs = carray(_as_ptr(ctl[P + 1]), (N, NG), np.float32)
        q = carray(_as_ptr(ctl[P + 2]), (R, K), np.int8)
        ws = carray(_as_ptr(ctl[P + 3]), (R, NG), np.float32)
        bias = carray(_as_ptr(ctl[P + 4]), (nb,), np.float32)
        out = carray(_as_ptr(ctl[P + 5]), (N, R), np.float32)
        int8_dot._dot_rows(xq, xs, q, ws, bias, out, c * R // n, (c + 1) * R // n, 0)  # 0: no prefetch (PREFETCH_BYTES)
    elif kind == KIND_INT8_VNNI:  # xu xs q ws wsum bias out N K R NG has_bias
        N, K, R, NG, nb = ctl[P + 7], ctl[P + 8], ctl[P + 9], ctl[P + 10], ctl[P + 11]
        xu = carray(_as_ptr(ctl[P]), (N, K), np.uint8)
        xs = carray(_as_ptr(ctl[P + 1]), (N, NG), np.float32)
        q = carray(_as_ptr(ctl[P + 2]), (R, K), np.int8)
        ws = carray(_as_ptr(ctl[P + 3]), (R, NG), np.float32)
        wsum = carray(_as_ptr(ctl[P + 4]), (R, NG), np.int32)
        bias = carray(_as_ptr(ctl[P + 5]), (nb,), np.float32)
        out = carray(_as_ptr(ctl[P + 6]), (N, R), np.float32)
        int8_dot._dot_rows_vnni(xu, xs, q, ws, wsum, bias, out, c * R // n, (c + 1) * R // n, 0)  # the same
    elif kind == KIND_DECODE_ATTN:  # qkv k_cache v_cache rows pos out B C3 R NH n_ctx hs, float32
        B, C3, R, NH, T, hs = ctl[P + 6], ctl[P + 7], ctl[P + 8], ctl[P + 9], ctl[P + 10], ctl[P + 11]
        qkv = carray(_as_ptr(ctl[P]), (B, C3), np.float32)
        kc = carray(_as_ptr(ctl[P + 1]), (R, NH, T, hs), np.float32)
        vc = carray(_as_ptr(ctl[P + 2]), (R, NH, T, hs), np.float32)
        rows = carray(_as_ptr(ctl[P + 3]), (B,), np.int64)
        pos = carray(_as_ptr(ctl[P + 4]), (B,), np.int64)
        out = carray(_as_ptr(ctl[P + 5]), (B, C3 // 3), np.float32)
        kernels._decode_attention_kernel(qkv, kc, vc, rows, pos, NH, out, c * B * NH // n, (c + 1) * B * NH // n)
    else:  # KIND_F32_ROWS / _COLS: x w bias out M C OC nb, float32
        M, C, OC, nb = ctl[P + 4], ctl[P + 5], ctl[P + 6], ctl[P + 7]
        x = carray(_as_ptr(ctl[P]), (M, C), np.float32)
        bias = carray(_as_ptr(ctl[P + 2]), (nb,), np.float32)
        out = carray(_as_ptr(ctl[P + 3]), (M, OC), np.float32)
        if kind == KIND_F32_ROWS:
            gemv._rows(x, carray(_as_ptr(ctl[P + 1]), (OC, C), np.float32), bias, out,
                       c * OC // n, (c + 1) * OC // n)
        else:
            gemv._cols(x, carray(_as_ptr(ctl[P + 1]), (C, OC), np.float32), bias, out,
                       c * OC // n, (c + 1) * OC // n)


@njit(cache=True, nogil=True)
def _claim_and_run(ctl, seq):
    """Claim and run chunks of job `seq` until none is left; -> chunks run."""
    done = 0
    while True:
        v = _load(ctl, CLAIM)
        if (v >> SEQ_SHIFT) != seq or (v & CHUNK_MASK) >= ctl[NCHUNKS]:
            return done
        if _cas(ctl, CLAIM, v, v + 1):
            _chunk(ctl, v & CHUNK_MASK)
            _add(ctl, DONE, 1)
            done += 1


@njit(cache=True, nogil=True)
def _caller(ctl, seq):
    """The posting thread's part: run chunks, then wait for those the worker claimed."""
    _claim_and_run(ctl, seq)
    n = ctl[NCHUNKS]
    while _load(ctl, DONE) < n:
        _pause()


@njit(cache=True, nogil=True)
def _worker_spin(ctl, seen, spins):
    """The worker's loop: run each newly posted job's chunks; return the last job seen after
    `spins` pauses without a new one (or when STOP is set)."""
    idle = 0
    while idle < spins and _load(ctl, STOP) == 0:
        s = _load(ctl, SEQ)
        if s != seen:
            seen = s
            _claim_and_run(ctl, s)
            idle = 0
        else:
            _pause()
            idle += 1
    return seen


# ---------------------------------------------------------------- the worker thread
class _Pool:
    def __init__(self):
        self.ctl = np.zeros(CTL_SIZE, np.int64)
        self.seq = 0
        self.wake = threading.Event()
        self.sleeping = True
        self.spins = _spins_for(SPIN_S)
        self.thread = None
        self.lock = threading.Lock()  # one job at a time (two Python threads may decode)

    def start(self):
        # Compile (or load from Numba's cache) the worker's loop here, not in the worker: a
        # process that ends while its worker thread is still compiling dies in LLVM at exit
        # (abort or segfault), and never caches the loop, so every short run after it died too.
        _worker_spin(self.ctl, 0, 0)  # 0 spins: returns at once
        self.thread = threading.Thread(target=self._loop, name="npgpt2-gemv", daemon=True)
        self.thread.start()
        atexit.register(self.stop)

    def _loop(self):
        seen = 0
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.ctl[STOP]:
                return
            self.sleeping = False
            seen = _worker_spin(self.ctl, seen, self.spins)
            self.sleeping = True
            if self.ctl[SEQ] != seen:  # posted while it was going to sleep: run again
                self.wake.set()

    def stop(self):
        """Stop the worker and wait for it (at exit: so that no thread is in Numba's code while
        the interpreter tears down)."""
        self.ctl[STOP] = 1
        self.wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=STOP_WAIT_S)

    def run(self, kind, params, nchunks, threads):
        with self.lock:
            self.seq = self.seq % CHUNK_MASK + 1  # the bits CLAIM holds; never 0 (the worker's start)
            to_worker = threads > 1
            if to_worker and self.thread is None:
                self.start()
            _post(self.ctl, kind, nchunks, params, self.seq, to_worker)
            if to_worker and self.sleeping:
                self.wake.set()
            _caller(self.ctl, self.seq)


@njit(cache=True, nogil=True)
def _post(ctl, kind, nchunks, params, seq, to_worker):
    """Write job `seq` into ctl; the worker sees it once SEQ changes (last, atomically)."""
    ctl[KIND], ctl[NCHUNKS] = kind, nchunks
    for i in range(params.shape[0]):
        ctl[P + i] = params[i]
    ctl[DONE] = 0
    _store(ctl, CLAIM, seq << SEQ_SHIFT)
    if to_worker:
        _store(ctl, SEQ, seq)


@njit(cache=True, nogil=True)
def _spin_n(n):
    for _ in range(n):
        _pause()


def _spins_for(seconds):
    """How many pause instructions take `seconds` on this CPU (1-40 ns each, by model)."""
    _spin_n(10)
    n = 20000
    t0 = time.perf_counter()
    _spin_n(n)
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1000, int(seconds / dt * n))


_pool = None
# jobs run since import, by (kind name, threads): the benchmarks report which path ran
STATS = {}
KIND_NAMES = {KIND_INT8: "int8 x int8 dot", KIND_F32_ROWS: "float32 rows", KIND_F32_COLS: "float32 columns",
              KIND_INT8_VNNI: "int8 x int8 dot (vpdpbusd)", KIND_DECODE_ATTN: "decode attention heads"}
_KEYS = {}  # (kind, threads) -> its STATS key: ~50 jobs a token, so no string formatting per job


def note(kind, threads):
    """Count a job of `kind` run on `threads` threads (also the callers' one-thread calls)."""
    key = _KEYS.get((kind, threads))
    if key is None:
        key = _KEYS[kind, threads] = f"{KIND_NAMES[kind]}, {threads} thread{'s' if threads > 1 else ''}"
    STATS[key] = STATS.get(key, 0) + 1


def run(kind, params, nchunks, threads=1):
    """Run a job of `nchunks` chunks on this thread and, with threads > 1, the worker.

    params: int64 array, the parameters of the kind (array addresses and sizes, see _chunk); the
    caller keeps the arrays alive until run returns (it returns when every chunk is done).
    """
    global _pool
    note(kind, threads)
    if _pool is None:
        _pool = _Pool()
    _pool.run(kind, params, nchunks, threads)


# _chunk compiles in int8_dot's, gemv's and kernels' code (and cpu_target's intrinsics)
jit.drop_stale_cache(_chunk, (int8_dot.__file__, gemv.__file__, kernels.__file__, cpu_target.__file__))
