"""Download OpenAI's published GPT-2 files: resumable, retried, verified.

`download_model("124M")` fetches the seven files OpenAI published for a model size into
`<models_dir>/<name>/` (default `weights/124M/`):

    hparams.json  encoder.json  vocab.bpe  model.ckpt.index  model.ckpt.meta
    model.ckpt.data-00000-of-00001  checkpoint

Each file streams in chunks into `<file>.part` and is renamed to its final name only once
every byte promised by the server has arrived, so a final name always means a complete file.
A cut download continues from the `.part` with an HTTP Range request. The checkpoint is
crc-checked before the small `checkpoint` file (the one that makes a folder look like a
model to `latest_checkpoint`) is fetched, last of all.
"""
import contextlib
import errno
import logging
import math
import os
import re
import socket
import sys
import time
import urllib.parse
from pathlib import Path

import requests
from tqdm import tqdm

from .checkpoint import latest_checkpoint, read_checkpoint
from .errors import Npgpt2Error
from .model import ALIASES, MODEL_HPARAMS, param_shapes, read_hparams, validate_params

log = logging.getLogger(__name__)

# The address OpenAI's own download_model.py uses: <base>/<model name>/<file>.
OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BASE_URL_ENV = "NPGPT2_BASE_URL"
PREFIX = "model.ckpt"
# `checkpoint` comes last: its presence is what marks a finished folder.
FILES = ("hparams.json", "encoder.json", "vocab.bpe", PREFIX + ".index", PREFIX + ".meta",
         PREFIX + ".data-00000-of-00001", "checkpoint")
# The most bytes any of OpenAI's files can hold (the data file's bound comes from the model's
# size): a server announcing or sending more is refused, so a hostile or broken server cannot
# fill the disk (hparams.json is never 129 MB).
MAX_FILE_BYTES = {"hparams.json": 64 << 10, "checkpoint": 64 << 10, "encoder.json": 16 << 20,
                  "vocab.bpe": 16 << 20, PREFIX + ".index": 16 << 20, PREFIX + ".meta": 64 << 20}
# Small enough that little is lost when a connection drops (urllib3 discards the partly
# filled chunk it was reading), large enough that the Python loop costs nothing.
CHUNK_BYTES = 1 << 16


class _Retry(Exception):
    """A failure worth trying again (dropped connection, timeout, 5xx, short body)."""


class _GaveUp(Npgpt2Error):
    """Retries ran out: download_model adds what to do without a network."""


def offline_hint(models_dir):
    return (f"without a network, copy a model folder into {models_dir}/ (see weights/README.md), "
            f"or download from a mirror with --base_url URL")


def check_host(base, models_dir):
    """Fail at once, with the next step, when the host name does not resolve (no network or
    DNS): retrying that only waits."""
    host = urllib.parse.urlsplit(base).hostname
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as e:
        raise Npgpt2Error(f"{base}: cannot resolve the host {host} ({getattr(e, 'strerror', None) or e}); "
                          f"{offline_hint(models_dir)}") from None


def canonical_name(model_name):
    """'124M' for '124M' or its old name '117M' (likewise 345M -> 355M); else Npgpt2Error."""
    name = ALIASES.get(str(model_name).strip(), str(model_name).strip())
    if name not in MODEL_HPARAMS:
        known = ", ".join(MODEL_HPARAMS)
        raise Npgpt2Error(f"model name '{model_name}' is unknown: choose one of {known} "
                          f"(117M and 345M are accepted as the old names of 124M and 355M)")
    return name


def max_file_bytes(model_name, fname):
    """The largest size `fname` of released model `model_name` can have."""
    if fname in MAX_FILE_BYTES:
        return MAX_FILE_BYTES[fname]
    n_params = sum(math.prod(shape) for shape in param_shapes(MODEL_HPARAMS[model_name]).values())
    return 4 * n_params + (1 << 20)  # float32 tensors, back to back


def is_complete(folder):
    """True if `folder` holds all seven files (final names only appear once complete)."""
    return all((Path(folder) / f).is_file() for f in FILES)


def download_model(model_name, models_dir="weights", base_url=None, force=False, progress=True,
                   session=None, retries=5, backoff=1.0, timeout=(10, 60)):
    """Fetch a GPT-2 model into `<models_dir>/<canonical name>/` and return that folder.

    base_url: where `<name>/<file>` lives; default `$NPGPT2_BASE_URL`, else OpenAI's storage.
    force: download every file again even if the folder is complete (existing files stay
      until their replacement is complete; `.part` files are started afresh).
    progress: a tqdm bar per file on stderr (only when stderr is a terminal).
    session: a requests.Session to use (one is made and closed otherwise).
    retries / backoff: per file, at most `retries` further attempts after a failure that made
      no new progress, sleeping backoff * 2**k seconds before attempt k+1.
    timeout: requests' (connect, read) timeout in seconds.
    Raises Npgpt2Error with one line for an unknown name, a 404, running out of retries, a
    full disk (the `.part` stays for resuming) or a checkpoint that fails its crc check.
    """
    name = canonical_name(model_name)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise Npgpt2Error(f"--retries must be an integer >= 0, got {retries}")
    base = (base_url or os.environ.get(BASE_URL_ENV) or OPENAI_BASE_URL).rstrip("/")
    if not re.match(r"https?://", base):
        raise Npgpt2Error(f"--base_url: '{base}' is not an http:// or https:// address")
    folder = Path(models_dir) / name
    if is_complete(folder) and not force:
        log.info("%s is already downloaded (use --force to download it again)", folder)
        return folder
    check_host(base, models_dir)
    made = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Npgpt2Error(f"{folder}: cannot create folder ({e.strerror or e})") from None
    try:
        try:
            _download_into(folder, name, base, force, progress, session, retries, backoff, timeout)
        except _GaveUp as e:
            raise Npgpt2Error(f"{e}; {offline_hint(models_dir)}") from None
    except BaseException:
        # A failure before any byte arrived leaves no empty folder behind (which would look
        # like a model folder); a .part file keeps its folder, for resuming.
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    log.info("downloaded %s", folder)
    return folder


def _download_into(folder, name, base, force, progress, session, retries, backoff, timeout):
    if force:
        # Until the new files are in and checked, the folder must not look finished.
        with contextlib.suppress(FileNotFoundError):
            (folder / "checkpoint").unlink()

    own_session = session is None
    session = session or requests.Session()
    try:
        fetch = dict(session=session, retries=retries, backoff=backoff, timeout=timeout,
                     progress=progress, restart=force)
        for fname in FILES[:-1]:
            if force or not (folder / fname).is_file():
                fetch_file(f"{base}/{name}/{fname}", folder / fname,
                           max_bytes=max_file_bytes(name, fname), **fetch)
        verify_folder(folder)
        fetch_file(f"{base}/{name}/checkpoint", folder / "checkpoint",
                   max_bytes=max_file_bytes(name, "checkpoint"), **fetch)
    finally:
        if own_session:
            session.close()
    if os.path.abspath(latest_checkpoint(folder)) != os.path.abspath(folder / PREFIX):
        raise Npgpt2Error(f"{folder / 'checkpoint'}: names a checkpoint other than {PREFIX}")


def verify_folder(folder):
    """crc-check every tensor of folder/model.ckpt and its shapes against hparams.json."""
    prefix = str(Path(folder) / PREFIX)
    try:
        hparams = read_hparams(folder)
        tensors = read_checkpoint(prefix, verify=True, mmap=True)
        validate_params(hparams, tensors, prefix + ".index")
    except Npgpt2Error as e:
        raise Npgpt2Error(f"{e} (the download is damaged; run again with --force)") from None


def fetch_file(url, dest, session, retries=5, backoff=1.0, timeout=(10, 60), progress=True,
               restart=False, max_bytes=None):
    """Download `url` to `dest` through `dest.part`, resuming and retrying; see module doc.

    max_bytes: refuse a file the server announces (or sends) larger than this.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if restart:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    failures = 0
    best = _size(part)
    while True:
        try:
            _fetch_once(url, part, session, timeout, progress, dest.name, max_bytes)
            break
        except _Retry as e:
            have = _size(part)
            if have > best:  # progress was made: this is a new run of bad luck
                best, failures = have, 0
            failures += 1
            if failures > retries:
                kept = f"; {have} bytes kept in {part} for resuming" if have else ""
                raise _GaveUp(f"{url}: {e}; gave up after {retries} retries{kept}") from None
            delay = backoff * 2 ** (failures - 1)
            log.warning("%s: %s; retrying in %.1f s", url, e, delay)
            time.sleep(delay)
    os.replace(part, dest)


def _size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _open_part(path, mode):
    """Open the .part file (a seam for tests that simulate a full disk)."""
    return open(path, mode)


def _fetch_once(url, part, session, timeout, progress, label, max_bytes=None):
    """One HTTP request appending to `part`; returns when `part` is complete, else raises."""
    have = _size(part)
    # identity: byte counts must match Content-Length, which a gzip-encoded body would not.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
            if r.status_code == 404:
                raise Npgpt2Error(f"{url}: not found (HTTP 404)")
            if r.status_code == 416:  # nothing left after `have`: complete already, or junk
                if _content_range(r)[2] == have:
                    return
                part.unlink(missing_ok=True)
                raise _Retry("server refused to resume (HTTP 416); starting over")
            if r.status_code >= 500 or r.status_code in (408, 429):
                raise _Retry(f"HTTP {r.status_code} {r.reason}")
            if r.status_code == 206:
                start, _, total = _content_range(r)
                if start != have:
                    part.unlink()
                    raise _Retry(f"server resumed at byte {start}, not {have}; starting over")
                mode = "ab"
            elif r.status_code == 200:
                # No Range sent, or the server ignored it: the body is the whole file.
                have, mode = 0, "wb"
                length = r.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            else:
                raise Npgpt2Error(f"{url}: HTTP {r.status_code} {r.reason}")
            if max_bytes is not None and total is not None and total > max_bytes:
                part.unlink(missing_ok=True)
                raise Npgpt2Error(f"{url}: server announces {total} bytes; {label} is never more "
                                  f"than {max_bytes} bytes (wrong --base_url?)")
            limit = min(x for x in (total, max_bytes, math.inf) if x is not None)
            have = _stream(r, part, mode, have, total, progress, label, limit, url)
    except (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError) as e:
        raise _Retry(f"connection failed ({type(e).__name__})") from None
    except requests.RequestException as e:
        raise Npgpt2Error(f"{url}: {type(e).__name__}: {e}") from None
    if total is not None and have < total:
        raise _Retry(f"connection closed after {have} of {total} bytes")
    if total is not None and have > total:
        part.unlink()
        raise Npgpt2Error(f"{url}: server sent {have} bytes but announced {total}")


def _stream(r, part, mode, have, total, progress, label, limit=math.inf, url=None):
    """Write r's body to `part`; returns the bytes now in `part`. A full disk is one line.

    More than `limit` bytes in all (what the server announced, or the file's maximum) is
    refused as soon as the body passes it: the part file is deleted.
    """
    bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
               desc=label, disable=not (progress and sys.stderr.isatty()))
    too_long = False
    try:
        with bar, _open_part(part, mode) as f:
            for chunk in r.iter_content(CHUNK_BYTES):
                if have + len(chunk) > limit:
                    too_long = True
                    break
                f.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    except requests.RequestException:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise Npgpt2Error(f"{part}: disk full after {_size(part)} bytes; free some space "
                              f"and run the same command again to resume") from None
        raise Npgpt2Error(f"{part}: cannot write ({e.strerror or e})") from None
    if too_long:
        part.unlink(missing_ok=True)
        what = f"announced {total}" if total is not None else f"the most {label} can hold, {limit}"
        raise Npgpt2Error(f"{url or label}: server sent more bytes than {what}; refusing the rest")
    return have


def _content_range(r):
    """(start, end, total) from 'bytes a-b/n' or 'bytes */n'; None for what is absent."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", r.headers.get("Content-Range", ""))
    if not m:
        return None, None, None
    return tuple(int(g) if g and g != "*" else None for g in m.groups())
