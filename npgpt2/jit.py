"""Numba when it can be imported; otherwise the plain code runs, after one logged warning.

Numba is a dependency, but a platform without a wheel for it (or a broken install) must
still `import npgpt2`, load a model and run the plain NumPy path, only slower.
"""
import logging
import os

log = logging.getLogger(__name__)
_warned = False
_listening = False


def numba():
    """The numba module, or None when it cannot be imported (warns once per process)."""
    check_numba_env()
    try:
        import numba as nb
    except ImportError as e:
        plain_fallback(e)
        return None
    _announce_compiles(nb)
    return nb


def plain_requested():
    """True when NPGPT2_PLAIN is set to anything but "" or "0": run the plain code everywhere."""
    return os.environ.get("NPGPT2_PLAIN", "") not in ("", "0")


def ops():
    """The layer implementations in use: Numba kernels, or plain NumPy with NPGPT2_PLAIN=1
    (or when Numba cannot be imported, after one logged warning)."""
    from . import layers
    if plain_requested() or numba() is None:
        return layers
    try:
        from . import kernels
    except ImportError as e:  # a Numba that imports but cannot build the kernels
        plain_fallback(e)
        return layers
    return kernels


def check_numba_env():
    """NUMBA_NUM_THREADS=0 (or text) makes `import numba` raise a ValueError deep inside it:
    say it in one line instead."""
    v = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if v and not (v.isdigit() and int(v) >= 1):
        from .errors import Npgpt2Error
        raise Npgpt2Error(f"NUMBA_NUM_THREADS={v}: must be a whole number >= 1 (or unset, to use every core)")


def _announce_compiles(nb):
    """Say once, when Numba really compiles (a cache miss: the first run, or after an
    upgrade), why the next half minute is silent. Loading from the cache fires no event."""
    global _listening
    if _listening:
        return
    _listening = True
    try:
        from numba.core import event
    except ImportError:  # an old Numba without the event API: stay silent, as before
        return

    class FirstCompile(event.Listener):
        said = False

        def on_start(self, ev):
            if not self.said:
                FirstCompile.said = True
                log.info("compiling Numba kernels into their cache: first run only, up to a minute")

        def on_end(self, ev):
            pass
    event.register("numba:compile", FirstCompile())


def plain_fallback(reason):
    """Log, once per process, that the Numba code is replaced by the plain code, and why."""
    global _warned
    if not _warned:
        _warned = True
        log.warning("Numba is unavailable (%s): running the plain NumPy code instead (slower)", reason)
