"""CRC-32C (Castagnoli), as TensorFlow and LevelDB use it to checksum tensors and table blocks.

Polynomial 0x1EDC6F41 (reflected 0x82F63B78), initial value and final xor 0xFFFFFFFF.
`crc32c(data, value)` continues a running checksum: crc32c(a + b) == crc32c(b, crc32c(a)).

Two implementations compute the same function:
- `crc32c` (fast): slicing-by-16 in Numba; ~1-2 GB/s on one core, releases the GIL. Without
  Numba the same loop runs as plain Python on Python ints (a few MB/s).
- `crc32c_reference`: one table lookup per byte in plain Python, kept for tests.
"""
import numpy as np

from ..jit import numba

_POLY = 0x82F63B78  # 0x1EDC6F41 bit-reversed: the CRC is computed least significant bit first
_MASK_DELTA = 0xA282EAD8


def _make_tables(n):
    """(n, 256) uint32: row 0 is the classic byte table; row k advances a byte k more zero bytes."""
    t = np.zeros((n, 256), dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        t[0, i] = c
    for k in range(1, n):
        prev = t[k - 1]
        t[k] = (prev >> 8) ^ t[0][prev & 0xFF]
    return t


_TABLES = _make_tables(16)
_TABLE0 = [int(x) for x in _TABLES[0]]
_FLAT64 = _TABLES.astype(np.uint64).reshape(-1)  # uint64 keeps the Numba loop in one integer type


def _crc_loop(crc, head, words, tail, t):
    """Update the (pre-inverted) crc with bytes `head`, then uint64 `words` (little-endian), then `tail`.

    t: the 16 tables flattened, table k at t[256 * k:256 * (k + 1)] (a flat array indexes faster).
    """
    for b in head:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    n = len(words)
    i = 0
    # Slicing-by-16: two 64-bit words per step; each byte indexes the table that advances it
    # past the remaining bytes of the step, so the 16 lookups are independent of each other.
    while i + 1 < n:
        a = words[i] ^ crc
        b = words[i + 1]
        crc = (t[3840 + (a & 0xFF)] ^ t[3584 + ((a >> 8) & 0xFF)] ^ t[3328 + ((a >> 16) & 0xFF)]
               ^ t[3072 + ((a >> 24) & 0xFF)] ^ t[2816 + ((a >> 32) & 0xFF)]
               ^ t[2560 + ((a >> 40) & 0xFF)] ^ t[2304 + ((a >> 48) & 0xFF)] ^ t[2048 + (a >> 56)]
               ^ t[1792 + (b & 0xFF)] ^ t[1536 + ((b >> 8) & 0xFF)] ^ t[1280 + ((b >> 16) & 0xFF)]
               ^ t[1024 + ((b >> 24) & 0xFF)] ^ t[768 + ((b >> 32) & 0xFF)]
               ^ t[512 + ((b >> 40) & 0xFF)] ^ t[256 + ((b >> 48) & 0xFF)] ^ t[b >> 56])
        i += 2
    if i < n:  # slicing-by-8 for an odd last word
        a = words[i] ^ crc
        crc = (t[1792 + (a & 0xFF)] ^ t[1536 + ((a >> 8) & 0xFF)] ^ t[1280 + ((a >> 16) & 0xFF)]
               ^ t[1024 + ((a >> 24) & 0xFF)] ^ t[768 + ((a >> 32) & 0xFF)]
               ^ t[512 + ((a >> 40) & 0xFF)] ^ t[256 + ((a >> 48) & 0xFF)] ^ t[a >> 56])
    for b in tail:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _crc_loop_python(crc, head, words, tail, t):
    """_crc_loop without Numba: on Python ints, several times faster than on NumPy scalars."""
    return _crc_loop(int(crc), head.tolist(), words.tolist(), tail.tolist(), _FLAT64_LIST)


_nb = numba()
_crc_kernel = _nb.njit(cache=True, nogil=True)(_crc_loop) if _nb else _crc_loop_python
_FLAT64_LIST = _FLAT64.tolist()


def _as_bytes_array(data):
    """A 1-D uint8 view of `data` (bytes-like or ndarray, C order), without copying when possible."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def crc32c(data, value=0):
    """CRC-32C of `data` (bytes-like or C-ordered ndarray bytes), continuing from `value`.

    Returns an int in [0, 2**32). crc32c(b"123456789") == 0xE3069283.
    """
    buf = _as_bytes_array(data)
    # Split at 8-byte address boundaries so the middle can be read as aligned uint64 words.
    start = (-buf.ctypes.data) % 8 if buf.size else 0
    start = min(start, buf.size)
    nwords = (buf.size - start) // 8
    stop = start + nwords * 8
    words = buf[start:stop].view("<u8")
    crc = np.uint64((value ^ 0xFFFFFFFF) & 0xFFFFFFFF)
    crc = _crc_kernel(crc, buf[:start], words, buf[stop:], _FLAT64)
    return int(crc) ^ 0xFFFFFFFF


def crc32c_reference(data, value=0):
    """Same result as `crc32c`, one byte at a time in plain Python (slow; for tests)."""
    crc = (value ^ 0xFFFFFFFF) & 0xFFFFFFFF
    table = _TABLE0
    for b in bytes(_as_bytes_array(data)):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def mask(crc):
    """TensorFlow/LevelDB's masked form of a crc (rotate right 15, add a constant), stored on disk."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked):
    """Inverse of `mask`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def masked_crc32c(data):
    """mask(crc32c(data)): the value BundleEntryProto.crc32c and table block trailers hold."""
    return mask(crc32c(data))
