"""OpenBLAS's idle worker threads: asleep right after a call, not spinning for ~0.1 s.

Why: OpenBLAS (the pthreads build NumPy ships) keeps its workers spinning for 2^28 cycles
(~0.1 s) after every call before they sleep. In a forward pass every gap between two GEMMs
(layernorm, GELU, the attention's two part threads) is shorter than that, so the spinning
worker takes a core from npgpt2's own threads: three runnable threads on two cores. Measured
on the Intel Xeon VM, a T=1024 prefill (124M shapes, 2 threads): 1.53 s wall and 3.05 s CPU a
forward with the spin, 1.16-1.32 s wall and 2.1-2.4 s CPU without; the attention alone ran
~1.5-2x slower inside the forward than on its own. With 2^4 cycles the workers sleep at once,
and the next GEMM wakes them (microseconds, against milliseconds of work).

OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when its thread server starts, i.e. when NumPy loads it.
`import npgpt2` sets the variable (unless the user did: theirs wins), which is enough when NumPy
is imported after npgpt2 (the `npgpt2` command, the server). When NumPy was imported first (a
script's usual `import numpy as np` on top), the server already runs with the old timeout;
restart_workers restarts it the way OpenBLAS itself does after a fork: re-read the environment
(openblas_read_env), stop the workers (blas_thread_shutdown_) and start them again
(blas_thread_init, which reads the timeout anew). Builds without those symbols, or with an
OpenMP thread layer (the variable does not apply there), are left as they are.
"""
import logging
import os

log = logging.getLogger(__name__)

TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
TIMEOUT_LOG2_CYCLES = "4"  # OpenBLAS's smallest: a worker spins 2^4 cycles, then sleeps


def set_default_env():
    """Before NumPy loads: OpenBLAS's thread server then starts with the short timeout. A value
    the user set stays."""
    os.environ.setdefault(TIMEOUT_ENV, TIMEOUT_LOG2_CYCLES)


def restart_workers(lib):
    """Restart the thread server of `lib` (a threadpoolctl library controller) if it runs with
    another timeout than the environment's (NumPy loaded before npgpt2). Returns True when it
    restarted. Call when no other thread is inside this BLAS (threads.py: at its first use)."""
    if getattr(lib, "internal_api", None) != "openblas" or getattr(lib, "threading_layer", None) != "pthreads":
        return False
    import ctypes  # here: `import npgpt2` loads this module and stays light
    wanted = os.environ.get(TIMEOUT_ENV)
    try:
        so = ctypes.CDLL(lib.filepath)
        read_env, timeout = so.openblas_read_env, so.openblas_thread_timeout
        shutdown, start = so.blas_thread_shutdown_, so.blas_thread_init
    except (OSError, AttributeError) as e:  # another build of OpenBLAS: leave it as it is
        log.debug("OpenBLAS at %s cannot be restarted (%s)", lib.filepath, e)
        return False
    if not wanted or str(timeout()) == wanted:
        return False
    read_env()  # timeout() now gives the environment's value: blas_thread_init applies it
    shutdown()
    start()
    log.debug("OpenBLAS's workers restarted with %s=%s", TIMEOUT_ENV, wanted)
    return True
