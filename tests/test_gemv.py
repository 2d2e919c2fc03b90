"""gemv.py, decoding's float32 few-row products, against plain NumPy: every row count 1..8,
shapes whose C and OC are not multiples of the SIMD width or of _cols' 8-row passes and
512-column tiles, column/row ranges that start and end mid-vector, one thread and two."""
import numpy as np
import pytest

from npgpt2 import layers

pytest.importorskip("numba")
from npgpt2 import gemv  # noqa: E402

# (C, OC): tails everywhere (C % 8, C % 16, OC % 16, OC % 512 not 0), one weight row,
# one column, and a GPT-2 block shape with more than one TILE of columns
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


def test_matmul_rows_refuses_a_strided_weight():
    x, w, _ = data(2, 16, 32)
    with pytest.raises(ValueError, match="C-contiguous"):
        gemv.matmul_rows(x, w[:, ::2])
