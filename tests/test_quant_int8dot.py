"""The int8 x int8 decode kernels (int8_dot.py, gemv_pool.py, gemv.py) against plain NumPy
references of the same arithmetic (quant.quantize_activations, quant.int8_dot_reference,
layers.matmul_forward), on every CPU code path this machine can run."""

import numpy as np
import pytest
from cpu_child import NO512, run_for_cpu, x86_linux_only

from npgpt2 import layers, quant

pytest.importorskip("numba")
from npgpt2 import gemv, gemv_pool, int8_dot, quant_kernels  # noqa: E402

# (N rows, K inputs, G group, R outputs): K not a multiple of the SIMD width (tails), odd R
SHAPES = [(1, 100, 100, 7), (3, 96, 32, 131), (16, 768, 768, 65), (2, 37, 37, 1), (5, 192, 64, 300)]


def data(N, K, G, R, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, K)).astype(np.float32) * rng.uniform(0.1, 10, (N, 1)).astype(np.float32)
    x[0, : min(K, 5)] = [0.5, -0.5, 1.5, 2.5, -2.5][: min(K, 5)]  # rounding ties when max|x| = 127/2
    if N > 2:
        x[2] = 0  # an all-zero row: scale 0
    w = quant.quantize(rng.standard_normal((R, K)).astype(np.float32), G)
    b = rng.standard_normal(R).astype(np.float32)
    return x, w, b


@pytest.mark.parametrize("N,K,G,R", SHAPES)
def test_quantize_rows_bit_exact(N, K, G, R):
    x, _, _ = data(N, K, G, R)
    x[0, 0] = 127 / 2 * np.float32(0.25)  # scale 0.25 after max
    xq, xs = int8_dot.quantize(x, G)
    rq, rs = quant.quantize_activations(x, G)
    assert xq.dtype == np.int8 and xs.dtype == np.float32
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_array_equal(xs, rs)
    assert np.abs(xq.astype(np.int16)).max() <= 127


# (N rows, K inputs, G group, R outputs) for the VNNI kernel: groups of 32-byte steps with and
# without a multiple of four (its unrolled loop), and a byte tail (G % 32)
VNNI_SHAPES = SHAPES + [(1, 3072, 3072, 33), (2, 160, 160, 9), (1, 4 * 32 + 32 * 3 + 7, 4 * 32 + 32 * 3 + 7, 5)]
DOTS = {"madd": int8_dot.dot, "vnni": int8_dot.dot_vnni}


@pytest.mark.parametrize("path", list(DOTS))
@pytest.mark.parametrize("N,K,G,R", VNNI_SHAPES)
def test_dot_rows_equals_reference(N, K, G, R, path):
    """Both kernels, whichever int8_matmul uses here (the VNNI one compiles to plain vector code
    on a target without VNNI, so it is checked on every machine)."""
    dot = DOTS[path]
    x, w, b = data(N, K, G, R, seed=K)
    w.q[0, :] = -127  # extreme rows: the offset's correction at its largest
    w.q[-1, :] = 127
    xq, xs = quant.quantize_activations(x, G)
    ref, isum = quant.int8_dot_reference(xq, xs, w.q, w.scale, b)
    got = dot(xq, xs, w.q, w.scale, b)
    terms = np.einsum("nrg,rg,ng->nr", np.abs(isum), w.scale.astype(np.float64), xs.astype(np.float64))
    assert np.all(np.abs(got - ref) <= 1e-6 * (terms + np.abs(b)) + 1e-30)
    # the integer part alone, bit-exact: unit scales and one group give float32(isum), exact below 2**24
    ones_w, ones_x = np.ones((R, 1), np.float32), np.ones((N, 1), np.float32)
    exact = dot(xq, ones_x, w.q, ones_w)
    np.testing.assert_array_equal(exact, quant.int8_dot_reference(xq, ones_x, w.q, ones_w)[1][..., 0])


def test_offset_activations():
    x, _, _ = data(3, 96, 32, 1)
    xq, xs, xu = int8_dot.quantize(x, 32, offset=True)
    assert xu.dtype == np.uint8
    np.testing.assert_array_equal(xu.astype(np.int16), xq.astype(np.int16) + 128)
    np.testing.assert_array_equal(int8_dot.weight_sums(np.array([[1, -2, 3, 127]], np.int8), 2), [[-1, 130]])


@pytest.mark.parametrize("path", ["madd", "vnni"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N,K,G,R", SHAPES + [(1, 768, 768, 3000)])
def test_int8_matmul_one_and_two_threads(N, K, G, R, threads, path, monkeypatch):
    """quant_kernels.matmul_forward's decode GEMV path (<= 16 rows, quantised_activations), through each kernel this
    machine can run (the fallback forced too): the rows shared with gemv_pool's worker give
    what one thread gives (up to the order LLVM sums a row's groups in, which may differ
    between a chunk's vector body and its tail), and equal the reference."""
    if path == "vnni" and not int8_dot.VNNI:
        pytest.skip("Numba's target has no VNNI")
    monkeypatch.setattr(int8_dot, "PATH", path)
    monkeypatch.setattr(quant_kernels.threads, "gemv_threads", lambda work: threads)
    x, w, b = data(N, K, G, R, seed=R)
    xq, xs = quant.quantize_activations(x, G)
    ref, _ = quant.int8_dot_reference(xq, xs, w.q, w.scale, b)
    one = int8_dot.dot(xq, xs, w.q, w.scale, b)
    for _ in range(20):  # many jobs: the worker spins, claims, sleeps, wakes
        with quant_kernels.quantised_activations():
            got = quant_kernels.matmul_forward(x[:, None], w.T, b)[:, 0]
        np.testing.assert_allclose(got, one, rtol=1e-6, atol=1e-6 * np.abs(one).max())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # and near the float-activation product: activations off by at most half a step each
    plain = layers.matmul_forward(x, w.T, b)
    step = np.abs(x).max() / 127
    assert np.abs(got - plain).max() <= 0.5 * step * np.abs(w.dequantize()).sum(1).max() + 1e-4


def test_activations_exact_unless_decoding_opts_in(monkeypatch):
    """Exact products are the default; quantised_activations() (model_fast's forward) opts in;
    an enclosing float_activations() (a caller asking for exact decoding) wins over it."""
    calls = []
    real = quant_kernels.int8_matmul
    monkeypatch.setattr(quant_kernels, "int8_matmul", lambda *a: calls.append(1) or real(*a))
    x, w, b = data(2, 96, 32, 50)
    exact = layers.matmul_forward(x, w.T, b)
    np.testing.assert_allclose(quant_kernels.matmul_forward(x, w.T, b), exact, rtol=1e-5, atol=1e-4)
    assert calls == []
    with quant_kernels.quantised_activations():
        quant_kernels.matmul_forward(x, w.T, b)
        assert calls == [1]
        with quant_kernels.float_activations():  # training's forward inside a decode: exact
            quant_kernels.matmul_forward(x, w.T, b)
    assert calls == [1]
    with quant_kernels.float_activations(), quant_kernels.quantised_activations():
        np.testing.assert_allclose(quant_kernels.matmul_forward(x, w.T, b), exact, rtol=1e-5, atol=1e-4)
    assert calls == [1] and not quant_kernels.quantising()


def test_model_decode_quantises_unless_asked_for_exact(monkeypatch):
    """model_fast's forward (the kernels' decoding) quantises an int8 model's activations; the same
    forward inside float_activations() gives the exact products, equal to the float twin's."""
    import npgpt2
    from npgpt2 import kernels, model
    monkeypatch.setattr(model, "ops", lambda: kernels)  # _head's choice too, whatever ops() says here
    hp = {"n_vocab": 50, "n_ctx": 16, "n_embd": 32, "n_head": 2, "n_layer": 2}
    q = npgpt2.GPT2(hp, quant.quantize_params(dict(model.init_model(hp, seed=1).params)))
    f = npgpt2.GPT2(hp, quant.dequantize_params(dict(q.params)))  # the float twin
    tokens = np.arange(6)[None] % 50
    want = f._forward_fast(kernels, tokens, None, False)
    with quant_kernels.float_activations():
        np.testing.assert_allclose(q._forward_fast(kernels, tokens, None, False), want, rtol=1e-4, atol=1e-4)
    got = q._forward_fast(kernels, tokens, None, False)  # the quantised decode: near, not equal
    assert 0 < np.abs(got - want).max() < 0.05


def test_dequant_fallback_kernel_still_selectable(monkeypatch):
    monkeypatch.setattr(quant_kernels, "KERNEL", "dequant")
    x, w, b = data(2, 96, 32, 50)
    got = quant_kernels.matmul_forward(x, w.T, b)
    np.testing.assert_allclose(got, layers.matmul_forward(x, w.T, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_gemv_matmul_rows_equals_plain(M, threads, monkeypatch):
    monkeypatch.setattr(gemv.threads, "gemv_threads", lambda work: threads)
    rng = np.random.default_rng(M)
    x = rng.standard_normal((M, 100)).astype(np.float32)
    rows = rng.standard_normal((517, 100)).astype(np.float32)  # (OC, C): the head's wte layout
    b = rng.standard_normal(517).astype(np.float32)
    for w, bias in ((rows.T, b), (rows.T, None), (np.ascontiguousarray(rows.T), b)):
        got = gemv.matmul_rows(x, w, bias)
        ref = layers.matmul_forward(x, w, b if bias is not None else np.zeros(517, np.float32))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_pool_job_sequence_survives_a_late_worker():
    """Posted with threads=1 the worker is not told: the caller runs every chunk."""
    x, w, b = data(1, 96, 96, 200)
    xq, xs = int8_dot.quantize(x, 96)
    out = np.zeros((1, 200), np.float32)
    params = gemv_pool.job_params((xq, xs, w.q, w.scale, b, out), (1, 96, 200, 1, 200))
    gemv_pool.run(gemv_pool.KIND_INT8, params, 7, threads=1)
    np.testing.assert_array_equal(out, int8_dot.dot(xq, xs, w.q, w.scale, b))


# ---------------------------------------------------------------- every CPU path
# LLVM target CPU and features (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) -> the /proc/cpuinfo
# flags they need. "generic" is the plain fallback (x86-64 baseline: SSE2, no AVX); the others
# are the paths LLVM takes for this module's kernels on AVX2, AVX-VNNI (Intel client cores),
# AVX-512 and AVX-512 VNNI machines.
CPU_PATHS = {
    "generic": ("-avx,-avx2,-fma,-avxvnni," + NO512, []),
    "haswell": ("+avx,+avx2,+fma,-avxvnni," + NO512, ["avx2"]),
    "alderlake": ("+avx,+avx2,+fma,+avxvnni," + NO512, ["avx2", "avx_vnni"]),
    "skylake-avx512": ("+avx2,+fma,+avx512f,+avx512bw,+avx512vl,+avx512dq,-avx512vnni", ["avx512f", "avx512bw"]),
    "icelake-server": ("+avx2,+fma,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni",
                       ["avx512f", "avx512bw", "avx512_vnni"]),
}
CHILD = """
import json, sys, numpy as np
from npgpt2 import int8_dot, quant
rng = np.random.default_rng(5)
x = rng.standard_normal((3, 200)).astype(np.float32)
w = quant.quantize(rng.standard_normal((77, 200)).astype(np.float32), 40)
xq, xs = int8_dot.quantize(x, 40)
res = {"xq": xq.tolist(), "path": int8_dot.PATH}
for path, dot in (("madd", int8_dot.dot), ("vnni", int8_dot.dot_vnni)):
    res[path] = {"out": dot(xq, xs, w.q, w.scale).tolist(),
                 "ones": dot(xq, np.ones((3, 1), np.float32), w.q, np.ones((77, 1), np.float32)).tolist(),
                 "asm": int8_dot.dot_instructions(path)}
print(json.dumps(res))
"""


@x86_linux_only
@pytest.mark.parametrize("cpu", list(CPU_PATHS))
def test_every_cpu_path_equals_reference(cpu, tmp_path):
    features, needs = CPU_PATHS[cpu]
    res = run_for_cpu(cpu, features, needs, CHILD, tmp_path)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    w = quant.quantize(rng.standard_normal((77, 200)).astype(np.float32), 40)
    xq, xs = quant.quantize_activations(x, 40)
    np.testing.assert_array_equal(np.array(res["xq"], np.int8), xq)
    ones = np.ones((3, 1), np.float32), np.ones((77, 1), np.float32)
    ref, _ = quant.int8_dot_reference(xq, xs, w.q, w.scale)
    vnni = "+avxvnni" in features or "+avx512vnni" in features
    assert res["path"] == ("vnni" if vnni else "madd")
    for path in ("madd", "vnni"):  # both kernels compile and compute on every target
        got = res[path]
        np.testing.assert_array_equal(np.array(got["ones"]),
                                      quant.int8_dot_reference(xq, ones[0], w.q, ones[1])[1][..., 0])
        np.testing.assert_allclose(np.array(got["out"]), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    asm, vasm = res["madd"]["asm"], res["vnni"]["asm"]
    if cpu == "generic":
        assert asm["register"] == "xmm" and "vpmaddwd" not in asm["instructions"]
    else:  # the paired int16 multiply-add (or VNNI's fused form) on ymm (AVX2) / zmm (AVX-512)
        # LLVM keeps 256-bit vectors on Intel's AVX-512 cores (prefer-vector-width=256)
        assert asm["register"] in (("ymm", "zmm") if "+avx512f" in features else ("ymm",))
        assert {"vpmaddwd", "vpdpwssd", "vpdpbusd"} & set(asm["instructions"])
    # the VNNI kernel: vpdpbusd exactly where the target has it
    assert ("vpdpbusd" in vasm["instructions"]) == vnni
