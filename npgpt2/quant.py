"""8-bit weights for generation: weight-only int8 with symmetric per-output-channel scales.

A float32 matrix M (R, K) whose rows are output channels is stored as

    q: int8 (R, K)           q[r, k] = round(M[r, k] / scale[r, k // G]), in [-127, 127]
    scale: float32 (R, K//G) scale[r, g] = max |M[r, group g]| / 127

so that M ≈ q * scale, each element off by at most scale / 2. G, the group size, is K (one
scale per output channel, the default) or 64/128 (a scale per 64/128 inputs). Only the
weights are 8-bit: activations, layernorm, softmax and the KV cache stay float32, and every
product is computed in float32 from the dequantised weights.

A `QuantizedWeight` stands in for a float32 array wherever the model reads a weight:
- a block's (C, OC) conv weight is the transposed view (`.T`) of its (OC, C) rows, so
  `x @ w` in layers.matmul_forward works unchanged (NumPy defers to `__rmatmul__`);
- the tied token embedding wte (V, C) is not transposed: `wte[tokens]` gives dequantised
  rows (the embedding), and `x @ wte.T` is the output head.
This module is the plain NumPy reference: dequantise, then a float32 matmul.
`quant_kernels.py` holds the Numba twins that dequantise on the fly (`kernels.matmul_forward`
and `GPT2._head` use them).

The converted file format (`npgpt2 convert --dtype int8`, see HACKING.md) is an OpenAI-layout
folder whose TF checkpoint holds, for each quantised weight NAME, `NAME/q8` (int8, (R, K))
and `NAME/scale` (float32, (R, K//G)) instead of NAME, and a `quant.json` describing it.
"""
import json
import logging
import mmap
from pathlib import Path

import numpy as np

from .errors import Npgpt2Error
from .fsutil import atomic_write, read_json

log = logging.getLogger(__name__)

DTYPES = ("float32", "int8")
QUANT_FILE = "quant.json"
FORMAT = "npgpt2-int8"
QMAX = 127  # symmetric: -127..127 (-128 unused, so that -q is always representable)
CHUNK_ROWS = 2048  # rows quantised at once: bounds the float64 temporaries (1558M's wte is 80M floats)


def check_dtype(dtype, flag="--dtype"):
    """'float32' or 'int8' (numpy float32 accepted) -> the name; anything else -> Npgpt2Error."""
    name = "float32" if dtype is None else getattr(dtype, "__name__", None) or str(dtype)
    if name not in DTYPES:
        raise Npgpt2Error(f"{flag}: unknown dtype {dtype!r} (choose float32 or int8)")
    return name


def is_matrix(name):
    """Is this parameter quantised? The four matmul weights of each block and the tied wte;
    wpe, biases and layernorm gains stay float32 (a few percent of the bytes)."""
    return name == "model/wte" or name.endswith("/w")


class QuantizedWeight:
    """An int8 matrix standing in for a float32 one (see the module docstring).

    q: int8 (R, K), scale: float32 (R, K // G). Not transposed it is the (R, K) matrix
    (wte: rows are looked up); `.T` is the (K, R) matrix that `x @ w` multiplies by.
    """
    __array_ufunc__ = None  # ndarray @ QuantizedWeight -> QuantizedWeight.__rmatmul__
    ndim = 2
    dtype = np.dtype(np.float32)  # what it computes in and dequantises to

    def __init__(self, q, scale, transposed=False):
        if q.dtype != np.int8 or q.ndim != 2 or scale.ndim != 2 or scale.shape[0] != q.shape[0] \
                or scale.shape[1] < 1 or q.shape[1] % scale.shape[1]:
            raise ValueError(f"QuantizedWeight: q {q.dtype} {q.shape} and scale {scale.shape} do not fit")
        self.q, self.scale, self.transposed = q, scale, transposed
        self.group = q.shape[1] // scale.shape[1]

    @property
    def shape(self):
        return self.q.shape[::-1] if self.transposed else self.q.shape

    @property
    def T(self):
        return QuantizedWeight(self.q, self.scale, not self.transposed)

    @property
    def nbytes(self):
        return self.q.nbytes + self.scale.nbytes

    def __repr__(self):
        return f"QuantizedWeight(int8 {self.shape}, group {self.group}{', transposed' if self.transposed else ''})"

    def rows(self, index):
        """Dequantised rows of the (R, K) matrix: index (any int array) -> (..., K) float32."""
        q, s = self.q[index], self.scale[index]  # [..., K], [..., K/G]
        return (q.reshape(s.shape + (self.group,)) * s[..., None]).reshape(q.shape)

    def dequantize(self):
        """The float32 matrix this stands for: (R, K), or (K, R) when transposed."""
        m = self.rows(slice(None))  # [R, K]
        return m.T if self.transposed else m

    def __getitem__(self, index):  # wte[tokens]: the embedding lookup
        if self.transposed:
            raise TypeError("QuantizedWeight: index the untransposed (rows) matrix")
        return self.rows(index)

    def __rmatmul__(self, x):  # x @ w, the plain way: dequantise all of w, then one float32 matmul
        # transposed: the forward's x @ W (K, R); not transposed: a backward's dout @ W.T, the
        # (R, K) rows themselves. Either way one float32 matrix exists for the product's time.
        return np.asarray(x, dtype=np.float32) @ self.dequantize()  # [..., K] @ [K, R] -> [..., R]


# ---------------------------------------------------------------- quantise
def quantize(m, group_size=None):
    """m: float (R, K), rows are output channels -> QuantizedWeight (R, K).

    group_size: None for one scale per row, else it must divide K. Computed in float64
    a few rows at a time, so each element is within scale / 2 of m (rounding to nearest).
    """
    R, K = m.shape
    G = K if group_size is None else int(group_size)
    if G <= 0 or K % G:
        raise Npgpt2Error(f"group_size: {group_size} does not divide the input dimension {K}")
    q = np.empty((R, K), dtype=np.int8)
    scale = np.empty((R, K // G), dtype=np.float32)
    for r0 in range(0, R, CHUNK_ROWS):
        mg = np.asarray(m[r0:r0 + CHUNK_ROWS], dtype=np.float64).reshape(-1, K // G, G)  # [r, K/G, G]
        s = np.abs(mg).max(axis=-1).astype(np.float32)  # [r, K/G]: the float32 scale times 127
        s /= QMAX
        safe = np.where(s > 0, s, 1).astype(np.float64)  # an all-zero group: q = 0, scale 0
        q[r0:r0 + CHUNK_ROWS] = np.clip(np.rint(mg / safe[..., None]), -QMAX, QMAX).reshape(-1, K)
        scale[r0:r0 + CHUNK_ROWS] = s
    return QuantizedWeight(q, scale)


def quantize_params(params, group_size=None, embedding=True, check=None):
    """{TF name: float array} -> the same names, matrices as QuantizedWeight, the rest float32.

    Block conv weights (1, C, OC) become the `.T` view (C, OC) of their (OC, C) rows; wte
    (V, C) is quantised per row (= per output channel of the tied head) unless
    embedding=False, which keeps it float32. Tensors of a memory-mapped checkpoint are read
    once each and their pages given back, so the float32 file is never resident at once.
    check: None, or called as check(name, w) before w is quantised (load_model's finite check:
    run over the whole mapped file first, it made all 6.2 GB of 1558M's float32 pages resident).
    """
    out = {}
    for name, w in params.items():
        if check is not None:
            check(name, w)
        if name == "model/wte":
            out[name] = quantize(w, group_size) if embedding else np.array(w, dtype=np.float32)
        elif is_matrix(name):
            out[name] = quantize(w.reshape(w.shape[-2:]).T, group_size).T  # [1, C, OC]: rows [OC, C]
        else:
            out[name] = np.array(w, dtype=np.float32)
        _release(w)
    return out


def _release(a):
    """If `a` (C-contiguous) views a read-only memory map, give its pages back: quantising a
    memory-mapped checkpoint then never holds more than one float32 tensor in RSS."""
    base = a
    while base is not None and getattr(base, "_mmap", None) is None:
        base = base.base
    if base is None or not a.flags.c_contiguous or not a.size:
        return
    mm = base._mmap
    start = np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data
    lo = a.ctypes.data - start
    first = lo // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, first, min(len(mm), lo + a.nbytes) - first)


# ---------------------------------------------------------------- 8-bit activations (decode's kernel)
def quantize_activations(x, G):
    """x: float32 (N, K), G divides K -> (xq int8 (N, K), xs float32 (N, K // G)).

    The plain reference of int8_dot.quantize_rows: per row and group of G inputs,
    xs = max |x| / 127 and xq = rint(x / xs) (half to even), all in float32; an all-zero
    group gets xs = 0, xq = 0.
    """
    x = np.asarray(x, dtype=np.float32)
    N, K = x.shape
    xg = x.reshape(N, K // G, G)  # [N, K/G, G]
    xs = np.abs(xg).max(axis=-1) / np.float32(QMAX)  # [N, K/G] float32
    safe = np.where(xs > 0, xs, np.float32(1))
    xq = np.clip(np.rint(xg / safe[..., None]), -QMAX, QMAX).astype(np.int8).reshape(N, K)
    return xq, xs.astype(np.float32)


def int8_dot_reference(xq, xs, q, ws, bias=None):
    """The plain reference of int8_dot._dot_rows: (N, K) int8 x (R, K) int8 -> (N, R).

    Per group g (G = K // NG inputs): the exact integer sum isum[n, r, g] (int64 here; it
    fits int32), then out = sum_g isum * ws[r, g] * xs[n, g] (+ bias), in float64.
    Returns (out float64 (N, R), isum int64 (N, R, NG)).
    """
    N, K = xq.shape
    R, NG = ws.shape
    G = K // NG
    xg = xq.astype(np.int64).reshape(N, NG, G)  # [N, NG, G]
    qg = q.astype(np.int64).reshape(R, NG, G)  # [R, NG, G]
    isum = np.einsum("ngk,rgk->nrg", xg, qg)  # [N, R, NG] exact
    out = np.einsum("nrg,rg,ng->nr", isum.astype(np.float64), ws.astype(np.float64), xs.astype(np.float64))
    if bias is not None:
        out = out + bias
    return out, isum


# ---------------------------------------------------------------- the converted file format
def checkpoint_tensors(params):
    """Quantised params -> {name: array} for write_checkpoint (NAME/q8 + NAME/scale per weight)."""
    tensors = {}
    for name, w in params.items():
        if isinstance(w, QuantizedWeight):
            tensors[name + "/q8"], tensors[name + "/scale"] = w.q, w.scale
        else:
            tensors[name] = w
    return tensors


def params_from_checkpoint(tensors, shapes, source):
    """The inverse of checkpoint_tensors; shapes: model.param_shapes(hparams). Raises
    Npgpt2Error naming the tensor when one is missing or has a shape that does not fit."""
    out = {}
    for name, shape in shapes.items():
        if name + "/q8" in tensors:
            q, s = tensors[name + "/q8"], tensors.get(name + "/scale")
            rows = shape if name == "model/wte" else shape[-2:][::-1]  # conv weights: (OC, C) rows
            if q.dtype != np.int8 or tuple(q.shape) != tuple(rows) or s is None or s.ndim != 2 \
                    or s.shape[0] != rows[0] or s.shape[1] < 1 or rows[1] % s.shape[1]:
                raise Npgpt2Error(f"{source}: tensor '{name}/q8' or '{name}/scale' does not fit "
                                  f"the int8 layout of {shape} (see HACKING.md)")
            w = QuantizedWeight(q, np.asarray(s, dtype=np.float32))
            out[name] = w if name == "model/wte" else w.T
        elif name in tensors:
            if tuple(tensors[name].shape) != tuple(shape):
                raise Npgpt2Error(f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                                  f"but hparams.json implies {shape}")
            out[name] = np.asarray(tensors[name], dtype=np.float32)
        else:
            raise Npgpt2Error(f"{source}: tensor '{name}' is missing (expected by hparams.json)")
    return out


def write_quant_info(folder, params):
    groups = sorted({w.group for w in params.values() if isinstance(w, QuantizedWeight)})
    info = {"format": FORMAT, "version": 1, "dtype": "int8",
            "group_size": None if len(groups) != 1 else groups[0],
            "embedding": isinstance(params.get("model/wte"), QuantizedWeight)}
    with atomic_write(Path(folder) / QUANT_FILE, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def read_quant_info(folder):
    """quant.json of a converted int8 folder, or None for a float32 folder."""
    path = Path(folder) / QUANT_FILE
    try:
        info = read_json(path)
    except FileNotFoundError:
        return None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != 1:
        raise Npgpt2Error(f"{path}: not an {FORMAT} version 1 description")
    return info


def dequantize_params(params):
    """Quantised params -> float32 params in the checkpoint's shapes ((1, C, OC) conv weights)."""
    out = {}
    for name, w in params.items():
        if isinstance(w, QuantizedWeight):
            # contiguous: a conv weight comes back as the .T view of its rows, and training
            # (the optimizer's in-place kernels) needs C-contiguous parameters
            w = np.ascontiguousarray(w.dequantize())
            out[name] = w if name == "model/wte" else w[None]
        else:
            out[name] = w
    return out
