"""LevelDB-style sorted string table (SSTable), the container of a TensorBundle `.index` file.

File layout:
    data block 0 | trailer | data block 1 | trailer | ... | metaindex block | trailer | index block | trailer | footer

- Block: entries, then `restarts: uint32[num_restarts]`, then `num_restarts: uint32` (little-endian).
  Entry: varint32 shared, varint32 non_shared, varint32 value_len, key[shared:] (non_shared bytes),
  value. `shared` counts bytes taken from the previous key; it is 0 at each restart point.
- Trailer (5 bytes): type byte (0 none, 1 snappy) and the masked crc32c of block + type byte.
- Index block: one entry per data block; key >= every key in that block and < every key in the
  next; value = BlockHandle (varint64 offset, varint64 size, size excluding the trailer).
- Footer (48 bytes): metaindex handle, index handle, zero padding to 40 bytes, magic
  0xdb4775248b80fb57 as little-endian fixed64.

`read_table` returns every (key, value) pair in order; `build_table` writes the exact bytes
TensorFlow's TableBuilder writes (no compression, 256 KiB blocks, restart interval 16).
"""
import struct

from ..errors import Npgpt2Error
from .crc32c import crc32c, mask, unmask
from .proto import ProtoError, read_varint, write_varint

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
TRAILER_SIZE = 5
BLOCK_SIZE = 262144  # TensorFlow's table::Options default, which BundleWriter keeps
RESTART_INTERVAL = 16
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1


def _read_handle(buf, pos, limit):
    offset, pos = read_varint(buf, pos, limit)
    size, pos = read_varint(buf, pos, limit)
    return offset, size, pos


def _read_block(data, offset, size, path, what):
    """Check a block's trailer and return its contents (a memoryview into `data`)."""
    end = len(data) - FOOTER_SIZE
    if offset + size + TRAILER_SIZE > end:
        raise Npgpt2Error(f"{path}: truncated or corrupt: {what} at offset {offset} of size {size} "
                          f"runs past the end of the table ({end} bytes before the footer)")
    view = memoryview(data)
    block = view[offset:offset + size]
    kind = data[offset + size]
    stored = unmask(struct.unpack_from("<I", data, offset + size + 1)[0])
    if crc32c(view[offset:offset + size + 1]) != stored:
        raise Npgpt2Error(f"{path}: corrupt: {what} at offset {offset} fails its crc32c check")
    if kind == SNAPPY_COMPRESSION:
        raise Npgpt2Error(f"{path}: {what} at offset {offset} is snappy-compressed; "
                          "compressed blocks are not supported")
    if kind != NO_COMPRESSION:
        raise Npgpt2Error(f"{path}: corrupt: {what} at offset {offset} has unknown block type {kind}")
    return block


def _iter_block(block, path, what):
    """Yield (key bytes, value memoryview) for each entry of a block."""
    n = len(block)
    if n < 4:
        raise Npgpt2Error(f"{path}: corrupt: {what} is {n} bytes, too short for its restart count")
    num_restarts = struct.unpack_from("<I", block, n - 4)[0]
    limit = n - 4 - 4 * num_restarts
    if num_restarts == 0 or limit < 0:
        raise Npgpt2Error(f"{path}: corrupt: {what} has a bad restart count {num_restarts}")
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, limit))
    key = b""
    pos = 0
    try:
        while pos < limit:
            start = pos
            shared, pos = read_varint(block, pos, limit)
            non_shared, pos = read_varint(block, pos, limit)
            value_len, pos = read_varint(block, pos, limit)
            if shared > len(key) or pos + non_shared + value_len > limit:
                raise ProtoError("entry runs past the end of the block")
            if start in restarts and shared:
                raise ProtoError("restart point shares a key prefix")
            key = key[:shared] + bytes(block[pos:pos + non_shared])
            pos += non_shared
            yield key, block[pos:pos + value_len]
            pos += value_len
    except ProtoError as e:
        raise Npgpt2Error(f"{path}: corrupt: {what}: {e}") from None


def read_table(data, path):
    """All (key: bytes, value: bytes) pairs of an SSTable held in `data` (bytes), in key order.

    `path` only names the file in error messages.
    """
    if len(data) < FOOTER_SIZE:
        raise Npgpt2Error(f"{path}: truncated: {len(data)} bytes is shorter than the "
                          f"{FOOTER_SIZE}-byte table footer")
    footer = len(data) - FOOTER_SIZE
    magic = struct.unpack_from("<Q", data, footer + 40)[0]
    if magic != MAGIC:
        raise Npgpt2Error(f"{path}: not a TensorFlow checkpoint index (bad magic number "
                          f"0x{magic:016x} in the footer; truncated or not a .index file?)")
    try:
        _, _, pos = _read_handle(data, footer, footer + 40)  # metaindex: nothing we need
        index_offset, index_size, _ = _read_handle(data, pos, footer + 40)
    except ProtoError:
        raise Npgpt2Error(f"{path}: corrupt: bad block handle in the footer") from None
    index = _read_block(data, index_offset, index_size, path, "index block")
    entries = []
    for _, handle in _iter_block(index, path, "index block"):
        try:
            offset, size, _ = _read_handle(handle, 0, len(handle))
        except ProtoError:
            raise Npgpt2Error(f"{path}: corrupt: bad block handle in the index block") from None
        block = _read_block(data, offset, size, path, "data block")
        for key, value in _iter_block(block, path, "data block"):
            if entries and key <= entries[-1][0]:
                raise Npgpt2Error(f"{path}: corrupt: keys out of order at {key!r}")
            entries.append((key, bytes(value)))
    return entries


class _BlockBuilder:
    """Accumulates prefix-compressed entries of one block."""

    def __init__(self, restart_interval):
        self.restart_interval = restart_interval
        self.reset()

    def reset(self):
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def empty(self):
        return not self.buf

    def size_estimate(self):
        return len(self.buf) + 4 * len(self.restarts) + 4

    def add(self, key, value):
        shared = 0
        if self.counter < self.restart_interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += write_varint(shared) + write_varint(len(key) - shared) + write_varint(len(value))
        self.buf += key[shared:]
        self.buf += value
        self.last_key = key
        self.counter += 1

    def finish(self):
        return bytes(self.buf) + struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts,
                                             len(self.restarts))


def _shortest_separator(start, limit):
    """A short key k with start <= k < limit (LevelDB's bytewise FindShortestSeparator)."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key):
    """A short key >= `key` (LevelDB's bytewise FindShortSuccessor)."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def build_table(entries, block_size=BLOCK_SIZE, restart_interval=RESTART_INTERVAL):
    """The bytes of an SSTable holding `entries`: (key bytes, value bytes) in strictly increasing key order."""
    out = bytearray()

    def write_block(contents):
        handle = write_varint(len(out)) + write_varint(len(contents))
        trailer = bytes([NO_COMPRESSION])
        out.extend(contents)
        out.extend(trailer + struct.pack("<I", mask(crc32c(contents + trailer))))
        return handle

    data = _BlockBuilder(restart_interval)
    index = _BlockBuilder(1)
    pending_handle = None  # written block whose index entry waits for the next key
    last_key = None

    def flush():
        nonlocal pending_handle
        if not data.empty():
            pending_handle = write_block(data.finish())
            data.reset()

    for key, value in entries:
        key, value = bytes(key), bytes(value)
        if last_key is not None:
            if key <= last_key:
                raise ValueError(f"table keys must increase strictly: {key!r} after {last_key!r}")
            if len(key) + len(value) >= 2 * block_size:
                flush()  # an overly large entry starts a block of its own
        if pending_handle is not None:
            index.add(_shortest_separator(last_key, key), pending_handle)
            pending_handle = None
        last_key = key
        data.add(key, value)
        if data.size_estimate() >= block_size:
            flush()
    flush()
    metaindex_handle = write_block(_BlockBuilder(restart_interval).finish())
    if pending_handle is not None:
        index.add(_short_successor(last_key), pending_handle)
    index_handle = write_block(index.finish())
    footer = (metaindex_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", MAGIC)
    out.extend(footer)
    return bytes(out)
