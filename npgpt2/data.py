"""Training data: encoding a text corpus to tokens, loading it, and drawing batches.

`encode_corpus` is OpenAI's encode.py: text files (a file, a folder, or a glob) become one
token stream, documents (files) joined by `<|endoftext|>`, stored as uint16 in an .npz with
members `arr_0`, `arr_1`, ... (np.savez's names; their concatenation is the stream). Text is
read in blocks and encoded block by block, so memory stays bounded however big the corpus.
`<|endoftext|>` written in the text is the single token 50256. Line endings are read as
Python's text mode reads them ("\r\n" and "\r" become "\n"), as encode.py did.

`Sampler` draws windows of `length` consecutive tokens at random start positions from a
seeded NumPy Generator whose state can be saved and restored, so a resumed run sees exactly
the batches an uninterrupted one would.
"""
import codecs
import glob
import gzip
import io
import json
import logging
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import Npgpt2Error
from .fsutil import atomic_write, parse_json
from .tokenizer import ENDOFTEXT

log = logging.getLogger(__name__)

MAX_TOKEN_ID = 2**31 - 1  # no vocabulary is larger (encoder.json ids are checked below 2**31)
READ_BYTES = 1 << 20  # bytes read from a text file at a time


# ---------------------------------------------------------------- finding files
def expand_paths(spec, what="--dataset"):
    """A file, a folder (every file below it, sorted) or a glob (sorted) -> [Path].

    spec may also be a list of such. Hidden files and folders (".name") inside a folder are
    skipped. Raises Npgpt2Error naming `what` when nothing matches.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths = []
    for s in specs:
        s = os.fspath(s)
        if os.path.isfile(s):
            paths.append(Path(s))
        elif os.path.isdir(s):
            found = []
            for root, dirs, files in os.walk(s):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(root) / f for f in files if not f.startswith(".")]
            if not found:
                raise Npgpt2Error(f"{s}: folder holds no files ({what})")
            paths += sorted(found)
        elif os.path.exists(s):  # a pipe, device or socket: read more than once, so not accepted
            raise Npgpt2Error(f"{s}: not a regular file or folder (a pipe, device or socket); "
                              f"save the text to a file first ({what})")
        else:
            found = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
            if not found:
                raise Npgpt2Error(f"{s}: no such file, folder or glob match ({what})")
            paths += [Path(p) for p in found]
    if not paths:
        raise Npgpt2Error(f"{what}: no input given")
    return paths


# ---------------------------------------------------------------- reading text
def check_encoding(encoding, what="--encoding"):
    """Raise Npgpt2Error unless `encoding` names a codec that turns bytes into text."""
    try:
        info = codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise Npgpt2Error(f"{what}: unknown text encoding {encoding!r}") from None
    # base64, hex, zlib, uu ... map bytes to bytes and rot13 maps str to str: not text encodings
    if not getattr(info, "_is_text_encoding", True):
        raise Npgpt2Error(f"{what}: {encoding!r} is not a text encoding (it is a bytes-to-bytes or "
                          f"str-to-str codec); give the files' character encoding, e.g. utf-8 or latin-1")


def read_text_blocks(path, encoding="utf-8", block_bytes=None, keep_crlf=False):
    """Yield the text of `path` as str blocks (a .gz file is decompressed).

    Line endings are normalised as Python's text mode (universal newlines) and OpenAI's
    encode.py do: "\r\n" and a lone "\r" become "\n"; keep_crlf=True keeps them as stored.
    A byte sequence that is not valid in `encoding` raises Npgpt2Error naming the file and
    the byte offset (counted in the file as stored, or in the decompressed stream for .gz).
    """
    path = Path(path)
    block_bytes = block_bytes or READ_BYTES
    check_encoding(encoding)
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    # the newline decoder holds back a final "\r" until it sees whether "\n" follows
    text_decoder = decoder if keep_crlf else io.IncrementalNewlineDecoder(decoder, translate=True)
    offset = 0  # bytes handed to the decoder so far
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            while True:
                data = f.read(block_bytes)
                state = decoder.getstate()
                pending = len(state[0]) if isinstance(state[0], bytes) else 0
                try:
                    text = text_decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    at = offset - pending + e.start
                    raise Npgpt2Error(f"{path}: not valid {encoding} text at byte {at} ({e.reason}); "
                                      f"pass the file's --encoding (e.g. latin-1, cp1252)") from None
                except ValueError as e:  # UnicodeError without a position (UTF-16 without a BOM)
                    hint = " (name the byte order, e.g. utf-16-le)" if "BOM" in str(e) else ""
                    raise Npgpt2Error(f"{path}: cannot decode as {encoding}: {e}{hint}") from None
                offset += len(data)
                if text:
                    yield text
                if not data:
                    return
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise Npgpt2Error(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def corpus_text(paths, encoding="utf-8", keep_crlf=False):
    """Yield the text of every file as blocks, documents separated by "<|endoftext|>".

    Empty files are skipped (no separator for them).
    """
    started = False
    for path in paths:
        first = True
        for block in read_text_blocks(path, encoding, keep_crlf=keep_crlf):
            if first and started:
                yield ENDOFTEXT
            first, started = False, True
            yield block


def iter_tokens(paths, tokenizer, combine=50000, encoding="utf-8", keep_crlf=False):
    """Yield the corpus' tokens as arrays of about `combine` characters' worth each.

    paths: text files (.npz files are read as already-encoded tokens and passed through).
    Their concatenation equals tokenizer.encode(whole joined text, allowed_special={EOT}).
    """
    allowed = {ENDOFTEXT}
    text_run = []  # consecutive text files, encoded as one stream
    first = True

    def flush():
        nonlocal first
        if text_run:
            blocks = corpus_text(text_run, encoding, keep_crlf)
            if not first:
                blocks = _prepend(ENDOFTEXT, blocks)
            for arr in tokenizer.encode_iter(blocks, allowed_special=allowed, block_chars=combine):
                if arr.size:
                    first = False
                    yield arr
            text_run.clear()

    for path in paths:
        if path.suffix == ".npz":
            yield from flush()
            for arr in read_npz_tokens(path):
                first = False
                yield arr
        else:
            text_run.append(path)
    yield from flush()


def _prepend(item, it):
    started = False
    for x in it:
        if not started:
            yield item
            started = True
        yield x


# ---------------------------------------------------------------- .npz token files
def read_npz_tokens(path):
    """The token arrays of an .npz (ours, or OpenAI/nshepperd encode.py's), in member order."""
    path = Path(path)
    _check_npz_magic(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = sorted(npz.files, key=_member_order)
            for name in names:
                arr = npz[name]
                if not isinstance(arr, np.ndarray):  # NpzFile hands back raw bytes for those
                    raise Npgpt2Error(f"{path}: member '{name}' is not a .npy array (not a token file "
                                      f"made by np.savez or npgpt2 encode)")
                if arr.ndim != 1 or arr.dtype.kind not in "iu":
                    raise Npgpt2Error(f"{path}: member '{name}' is not a 1-D integer token array "
                                      f"(shape {arr.shape}, {arr.dtype})")
                if arr.size and int(arr.min()) < 0:
                    raise Npgpt2Error(f"{path}: member '{name}' holds negative token ids")
                if arr.size and int(arr.max()) > MAX_TOKEN_ID:
                    raise Npgpt2Error(f"{path}: member '{name}' holds token id {int(arr.max())}, "
                                      f"too large for any vocabulary (ids are below 2**31)")
                yield arr
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise Npgpt2Error(f"{path}: not a readable .npz token file ({e})") from None


def _check_npz_magic(path):
    """Name what the file is when it is not a zip archive (np.load would advise allow_pickle)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise Npgpt2Error(f"{path}: cannot read ({e.strerror or e})") from None
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return
    if head.startswith(b"\x93NUMPY"):
        raise Npgpt2Error(f"{path}: is a single NumPy array (.npy), not an .npz archive of token "
                          f"arrays; save tokens with np.savez, or encode the text with npgpt2 encode")
    what = "it looks like text" if head and _looks_like_text(head) else "it is not a zip archive"
    raise Npgpt2Error(f"{path}: not an .npz token file ({what}); give text files another suffix "
                      f"(e.g. .txt) to have them encoded")


def _looks_like_text(head):
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
    return b"\0" not in head


def _member_order(name):
    # arr_2 before arr_10 (zip order is insertion order already; this guards hand-made files)
    stem = name[4:] if name.startswith("arr_") else ""
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _add_member(zf, index, arr):
    """Write arr as member arr_<index>.npy of an open zipfile (np.savez's layout)."""
    with zf.open(f"arr_{index}.npy", "w", force_zip64=True) as m:
        np.lib.format.write_array(m, np.ascontiguousarray(arr), allow_pickle=False)


def encode_corpus(paths_or_globs, out_npz, tokenizer, combine=50000, encoding="utf-8", keep_crlf=False):
    """Encode text files (file, folder, glob, or a list of them) into `out_npz`.

    Documents are joined by <|endoftext|>; tokens are stored uint16 (uint32 past 65536
    ids), one member per ~`combine` characters of text. Line endings become "\n" unless
    keep_crlf. Written atomically. Returns {"tokens": n, "files": n, "members": n}.
    """
    check_encoding(encoding)
    if combine < 1:
        raise Npgpt2Error(f"--combine must be >= 1, got {combine}")
    paths = expand_paths(paths_or_globs, "input")
    out_npz = Path(out_npz)
    if out_npz.suffix != ".npz":
        log.warning("%s: np.load reads it whatever the name; .npz is the usual suffix", out_npz)
    if out_npz.resolve() in {p.resolve() for p in paths}:
        raise Npgpt2Error(f"{out_npz}: the output is also an input")
    if not out_npz.parent.is_dir():
        raise Npgpt2Error(f"{out_npz.parent}: output folder does not exist")
    if out_npz.is_dir():
        raise Npgpt2Error(f"{out_npz}: is a folder; give the .npz file to write")
    total = members = 0
    with atomic_write(out_npz) as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            for arr in iter_tokens(paths, tokenizer, combine, encoding, keep_crlf):
                _add_member(zf, members, arr)
                members += 1
                total += arr.size
                log.debug("%s: %d tokens", out_npz, total)
        if total == 0:
            raise Npgpt2Error(f"{paths_or_globs}: no text to encode (the files are empty)")
    return {"tokens": total, "files": len(paths), "members": members}


def load_dataset(path_or_glob, tokenizer=None, encoding="utf-8", combine=50000, what="--dataset",
                 keep_crlf=False):
    """A 1-D token array (uint16, or int64 if an id does not fit) from an .npz made by
    encode_corpus / encode.py, or from text files, folders or globs encoded on the fly
    (tokenizer needed then). Raises Npgpt2Error for a missing or empty dataset."""
    paths = expand_paths(path_or_glob, what)
    if tokenizer is None and any(p.suffix != ".npz" for p in paths):
        raise Npgpt2Error(f"{path_or_glob}: text input needs a tokenizer ({what})")
    parts = list(iter_tokens(paths, tokenizer, combine, encoding, keep_crlf))
    n = sum(p.size for p in parts)
    if n == 0:
        raise Npgpt2Error(f"{path_or_glob}: dataset is empty (0 tokens) ({what})")
    top = max(int(p.max()) for p in parts if p.size)
    dtype = np.uint16 if top < 1 << 16 else np.int64
    out = np.empty(n, dtype=dtype)
    i = 0
    for p in parts:
        out[i:i + p.size] = p
        i += p.size
    return out


def check_tokens(tokens, n_vocab, context, source, what="--dataset"):
    """Raise Npgpt2Error if ids exceed the vocabulary or the data cannot fill one window."""
    if tokens.size == 0:
        raise Npgpt2Error(f"{source}: dataset is empty (0 tokens) ({what})")
    top = int(tokens.max())
    if top >= n_vocab:
        raise Npgpt2Error(f"{source}: token id {top} is outside the model's vocabulary "
                          f"(n_vocab={n_vocab}); was it encoded for another model? ({what})")
    if tokens.size < context + 1:
        raise Npgpt2Error(f"{source}: dataset has {tokens.size} tokens, fewer than --context + 1 = "
                          f"{context + 1}; use a smaller --context or more text ({what})")


# ---------------------------------------------------------------- batches
class Sampler:
    """Random windows of `length` consecutive tokens (train on [:, :-1] -> [:, 1:]).

    Start positions are uniform over every place a whole window fits. The Generator's
    state is in get_state()/set_state() (JSON-able) so a resumed run continues the same
    sequence of batches.
    """

    def __init__(self, tokens, length, seed=None, mask=None):
        if tokens.size < length:
            raise Npgpt2Error(f"dataset has {tokens.size} tokens, fewer than a window of {length}")
        self.tokens = tokens
        self.length = int(length)
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(self.length)
        self.mask, self._starts = mask, None
        if mask is not None:
            # with a loss mask (chat_data.py), only windows with a target: a window starting at s
            # trains on positions s+1 .. s+length-1, so some mask there must be 1
            seen = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # seen[i] = sum(mask[:i])
            s = np.arange(tokens.size - self.length + 1)
            self._starts = np.flatnonzero(seen[s + self.length] - seen[s + 1] > 0)
            if not self._starts.size:
                raise Npgpt2Error(f"no window of {length} tokens holds a token the loss mask trains on")

    def sample(self, batch_size):
        """-> int64 (batch_size, length)."""
        return self.sample_masked(batch_size)[0]

    def sample_masked(self, batch_size):
        """-> (int64 (batch_size, length), the targets' mask (batch_size, length - 1) or None).

        With a mask, starts are uniform over the windows that hold a target."""
        if self._starts is None:
            starts = self.rng.integers(0, self.tokens.size - self.length + 1, size=batch_size)
        else:
            starts = self._starts[self.rng.integers(0, self._starts.size, size=batch_size)]
        where = starts[:, None] + self._offsets  # [B, length] positions in the stream
        mask = None if self.mask is None else self.mask[where[:, 1:]]
        return self.tokens[where].astype(np.int64), mask

    def get_state(self):
        return rng_state(self.rng)

    def set_state(self, state):
        set_rng_state(self.rng, state, "sampler state")


def rng_state(rng):
    """A NumPy Generator's state as a JSON string (what a train state saves)."""
    return json.dumps(rng.bit_generator.state)


def set_rng_state(rng, state, what):
    """Put rng in `state` (rng_state's JSON, or its dict); `what` names it in a one-line error."""
    st = parse_json(state, what) if isinstance(state, str) else state
    if not isinstance(st, dict):
        raise Npgpt2Error(f"{what}: expected a JSON object")
    if st.get("bit_generator") != type(rng.bit_generator).__name__:
        raise Npgpt2Error(f"{what} is for {st.get('bit_generator')}, not {type(rng.bit_generator).__name__}")
    try:
        rng.bit_generator.state = st
    except (ValueError, TypeError, KeyError) as e:
        raise Npgpt2Error(f"{what}: damaged ({type(e).__name__}: {e})") from None


def eval_windows(n_tokens, context):
    """Every token after the first predicted exactly once: [(start, T)] windows of T+1
    tokens, T = context except possibly a shorter last one."""
    out = []
    start = 0
    while start + 1 < n_tokens:
        T = min(context, n_tokens - 1 - start)
        out.append((start, T))
        start += T
    return out
