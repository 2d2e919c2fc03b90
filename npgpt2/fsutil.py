"""Atomic file writes and safe JSON reading: nothing the user had is lost if we die half-way,
and no file, however hostile, gets past us as a traceback."""
import contextlib
import errno
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time

from .errors import Npgpt2Error

log = logging.getLogger(__name__)

# A temp file of ours: "." + the destination's name + "." + mkstemp's 8 random characters + ".tmp".
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# A temp file is stale when it was last written this long before this process started: a write
# by another process that is still running touches its temp file far more often than this.
STALE_SECONDS = 60.0
_STARTED = time.time()
_swept = set()  # folders already cleaned by this process
_swept_lock = threading.Lock()
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def remove_stale_temp_files(folder):
    """Delete temp files of our naming pattern that a killed write left in `folder`.

    Only files last modified more than STALE_SECONDS before this process started are removed,
    so another process's write in progress is never touched. Returns the names removed.
    """
    removed = []
    cutoff = _STARTED - STALE_SECONDS
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not TEMP_NAME.fullmatch(e.name):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                os.unlink(e.path)
                removed.append(e.name)
        except OSError:
            continue  # gone already, or not ours to delete
    if removed:
        log.info("%s: removed %d stale temp file(s) left by an interrupted write: %s",
                 folder, len(removed), ", ".join(removed))
    return removed


def _sweep_once(folder):
    with _swept_lock:
        if folder in _swept:
            return
        _swept.add(folder)
    remove_stale_temp_files(folder)


def _disk_full(path, e):
    return Npgpt2Error(f"{path}: disk full ({e.strerror or 'No space left on device'}) while writing "
                       f"it; the file was left as it was")


@contextlib.contextmanager
def atomic_write(path, mode="wb", encoding=None):
    """Open a temp file beside `path`; on success fsync and rename it over `path`.

    On any exception the temp file is removed and `path` is untouched. Refuses (Npgpt2Error)
    when `path` exists and is not a regular file (a folder, device, pipe or socket): renaming
    over it would replace it. A full disk is an Npgpt2Error naming `path`. The first write to
    a folder removes stale temp files an earlier killed write left there.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise Npgpt2Error(f"{path}: exists and is not a regular file (a folder, device or pipe); "
                          f"refusing to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    _sweep_once(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise _disk_full(path, e) from None
        raise Npgpt2Error(f"{path}: cannot write it ({e.strerror or e})") from None  # not the temp file's name
    try:
        # mkstemp makes 0600 files; give the result the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise _disk_full(path, e) from None
        raise


def check_writable(path, flag):
    """Raise Npgpt2Error naming `path` and `flag` unless atomic_write(path) could write it:
    checked before a long computation whose result goes there."""
    path = os.fspath(path)
    if not path:
        raise Npgpt2Error(f"{flag}: the file name is empty")
    if os.path.exists(path) and not os.path.isfile(path):
        raise Npgpt2Error(f"{path}: exists and is not a regular file ({flag})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise Npgpt2Error(f"{path}: its folder {folder} does not exist ({flag})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise Npgpt2Error(f"{path}: its folder {folder} is not writable ({flag})")


# ---------------------------------------------------------------- JSON
def parse_json(text, source):
    """json.loads(text) for a file's contents; any failure is one Npgpt2Error naming `source`.

    text may be bytes (UTF-8). Covers invalid JSON, bad UTF-8, numbers too long to convert
    and nesting too deep for the parser (RecursionError).
    """
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise Npgpt2Error(f"{source}: not valid JSON (not UTF-8 at byte {e.start})") from None
    except RecursionError:
        raise Npgpt2Error(f"{source}: not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise Npgpt2Error(f"{source}: not valid JSON ({str(e).splitlines()[0]})") from None


def read_json(path):
    """parse_json of the file at `path`. FileNotFoundError is left to the caller (who knows
    what a missing file means); any other read failure is an Npgpt2Error."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise Npgpt2Error(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_json(raw, path)


def read_json_object(path, missing):
    """read_json of a file that must hold a JSON object; `missing` says what a missing file means."""
    try:
        obj = read_json(path)
    except FileNotFoundError:
        raise Npgpt2Error(f"{path}: missing ({missing})") from None
    if not isinstance(obj, dict):
        raise Npgpt2Error(f"{path}: expected a JSON object")
    return obj
