"""`train --memory_saving_gradients`: one block's backward, re-running its forward from its input.

The memory-saving forward (GPT2.forward_with_saves(memory_saving=True)) keeps only each
block's input resid_pre (B, T, C). The backward then needs block i's activations once more:
block_backward re-runs the block's forward from resid_pre, with its saves, and runs the
block's backward at once, so one block's activations exist at a time.

One block's activations and its backward's temporaries are about 20 (B, T, C) arrays (qkv 3C,
mlp.pre 4C, GELU's output and gradient 4C each, ...), more than all n_layer inputs together at
124M (12). So the block is re-run CHUNK_POSITIONS positions (whole batch rows: attention mixes
the positions of a row) at a time: the block's working set stops growing with the batch, and
every GEMM still has >= CHUNK_POSITIONS rows (full speed). Each row's arithmetic is the
unchunked block's; only the sums over rows (the weight and bias gradients) add the chunks'
parts one after another instead of inside one GEMM: equal to the normal path within float
rounding (<= 1e-14 relative in float64, tests/test_memsave.py), and bit for bit when the batch
is one chunk (B * T <= CHUNK_POSITIONS, or B = 1).
"""
import numpy as np

# a chunk holds at most this many positions (at least one row): 1024 x 768 floats is 3 MB a (T, C) array
CHUNK_POSITIONS = 1024


def chunk_rows(B, T):
    """Batch rows per chunk: as many whole rows as fit in CHUNK_POSITIONS positions, at least 1."""
    return min(B, max(1, CHUNK_POSITIONS // T))


def block_forward(model, lay, blk, x):
    """A block's forward keeping nothing: x (B, T, C) -> its output (B, T, C), chunk by chunk
    (each chunk's saves and temporaries go before the next chunk's are made). Each row's
    output is the one _block_forward gives for the whole batch (a row's positions never mix
    with another row's)."""
    B, T, _ = x.shape
    rows = chunk_rows(B, T)
    if rows >= B:
        return model._block_forward(lay, blk, x)[0]
    out = np.empty_like(x)
    for b0 in range(0, B, rows):
        out[b0:b0 + rows] = model._block_forward(lay, blk, x[b0:b0 + rows])[0]  # [R, T, C]
    return out


def block_backward(model, lay, i, resid_pre, dresid, grads):
    """Block i's backward from its input alone: resid_pre (B, T, C) the block's input (the
    forward's save), dresid (B, T, C) the gradient at its output -> the gradient at its input
    (B, T, C); grads gets the block's parameter gradients under their full names (as
    GPT2._block_backward fills it). dresid is overwritten (each chunk's rows with the result).

    Per chunk of rows: _block_forward again (its saves, bit for bit the forward's) and
    _block_backward at once; the chunk's activations go before the next chunk's are made.
    """
    B, T, _ = resid_pre.shape
    rows = chunk_rows(B, T)
    blk = model.blocks[i]
    if rows >= B:  # one chunk: exactly the normal path's block backward
        act = model._block_forward(lay, blk, resid_pre)[1]
        return model._block_backward(lay, i, dresid, act, grads)
    names = None
    for b0 in range(0, B, rows):
        b1 = min(B, b0 + rows)
        act = model._block_forward(lay, blk, resid_pre[b0:b1])[1]  # [R, T, C] -> the chunk's saves
        part = {}
        dresid[b0:b1] = model._block_backward(lay, i, dresid[b0:b1], act, part)  # [R, T, C] at the input
        del act
        if names is None:  # the first chunk's gradients (fresh arrays) hold the sums
            names = list(part)
            grads.update(part)
        else:
            for name in names:
                grads[name] += part[name]  # the weight and bias gradients are sums over positions
        del part  # before the next chunk's
    return dresid
