"""gemv.py, decoding's float32 few-row products, against plain NumPy: every row count 1..8,
shapes whose C and OC are not multiples of the SIMD width or of _cols' KC-row panels and
STRIP-column strips, column/row ranges that start and end mid-vector, one thread and two."""

import numpy as np
import pytest
from cpu_child import NO512, run_for_cpu, x86_linux_only

from npgpt2 import layers

pytest.importorskip("numba")
from npgpt2 import gemv  # noqa: E402

# (C, OC): tails everywhere (C % 8, C % KC, OC % 16, OC % STRIP not 0), one weight row,
# one column, and a GPT-2 block shape of many panels and strips
SHAPES = [(37, 53), (100, 517), (8, 16), (1, 9), (13, 1), (769, 1100), (768, 2304)]


def data(M, C, OC, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, C)).astype(np.float32)
    w = rng.standard_normal((C, OC)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    return x, w, b


def reference(x, w, b):
    """x @ w + b in float64, and a bound on float32's rounding of it (per output)."""
    ref = x.astype(np.float64) @ w.astype(np.float64) + b
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64) + np.abs(b)
    return ref, 4 * x.shape[1] * np.finfo(np.float32).eps * scale + 1e-30


@pytest.mark.parametrize("C,OC", SHAPES)
@pytest.mark.parametrize("M", range(1, 9))
def test_kernels_equal_numpy(M, C, OC):
    x, w, b = data(M, C, OC, seed=M * 1000 + C)
    ref, tol = reference(x, w, b)
    for kernel, weight in ((gemv._cols, w), (gemv._rows, np.ascontiguousarray(w.T))):
        for bias in (b, np.zeros(0, np.float32)):
            out = np.full((M, OC), np.nan, np.float32)
            kernel(x, weight, bias, out, 0, OC)
            want = ref if bias.shape[0] else ref - b
            assert np.all(np.abs(out - want) <= tol), kernel.__name__


@pytest.mark.parametrize("C,OC", [(37, 53), (769, 1100)])
def test_ranges_write_only_their_columns(C, OC):
    """A chunk (j0, j1) of _cols / rows (r0, r1) of _rows: its outputs, bit-equal to the
    whole product's, and nothing outside it."""
    x, w, b = data(5, C, OC)
    for kernel, weight in ((gemv._cols, w), (gemv._rows, np.ascontiguousarray(w.T))):
        whole = np.empty((5, OC), np.float32)
        kernel(x, weight, b, whole, 0, OC)
        cuts = [0, 3, 17, OC // 2 + 1, OC - 5, OC]
        for a, z in zip(cuts, cuts[1:]):
            out = np.full((5, OC), np.nan, np.float32)
            kernel(x, weight, b, out, a, z)
            np.testing.assert_array_equal(out[:, a:z], whole[:, a:z])
            assert np.isnan(out[:, :a]).all() and np.isnan(out[:, z:]).all()


@pytest.mark.parametrize("C,OC", [(37, 53), (768, 2304)])
@pytest.mark.parametrize("M", [2, 3, 8])
def test_row_bits_do_not_depend_on_the_batch(M, C, OC):
    """Each output is summed in one order whatever M and the row pairing: a row alone and
    the same row at any place among M give the same bits (batched decoding)."""
    x, w, b = data(M, C, OC)
    for kernel, weight in ((gemv._cols, w), (gemv._rows, np.ascontiguousarray(w.T))):
        batch = np.empty((M, OC), np.float32)
        kernel(x, weight, b, batch, 0, OC)
        for m in range(M):
            solo = np.empty((1, OC), np.float32)
            kernel(x[m:m + 1].copy(), weight, b, solo, 0, OC)
            np.testing.assert_array_equal(solo[0], batch[m], err_msg=kernel.__name__)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M", range(1, 9))
def test_matmul_rows_equals_plain_layer(M, threads, monkeypatch):
    """The entry point (both weight layouts, with and without bias, gemv_pool's two threads)
    against layers.matmul_forward, the plain reference."""
    monkeypatch.setattr(gemv.threads, "gemv_threads", lambda work: threads)
    x, w, b = data(M, 300, 1037, seed=M)
    zero = np.zeros(1037, np.float32)
    for weight, bias in ((w, b), (w, None), (np.ascontiguousarray(w.T).T, b), (np.ascontiguousarray(w.T).T, None)):
        got = gemv.matmul_rows(x, weight, bias)
        want = layers.matmul_forward(x, w, b if bias is not None else zero)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_cols_refuses_arrays_its_strips_would_misread():
    """_strip's loads take a row's start from the shape (C-contiguous rows): another layout is
    refused when Numba compiles the call, not read wrongly."""
    from numba.core.errors import TypingError
    x, w, b = data(3, 40, 64)
    out = np.empty((3, 64), np.float32)
    with pytest.raises(TypingError, match="C-contiguous float32"):
        gemv._cols(np.asfortranarray(x), w, b, out, 0, 64)


def test_matmul_rows_refuses_a_strided_weight():
    x, w, _ = data(2, 16, 32)
    with pytest.raises(ValueError, match="C-contiguous"):
        gemv.matmul_rows(x, w[:, ::2])


# ---------------------------------------------------------------- every CPU path
# LLVM target CPU and features -> the /proc/cpuinfo flags they need: "generic" (x86-64
# baseline: SSE2, no FMA), AVX2 + FMA, AVX-512. The kernels are plain Numba: LLVM picks the
# instructions, and each path must give NumPy's product and a row's same bits alone or batched.
CPU_PATHS = {
    "generic": ("-avx,-avx2,-fma," + NO512, []),
    "haswell": ("+avx,+avx2,+fma," + NO512, ["avx2"]),  # every AVX2 CPU has FMA too
    "skylake-avx512": ("+avx2,+fma,+avx512f,+avx512bw,+avx512vl,+avx512dq", ["avx512f", "avx512bw"]),
}
CHILD = """
import json, numpy as np
from npgpt2 import gemv
rng = np.random.default_rng(7)
x = rng.standard_normal((5, 203)).astype(np.float32)
w = rng.standard_normal((203, 1100)).astype(np.float32)
b = rng.standard_normal(1100).astype(np.float32)
res = {}
for name, kernel, weight in (("cols", gemv._cols, w), ("rows", gemv._rows, np.ascontiguousarray(w.T))):
    out = np.empty((5, 1100), np.float32)
    kernel(x, weight, b, out, 0, 1100)
    solo = np.empty((1, 1100), np.float32)
    kernel(x[3:4].copy(), weight, b, solo, 0, 1100)
    sig = kernel.signatures[0]
    kernel.recompile()  # a fresh compile: inspect_asm is empty for code loaded from the cache
    asm = kernel.inspect_asm(sig)
    fmas = [line.split()[0] + (" ymm" if "ymm" in line else " zmm" if "zmm" in line else " xmm")
            for line in asm.splitlines() if "vfmadd" in line]
    res[name] = {"out": out.tolist(), "solo_equal": bool((solo[0] == out[3]).all()), "fmas": sorted(set(fmas))}
print(json.dumps(res))
"""


@x86_linux_only
@pytest.mark.parametrize("cpu", list(CPU_PATHS))
def test_every_cpu_path_equals_numpy(cpu, tmp_path):
    features, needs = CPU_PATHS[cpu]
    res = run_for_cpu(cpu, features, needs, CHILD, tmp_path)
    rng = np.random.default_rng(7)  # the child's data
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((5, 203), (203, 1100), 1100))
    ref, tol = reference(x, w, b)
    for name in ("cols", "rows"):
        assert np.all(np.abs(np.array(res[name]["out"]) - ref) <= tol), name
        assert res[name]["solo_equal"], name
        if cpu != "generic":  # packed fused multiply-adds on 256-bit (or 512-bit) registers
            assert any(f.startswith("vfmadd") and "ps " in f and f.endswith(("ymm", "zmm")) for f in res[name]["fmas"]), \
                (name, res[name]["fmas"])


def test_chunks_are_shared_equally():
    assert gemv.chunks(3, 1) == 1
    assert gemv.chunks(3, 2) == 2        # 768 columns: two pieces of 384, not 256 + 512
    assert gemv.chunks(9, 2) == 8
    assert gemv.chunks(12, 2) == 12
    assert gemv.chunks(50257, 2) == 16   # rows: 8 per thread, so a late worker costs one
    assert gemv.chunks(1, 2) == 1


@pytest.mark.parametrize("B", [1, 3])
def test_decode_attention_heads_on_two_threads(B, monkeypatch):
    """kernels' decode attention shares its heads with gemv_pool's worker: the bits of one
    thread (outputs and the keys and values written), rows at their own lengths in cache rows
    out of order, and layers' plain attention over each row's cache."""
    from npgpt2 import kernels
    rng = np.random.default_rng(B)
    NH, hs, n_ctx = 5, 16, 40
    C = NH * hs
    lengths, rows = np.array([30, 3, 17][:B]), np.array([2, 0, 3][:B])
    base = rng.standard_normal((2, 4, NH, n_ctx, hs)).astype(np.float32)
    qkv = rng.standard_normal((B, 1, 3 * C)).astype(np.float32)
    got = {}
    for threads in (1, 2):
        monkeypatch.setattr(gemv.threads, "gemv_threads", lambda work, n=threads: n)
        kc, vc = base[0].copy(), base[1].copy()
        got[threads] = kernels.attention_forward_cached(qkv, kc, vc, lengths, NH, rows), kc, vc
    for a, b in zip(got[1], got[2]):
        np.testing.assert_array_equal(a, b)
    out, kc, vc = got[2]
    for b in range(B):
        r, n = rows[b], lengths[b]
        want = layers.attention_forward_cached(qkv[b:b + 1], base[0][r:r + 1].copy(), base[1][r:r + 1].copy(), int(n), NH)
        np.testing.assert_allclose(out[b:b + 1], want, rtol=1e-4, atol=1e-5)
