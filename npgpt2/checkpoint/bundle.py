"""TensorBundle V2 checkpoints (what `tf.train.Saver` writes), read and written without TensorFlow.

A checkpoint `prefix` is two kinds of file:
- `prefix.index`: an SSTable (see table.py) mapping tensor name -> BundleEntryProto (dtype, shape,
  shard, byte offset, byte size, masked crc32c of the bytes); the empty key holds BundleHeaderProto.
- `prefix.data-{shard:05d}-of-{num_shards:05d}`: the raw tensor bytes, C order, back to back
  (TensorFlow's default alignment is 1: no padding), in sorted-name order.
A model folder's `checkpoint` text file names the newest prefix (see `latest_checkpoint`).
"""
import glob
import logging
import os
import re

import numpy as np

from ..errors import Npgpt2Error
from ..fsutil import atomic_write
from . import proto
from .crc32c import crc32c, mask, unmask
from .table import build_table, read_table

log = logging.getLogger(__name__)

# TensorFlow DataType enum values we read and write.
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 6: np.int8, 9: np.int64, 10: np.bool_, 19: np.float16}
DTYPE_NAMES = {1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 4: "DT_UINT8", 5: "DT_INT16",
               6: "DT_INT8", 7: "DT_STRING", 8: "DT_COMPLEX64", 9: "DT_INT64", 10: "DT_BOOL",
               14: "DT_BFLOAT16", 17: "DT_UINT16", 18: "DT_COMPLEX128", 19: "DT_HALF",
               20: "DT_RESOURCE", 21: "DT_VARIANT", 22: "DT_UINT32", 23: "DT_UINT64"}
_ENUM_OF = {np.dtype(t): e for e, t in DTYPES.items()}
BUNDLE_VERSION = 1  # kTensorBundleVersion: the format version we implement
_CHUNK = 16 << 20  # bytes per read when checksumming a memory-mapped tensor
MAX_DIMS = 64  # NumPy's (and TensorFlow's TensorShape's) limit on a tensor's rank
MAX_BYTES = 2**63 - 1  # byte offsets and sizes are int64 in the format


def index_path(prefix):
    return f"{prefix}.index"


def data_path(prefix, shard=0, num_shards=1):
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def _read_index(prefix):
    """(BundleHeader, {name: BundleEntry}) from prefix.index, with every entry checked."""
    path = index_path(prefix)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise Npgpt2Error(f"{path}: file not found (no checkpoint with prefix {prefix})") from None
    except OSError as e:
        raise Npgpt2Error(f"{path}: cannot read: {e.strerror}") from None
    items = read_table(raw, path)
    if not items or items[0][0] != b"":
        raise Npgpt2Error(f"{path}: corrupt: the bundle header entry (empty key) is missing")
    try:
        header = proto.parse_header(items[0][1])
    except proto.ProtoError as e:
        raise Npgpt2Error(f"{path}: corrupt: bundle header: {e}") from None
    if header.num_shards < 1:
        raise Npgpt2Error(f"{path}: corrupt: bundle header says {header.num_shards} data shards")
    if header.endianness not in (0, 1):
        raise Npgpt2Error(f"{path}: corrupt: unknown endianness {header.endianness}")
    if header.min_consumer > BUNDLE_VERSION or BUNDLE_VERSION in header.bad_consumers:
        raise Npgpt2Error(f"{path}: written in a newer checkpoint format (version {header.producer}, "
                          f"min consumer {header.min_consumer}); npgpt2 reads version {BUNDLE_VERSION}")
    entries = {}
    for key, value in items[1:]:
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            name = repr(key)[2:-1]
        try:
            entry = proto.parse_entry(value)
        except proto.ProtoError as e:
            raise Npgpt2Error(f"{path}: corrupt: entry for tensor '{name}': {e}") from None
        _check_entry(path, name, entry, header.num_shards)
        entries[name] = entry
    return header, entries


def _check_entry(path, name, entry, num_shards):
    if entry.num_slices:
        raise Npgpt2Error(f"{path}: tensor '{name}' is a partitioned variable ({entry.num_slices} "
                          "slices); partitioned variables are not supported")
    if entry.dtype not in DTYPES:
        label = DTYPE_NAMES.get(entry.dtype, "unknown")
        raise Npgpt2Error(f"{path}: tensor '{name}' has unsupported dtype {label} ({entry.dtype}); "
                          "supported: float32, float16, float64, int32, int64, bool")
    if entry.unknown_rank or any(d < 0 for d in entry.shape):
        raise Npgpt2Error(f"{path}: corrupt: tensor '{name}' has an unknown shape {entry.shape}")
    if len(entry.shape) > MAX_DIMS:
        raise Npgpt2Error(f"{path}: corrupt: tensor '{name}' has {len(entry.shape)} dimensions "
                          f"(at most {MAX_DIMS})")
    count = bound = 1
    for d in entry.shape:  # Python ints: the products cannot wrap around
        count *= d
        bound *= max(d, 1)  # NumPy refuses a shape like (0, 2**62, 2**62) too
    if bound * np.dtype(DTYPES[entry.dtype]).itemsize > MAX_BYTES:
        raise Npgpt2Error(f"{path}: corrupt: tensor '{name}' of shape {entry.shape} would need "
                          f"more than 2**63 bytes")
    if not 0 <= entry.shard_id < num_shards:
        raise Npgpt2Error(f"{path}: corrupt: tensor '{name}' is in shard {entry.shard_id} "
                          f"but the bundle has {num_shards}")
    nbytes = count * np.dtype(DTYPES[entry.dtype]).itemsize
    if entry.size != nbytes or entry.offset < 0:
        raise Npgpt2Error(f"{path}: corrupt: tensor '{name}' of shape {entry.shape} "
                          f"should have {nbytes} bytes but its entry says {entry.size}")


def _np_dtype(entry, big_endian):
    dt = np.dtype(DTYPES[entry.dtype])
    return dt.newbyteorder(">" if big_endian else "<")


def list_variables(prefix):
    """{name: (shape tuple, numpy dtype)} from prefix.index alone, without reading tensor data."""
    header, entries = _read_index(prefix)
    return {name: (e.shape, np.dtype(DTYPES[e.dtype])) for name, e in entries.items()}


def read_checkpoint(prefix, verify=True, mmap=False):
    """Every tensor of checkpoint `prefix`: {name: ndarray} in the stored shape and dtype.

    verify: check each tensor's crc32c (about 1 GB/s) and raise naming the tensor on mismatch.
    mmap: return read-only arrays viewing an np.memmap of the data file (nothing is copied into
      RAM; pages load on first touch). Otherwise arrays are ordinary, writable and in native
      byte order.
    """
    header, entries = _read_index(prefix)
    big = header.endianness == 1
    shards = {}
    try:
        for shard in sorted({e.shard_id for e in entries.values()}):
            path = data_path(prefix, shard, header.num_shards)
            try:
                f = open(path, "rb", buffering=0)  # large reads go straight into the arrays
            except FileNotFoundError:
                raise Npgpt2Error(f"{path}: file not found (data shard {shard} of checkpoint "
                                  f"{prefix})") from None
            except OSError as e:
                raise Npgpt2Error(f"{path}: cannot read: {e.strerror}") from None
            shards[shard] = (path, f, os.fstat(f.fileno()).st_size)
        maps = {}
        out = {}
        # Read in file order: sequential I/O, and the first damaged tensor is the one reported.
        for name, e in sorted(entries.items(), key=lambda kv: (kv[1].shard_id, kv[1].offset)):
            path, f, file_size = shards[e.shard_id]
            if e.offset + e.size > file_size:
                raise Npgpt2Error(f"{path}: truncated: tensor '{name}' needs bytes "
                                  f"[{e.offset}, {e.offset + e.size}) but the file has {file_size}")
            dtype = _np_dtype(e, big)
            if mmap:
                if e.shard_id not in maps and file_size:
                    maps[e.shard_id] = np.memmap(path, dtype=np.uint8, mode="r")
                arr = _view(maps.get(e.shard_id), e.offset, e.size, dtype, e.shape)
                actual = _crc_of_file_range(f, e.offset, e.size, path, name) if verify else None
            else:
                arr = np.empty(e.shape, dtype=dtype)
                _read_into(f, e.offset, arr, path, name)
                actual = crc32c(arr) if verify else None
            if verify and actual != unmask(e.crc32c):
                raise Npgpt2Error(f"{path}: corrupt: tensor '{name}' fails its crc32c check "
                                  f"(stored 0x{unmask(e.crc32c):08x}, computed 0x{actual:08x})")
            if big and not mmap:
                arr = arr.astype(dtype.newbyteorder("="))
            out[name] = arr
    finally:
        for _, f, _ in shards.values():
            f.close()
    log.debug("read %d tensors from %s", len(out), prefix)
    return dict(sorted(out.items(), key=lambda kv: kv[0].encode("utf-8")))


def _view(mm, offset, size, dtype, shape):
    """A read-only array of `shape` viewing bytes [offset, offset + size) of the memmap `mm`."""
    if size == 0:
        arr = np.zeros(shape, dtype=dtype)
        arr.flags.writeable = False
        return arr
    # A plain ndarray (not the np.memmap subclass) whose .base chain keeps the mapping alive.
    return mm[offset:offset + size].view(np.ndarray).view(dtype).reshape(shape)


def _read_into(f, offset, arr, path, name):
    buf = arr.reshape(-1).view(np.uint8)
    f.seek(offset)
    got = 0
    while got < buf.size:
        n = f.readinto(buf[got:])
        if not n:
            raise Npgpt2Error(f"{path}: truncated: tensor '{name}' ends past the end of the file")
        got += n


def _crc_of_file_range(f, offset, size, path, name):
    """crc32c of file bytes [offset, offset + size) read through a small buffer.

    Used instead of checksumming the memmap so that verifying does not map every page into the
    process (peak RSS stays at what the caller touches).
    """
    buf = np.empty(min(size, _CHUNK), dtype=np.uint8)
    f.seek(offset)
    crc = 0
    left = size
    while left:
        n = f.readinto(buf[:min(left, buf.size)])
        if not n:
            raise Npgpt2Error(f"{path}: truncated: tensor '{name}' ends past the end of the file")
        crc = crc32c(buf[:n], crc)
        left -= n
    return crc


def write_checkpoint(prefix, tensors):
    """Write `prefix.data-00000-of-00001` and `prefix.index` as TensorFlow's BundleWriter does.

    tensors: {name: ndarray} of float32/float16/float64/int32/int64/bool, any shape (0-d and
    empty included). Tensors are stored in sorted-name order, little-endian, without padding.
    Each file is written atomically, data first (as TensorFlow does).
    """
    prefix = os.fspath(prefix)
    arrays = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise Npgpt2Error(f"{index_path(prefix)}: tensor names must be non-empty strings, got {name!r}")
        arr = np.asarray(value)
        enum = _ENUM_OF.get(arr.dtype.newbyteorder("="))
        if enum is None:
            raise Npgpt2Error(f"{index_path(prefix)}: tensor '{name}' has unsupported dtype {arr.dtype}; "
                              "supported: float32, float16, float64, int32, int64, bool")
        # (np.ascontiguousarray would turn a 0-d array into shape (1,))
        arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")
        arrays.append((name.encode("utf-8"), enum, arr))
    arrays.sort(key=lambda t: t[0])
    folder = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)

    items = [(b"", proto.encode_header(num_shards=1, producer=BUNDLE_VERSION))]
    offset = 0
    with atomic_write(data_path(prefix)) as f:
        for key, enum, arr in arrays:
            raw = arr.reshape(-1).view(np.uint8)
            f.write(raw)
            items.append((key, proto.encode_entry(enum, arr.shape, offset, raw.size,
                                                  mask(crc32c(raw)))))
            offset += raw.size
    with atomic_write(index_path(prefix)) as f:
        f.write(build_table(items))
    log.debug("wrote %d tensors (%d bytes) to %s", len(arrays), offset, prefix)


# ---- the `checkpoint` state file -------------------------------------------------------------

_FIELD_RE = re.compile(r"""^\s*(\w+)\s*:\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')\s*$""")
_SIMPLE_ESCAPES = {"n": 10, "r": 13, "t": 9, "a": 7, "b": 8, "f": 12, "v": 11,
                   "\\": 92, "'": 39, '"': 34, "?": 63}


def _unescape(text):
    """Undo protobuf text format's C-style escaping; returns the str of the decoded bytes."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        i += 1
        c = text[i]
        if c in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[c])
            i += 1
        elif c in "01234567":
            j = i
            while j < len(text) and j < i + 3 and text[j] in "01234567":
                j += 1
            out.append(int(text[i:j], 8) & 0xFF)
            i = j
        elif c in "xX":
            j = i + 1
            while j < len(text) and j < i + 3 and text[j] in "0123456789abcdefABCDEF":
                j += 1
            if j == i + 1:
                raise ValueError(f"'\\{c}' without hex digits")
            out.append(int(text[i + 1:j], 16))
            i = j
        else:
            out += ("\\" + c).encode("utf-8")
            i += 1
    return out.decode("utf-8", errors="surrogateescape")


def _escape(text):
    """Protobuf text format's C-style escaping (as TensorFlow's Python writer does, non-UTF-8 mode)."""
    out = []
    for b in os.fsencode(text):
        if b == 10:
            out.append("\\n")
        elif b == 13:
            out.append("\\r")
        elif b == 9:
            out.append("\\t")
        elif b in (34, 39, 92):
            out.append("\\" + chr(b))
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
    return "".join(out)


def _parse_state(path):
    """{'model_checkpoint_path': str, 'all_model_checkpoint_paths': [str]} from a `checkpoint` file."""
    try:
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise Npgpt2Error(f"{path}: cannot read: {e.strerror}") from None
    state = {"model_checkpoint_path": None, "all_model_checkpoint_paths": []}
    for line in lines:
        m = _FIELD_RE.match(line)
        if not m:
            continue  # other fields (timestamps) and blank lines
        try:
            value = _unescape(m.group(2) if m.group(2) is not None else m.group(3))
        except ValueError as e:
            raise Npgpt2Error(f"{path}: bad escape in the {m.group(1)} line ({e})") from None
        if m.group(1) == "model_checkpoint_path":
            state["model_checkpoint_path"] = value
        elif m.group(1) == "all_model_checkpoint_paths":
            state["all_model_checkpoint_paths"].append(value)
    return state


def _resolve(model_dir, path):
    """The existing checkpoint prefix `path` names, relative to model_dir; None if there is none."""
    candidates = [path if os.path.isabs(path) else os.path.join(model_dir, path)]
    # Folders get moved: an absolute (or stale relative) path may now live beside the state file.
    candidates.append(os.path.join(model_dir, os.path.basename(path.rstrip("/\\"))))
    for prefix in candidates:
        if os.path.isfile(index_path(prefix)):
            return prefix
    return None


def latest_checkpoint(model_dir):
    """The prefix path of the newest checkpoint in `model_dir` (as `tf.train.latest_checkpoint`).

    Follows the `checkpoint` text file's model_checkpoint_path (relative to model_dir, or
    absolute; an absolute path that no longer exists is looked up by its basename in
    model_dir). When the named checkpoint is gone, the newest complete `model-<step>` is used,
    with a warning. Without a `checkpoint` file, a folder holding exactly one `*.index` uses it.
    """
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise Npgpt2Error(f"{model_dir}: no such model folder")
    state_path = os.path.join(model_dir, "checkpoint")
    if os.path.isfile(state_path):
        name = _parse_state(state_path)["model_checkpoint_path"]
        if not name:
            raise Npgpt2Error(f"{state_path}: no model_checkpoint_path line")
        prefix = _resolve(model_dir, name)
        if prefix is None:
            prefix = _newest_complete_step(model_dir)
            if prefix is not None:
                log.warning("%s: names checkpoint '%s', which is missing; using the newest complete "
                            "one, %s", state_path, name, os.path.basename(prefix))
                return prefix
            raise Npgpt2Error(f"{state_path}: names checkpoint '{name}' but {index_path(name)} "
                              f"does not exist in {model_dir}")
        return prefix
    found = sorted(glob.glob(os.path.join(glob.escape(model_dir), "*.index")))
    if len(found) == 1:
        return found[0][:-len(".index")]
    if not found:
        raise Npgpt2Error(f"{model_dir}: no checkpoint here (no `checkpoint` file and no *.index file)")
    raise Npgpt2Error(f"{state_path}: missing, and {model_dir} holds {len(found)} *.index files; "
                      "cannot tell which checkpoint is newest")


def _newest_complete_step(model_dir):
    """The prefix of the highest-numbered `model-<step>` with its index and data files, or None
    (what a crash between pruning and naming, or a hand-deleted checkpoint, leaves usable)."""
    steps = []
    for path in glob.glob(os.path.join(glob.escape(model_dir), "model-*.index")):
        digits = os.path.basename(path)[len("model-"):-len(".index")]
        if digits.isdigit() and os.path.isfile(data_path(path[:-len(".index")])):
            steps.append(int(digits))
    return os.path.join(model_dir, f"model-{max(steps)}") if steps else None


def write_checkpoint_state(model_dir, prefix_name, all_prefix_names=None):
    """Write `model_dir/checkpoint` atomically, in the text format TensorFlow's Saver writes.

    prefix_name: the newest prefix, relative to model_dir (e.g. "model-1000") or absolute.
    all_prefix_names: the checkpoints still kept, oldest first; prefix_name is appended if it is
    not already last.
    """
    model_dir = os.fspath(model_dir)
    kept = [p for p in (all_prefix_names or []) if p != prefix_name] + [prefix_name]
    text = f'model_checkpoint_path: "{_escape(prefix_name)}"\n'
    text += "".join(f'all_model_checkpoint_paths: "{_escape(p)}"\n' for p in kept)
    with atomic_write(os.path.join(model_dir, "checkpoint"), "w", encoding="utf-8") as f:
        f.write(text)
