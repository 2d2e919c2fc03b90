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


def drop_stale_cache(dispatcher, sources):
    """Numba keys a cached function on its own file's contents only, yet compiles into it the
    code of the jitted functions and intrinsics it calls from other files: after one of those
    changes (an edit, an upgrade over an old cache) it would go on running their old code,
    while a direct call of the same kernel runs the new (seen: gemv_pool's two-thread int8 GEMV
    against the one-thread one). Called at import by a module whose kernels call into
    `sources` (paths): when their contents' hash differs from the one recorded beside the
    module's cache, the module's cache files are deleted, so Numba compiles them afresh.

    dispatcher: any cached (cache=True) function of the module, to find where its cache lives.
    Best effort: an unwritable cache or a Numba without these attributes is left alone.
    """
    import glob
    import hashlib

    try:
        folder = dispatcher._cache._cache_path  # Numba's cache locator: __pycache__, or NUMBA_CACHE_DIR's
    except AttributeError:
        return
    module = dispatcher.py_func.__module__.rsplit(".", 1)[-1]
    digest = hashlib.sha256()
    for path in sorted(sources):
        with open(path, "rb") as f:
            digest.update(f.read())
    stamp = digest.hexdigest()
    marker = os.path.join(folder, f"{module}.deps")
    try:
        with open(marker, encoding="ascii") as f:
            if f.read().strip() == stamp:
                return
    except (OSError, UnicodeDecodeError):
        pass
    try:
        for path in glob.glob(os.path.join(glob.escape(folder), f"{module}.*.nb[ic]")):
            os.remove(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{marker}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(stamp + "\n")
        os.replace(tmp, marker)
    except OSError as e:
        log.debug("could not refresh %s's Numba cache in %s: %s", module, folder, e)
