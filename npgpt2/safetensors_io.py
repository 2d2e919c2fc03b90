"""Read and write the safetensors format by hand (no `safetensors` package needed).

Layout of a `.safetensors` file:
  bytes 0..8        N, an unsigned 64-bit little-endian integer: the header's length in bytes
  bytes 8..8+N      the header: a UTF-8 JSON object, possibly right-padded with spaces,
                    {"<name>": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]},
                     ..., "__metadata__": {"<str>": "<str>"}}   (metadata optional)
  bytes 8+N..       the data buffer: each tensor's raw little-endian C-order bytes at
                    [begin, end) relative to the buffer's start; tensors do not overlap and
                    together cover the whole buffer.

Every size in the header is checked against the file before any data is used, so a header
that lies (offsets past the end, a byte count that disagrees with the shape, holes, overlaps)
is one clear `Npgpt2Error` rather than garbage arrays.
"""
import json
import math
import os
import struct

import numpy as np

from .errors import Npgpt2Error
from .fsutil import atomic_write, parse_json

# safetensors dtype name -> NumPy dtype (little-endian). BF16 has no NumPy dtype: it is read
# as raw uint16 and widened to float32 exactly (bf16 is the top half of a float32).
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"), "BF16": np.dtype("<u2"),
}
# (NumPy kind, itemsize) -> safetensors dtype name, for writing.
_NAMES = {(v.kind, v.itemsize): k for k, v in _DTYPES.items() if k != "BF16"}

# The reference implementation refuses headers above 100 MB; a real GPT-2 header is ~20 KB.
MAX_HEADER_BYTES = 100 * 1000 * 1000


def read_safetensors_header(path):
    """Parse and check the header of `path` against the file's size.

    Returns (entries, metadata, data_start): entries maps name -> (dtype name, shape tuple,
    begin, end) with offsets relative to data_start; metadata is a dict of str -> str (may be
    empty). Raises Npgpt2Error naming `path` if anything disagrees.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise Npgpt2Error(f"{path}: too short for a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise Npgpt2Error(f"{path}: safetensors header claims {n} bytes but the file "
                                  f"has {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise Npgpt2Error(f"{path}: cannot read ({e.strerror or e})") from None
    header = parse_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise Npgpt2Error(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise Npgpt2Error(f"{path}: safetensors __metadata__ must map strings to strings")

    data_len = size - 8 - n
    entries = {}
    for name, info in header.items():
        entries[name] = _check_entry(path, name, info, data_len)
    # Tensors must tile the buffer exactly: no holes, no overlaps, nothing left over.
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise Npgpt2Error(f"{path}: safetensors tensor '{name}' {what}")
        pos = end
    if pos != data_len:
        raise Npgpt2Error(f"{path}: safetensors header covers {pos} data bytes but the file "
                          f"holds {data_len}")
    return entries, metadata, 8 + n


def _check_entry(path, name, info, data_len):
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise Npgpt2Error(f"{path}: safetensors entry '{name}' must have exactly "
                          f"dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise Npgpt2Error(f"{path}: tensor '{name}' has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise Npgpt2Error(f"{path}: tensor '{name}' has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise Npgpt2Error(f"{path}: tensor '{name}' has bad data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_len:
        raise Npgpt2Error(f"{path}: tensor '{name}' ends at data byte {end} but the file holds "
                          f"only {data_len} data bytes")
    want = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != want:
        raise Npgpt2Error(f"{path}: tensor '{name}' is {dtype} {shape} ({want} bytes) but its "
                          f"data_offsets span {end - begin} bytes")
    return dtype, tuple(shape), begin, end


def read_safetensors(path, mmap=False):
    """Read every tensor of a safetensors file.

    Returns (tensors, metadata): tensors maps name -> ndarray in native byte order (BF16 is
    widened to float32); with mmap=True arrays are read-only views of the file where possible.
    """
    path = os.fspath(path)
    entries, metadata, start = read_safetensors_header(path)
    if mmap and os.path.getsize(path) > start:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    else:  # (np.memmap refuses an empty data section)
        with open(path, "rb") as f:
            buf = np.frombuffer(f.read(), dtype=np.uint8)
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        arr = buf[start + begin:start + end].view(_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        tensors[name] = arr
    return tensors, metadata


def write_safetensors(path, tensors, metadata=None):
    """Write `tensors` (name -> ndarray) to `path` atomically.

    Tensors are stored in sorted name order, little-endian, C order; the header is padded
    with spaces to a multiple of 8 bytes so every tensor starts 8-byte aligned.
    """
    path = os.fspath(path)
    header = {}
    arrays = []
    pos = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        dtype = _NAMES.get((arr.dtype.kind, arr.dtype.itemsize))
        if dtype is None:
            raise Npgpt2Error(f"{path}: cannot store tensor '{name}' of dtype {arr.dtype} "
                              f"in safetensors")
        arr = np.asarray(arr, dtype=_DTYPES[dtype], order="C")  # (keeps 0-d arrays 0-d)
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            # Write through a memoryview in slices so a huge tensor is not copied whole.
            flat = arr.reshape(-1).view(np.uint8) if arr.size else b""
            for i in range(0, len(flat), 1 << 26):
                f.write(memoryview(flat[i:i + (1 << 26)]))
