"""Numba when it can be imported; otherwise the plain code runs, after one logged warning.

Numba is a dependency, but a platform without a wheel for it (or a broken install) must
still `import npgpt2`, load a model and run the plain NumPy path, only slower.
"""
import logging

log = logging.getLogger(__name__)
_warned = False


def numba():
    """The numba module, or None when it cannot be imported (warns once per process)."""
    try:
        import numba as nb
    except ImportError as e:
        plain_fallback(e)
        return None
    return nb


def plain_fallback(reason):
    """Log, once per process, that the Numba code is replaced by the plain code, and why."""
    global _warned
    if not _warned:
        _warned = True
        log.warning("Numba is unavailable (%s): running the plain NumPy code instead (slower)", reason)
