"""The KV cache: each layer's keys and values of the positions already run, so decoding one
more token computes only that token's (GPT2.forward with cache=; sampling.py, batch_decode.py).
"""
import mmap

import numpy as np


class KVCache:
    """Keys and values of every layer for each row's positions 0..lengths[row]-1, preallocated
    to n_ctx.

    k, v: (n_layer, B, NH, n_ctx, hs); lengths: int (B,). Decoding one token writes one
    position of a row; nothing is reallocated. Rows may be at different lengths (batched
    decoding: batch_decode.py); `select(rows)` is what forward() takes to run some of them.
    """

    rows = None  # forward() runs every row, batch row b = cache row b

    def __init__(self, hparams, batch_size, dtype):
        L, NH, C, T = (hparams[k] for k in ("n_layer", "n_head", "n_embd", "n_ctx"))
        shape = (L, batch_size, NH, T, C // NH)
        self.k = lazy_zeros(shape, dtype)
        self.v = lazy_zeros(shape, dtype)
        self.lengths = np.zeros(batch_size, dtype=np.int64)

    @property
    def length(self):
        """The rows' common length (ValueError when they differ)."""
        return _common_length(self.lengths)

    @length.setter
    def length(self, n):
        self.lengths[:] = n

    def advance(self, n):
        self.lengths += n

    def truncate(self, length):
        """Forget positions >= length (they are overwritten by the next forward)."""
        np.minimum(self.lengths, length, out=self.lengths)

    def select(self, rows):
        """Some rows for one forward(): batch row b is cache row rows[b], at its own length."""
        return CacheRows(self, rows)


class CacheRows:
    """A KVCache's rows `rows` (int (B,)), each at its own length, for forward(); no copy."""

    def __init__(self, cache, rows):
        self.cache, self.k, self.v = cache, cache.k, cache.v
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def lengths(self):
        return self.cache.lengths[self.rows]

    @property
    def length(self):
        return _common_length(self.lengths)

    def advance(self, n):
        self.cache.lengths[self.rows] += n


def lazy_zeros(shape, dtype):
    """Zeros whose memory is taken only as it is written, 4 KB at a time: an anonymous mmap.
    (np.zeros of a large array asks Linux for 2 MB pages, so a short sequence, which writes a
    few positions of every head's (n_ctx, hs) block, would take 2 MB per block.)"""
    n = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(1, n * np.dtype(dtype).itemsize)), dtype=dtype, count=n).reshape(shape)


def _common_length(lengths):
    if lengths.min() != lengths.max():
        raise ValueError(f"the cache's rows have different lengths ({lengths.min()}..{lengths.max()})")
    return int(lengths[0])
