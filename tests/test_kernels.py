"""The SIMD kernels behind the public API: every tile shape, every instruction set, the swap."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import nplora
from nplora import _core


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 31, 63, 64, 65])
@pytest.mark.parametrize("in_features,out_features", [(37, 13), (64, 64), (130, 71)])
def test_small_batch_kernel_matches_numpy(rng, dtype, n, in_features, out_features):
    # Odd widths exercise the masked tails and the rows left over after whole tiles; n = 3-6 take
    # whole-batch dot-product tiles (AVX-512), n around 64 crosses to the BLAS path.
    weight = rng.standard_normal((out_features, in_features)).astype(dtype)
    bias = rng.standard_normal(out_features).astype(dtype)
    layer = nplora.LoraLinear(weight, bias, r=5, lora_alpha=3, init_lora_weights=False, seed=1).eval()
    x = rng.standard_normal((n, in_features)).astype(dtype)
    expected = x @ weight.T + bias + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer(x), expected, rtol=tol, atol=tol * np.abs(expected).max())


@pytest.mark.parametrize("n", [6, 20, 64])
@pytest.mark.parametrize("training", [False, True])
def test_small_batch_pack_of_strided_rows_split_over_threads(rng, dtype, n, training):
    # x is a column slice (row stride > width) wide enough that both threads pack part of it, with
    # split points inside the transposed squares. In eval the A and W products share one packed x;
    # in training the A product packs the layer's cached copy of x.
    in_features, out_features = 1003, 29
    weight = rng.standard_normal((out_features, in_features)).astype(dtype)
    layer = nplora.LoraLinear(weight, r=4, lora_alpha=8, init_lora_weights=False, seed=3)
    layer.train(training)
    wide = rng.standard_normal((n, in_features + 9)).astype(dtype)
    x = wide[:, 5:5 + in_features]
    expected = x @ weight.T + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer.forward(x), expected, rtol=tol, atol=tol * np.abs(expected).max())


ISAS_LOWEST_FIRST = ("none", "avx2", "avx512")


def isas_this_cpu_runs() -> set[str]:
    """The kernels' instruction sets this CPU has (the best and every one below it)."""
    env = {key: value for key, value in os.environ.items() if key != "NPLORA_ISA"}
    best = subprocess.run([sys.executable, "-c", "from nplora import _core; print(_core.kernel_isa())"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    return set(ISAS_LOWEST_FIRST[:ISAS_LOWEST_FIRST.index(best) + 1])


def worst_error_on_every_isa(script: str, **env_vars: str) -> dict[str, float]:
    """Runs `script` (which prints "<isa> <worst error>") once per NPLORA_ISA, in fresh processes."""
    seen = {}
    for isa in reversed(ISAS_LOWEST_FIRST):
        env = dict(os.environ, NPLORA_ISA=isa, **env_vars)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        seen[out[0]] = float(out[1])
    return seen


@pytest.mark.parametrize("n", [7, 8])
@pytest.mark.parametrize("training", [False, True])
def test_two_k_per_lane_pack_split_at_odd_columns(rng, n, training):
    # Float batches of 7-8 rows on AVX-512 pack two k per lane pair. 2051 columns split over 2-3
    # threads at odd k (1025; 683, 1367), so a part starts on a pair's second lane, and the last
    # pair is half full. Bitwise the same on any thread count, and against NumPy.
    in_features, out_features = 2051, 75
    weight = rng.standard_normal((out_features, in_features)).astype(np.float32)
    bias = rng.standard_normal(out_features).astype(np.float32)
    layer = nplora.LoraLinear(weight, bias, r=7, lora_alpha=8, init_lora_weights=False, seed=3)
    layer.train(training)
    wide = rng.standard_normal((n, in_features + 3)).astype(np.float32)
    x = wide[:, 1:1 + in_features]
    x64 = x.astype(np.float64)
    a, b = layer.lora_A.astype(np.float64), layer.lora_B.astype(np.float64)
    expected = x64 @ weight.T.astype(np.float64) + bias + layer.scaling * (x64 @ a.T) @ b.T
    before = nplora.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            nplora.set_num_threads(threads)
            results.append(layer.forward(x))
    finally:
        nplora.set_num_threads(before)
    error = np.abs(results[0] - expected).max() / np.abs(expected).max()
    assert error < 1e-5, error
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])


TWO_K_PER_LANE_ON_EVERY_ISA = """
import numpy as np, nplora
from nplora import _core
rng = np.random.default_rng(8)
worst = 0.0
for dtype in (np.float32, np.float64):
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for n in range(1, 10):
        for fan_in, r in ((37, 5), (64, 16), (3, 1)):
            weight = rng.standard_normal((29, fan_in)).astype(dtype)
            bias = rng.standard_normal(29).astype(dtype)
            layer = nplora.LoraLinear(weight, bias, r=r, lora_alpha=2, init_lora_weights=False, seed=n)
            x = rng.standard_normal((n, fan_in + 2)).astype(dtype)[:, 1:-1]
            x64 = x.astype(np.float64)
            a, b = layer.lora_A.astype(np.float64), layer.lora_B.astype(np.float64)
            want = x64 @ weight.T.astype(np.float64) + bias + layer.scaling * (x64 @ a.T) @ b.T
            for training in (False, True):
                y = layer.train(training).forward(x)
                worst = max(worst, float(np.abs(y - want).max() / np.abs(want).max()) / tol)
    config = lambda r: nplora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                         init_lora_weights=False)
    for n in range(1, 10):
        weight = rng.standard_normal((61, 45)).astype(dtype)
        model = nplora.LoraModel({"proj.weight": weight}, config(3), "a0", seed=0)
        model.add_adapter("a1", config(16), seed=1)
        model.eval()
        x = rng.standard_normal((n, 45)).astype(dtype)
        ids = rng.integers(-1, 2, n)
        y = model.forward("proj", x, adapter_ids=ids)
        x64 = x.astype(np.float64)
        want = x64 @ weight.T.astype(np.float64)
        for k in range(2):
            layer = model.layers(f"a{k}")["proj"]
            rows = ids == k
            a, b = layer.lora_A.astype(np.float64), layer.lora_B.astype(np.float64)
            want[rows] += layer.scaling * (x64[rows] @ a.T) @ b.T
        worst = max(worst, float(np.abs(y - want).max() / np.abs(want).max()) / tol)
    for n in range(1, 10):
        # An inf in the last column of W (odd k) and of B (odd r): the odd-k tail must not add
        # inf * 0 = NaN from its unused lanes.
        weight = rng.standard_normal((16, 33)).astype(dtype)
        weight[3, -1] = np.inf
        layer = nplora.LoraLinear(weight, r=5, lora_alpha=5, init_lora_weights=False, seed=n)
        b = layer.lora_B.copy()
        b[2, -1] = np.inf
        layer.lora_B = b
        x = (np.abs(rng.standard_normal((n, 33))) + 0.5).astype(dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            want = (x @ weight.T + layer.scaling * (x @ layer.lora_A.T) @ b.T).astype(np.float64)
        y = layer.eval().forward(x)
        if not np.array_equal(np.isnan(y), np.isnan(want)) or not np.array_equal(y[np.isinf(want)], want[np.isinf(want)]):
            worst = float("inf")
print(_core.kernel_isa(), worst)
"""


def test_two_k_per_lane_on_every_instruction_set_and_dtype():
    # NPLORA_OUTER_MIN_ROWS=0 sends every small batch to the outer-product kernel, so batches of
    # up to half a vector of rows pack two k per lane on every ISA and in float64 too (by default
    # only float32 batches of 7-8 rows on AVX-512 do): odd and even k and r, k = 3 (one pair and a
    # half), strided rows, training (the A product packs the cached copy), mixed batches, and an
    # inf in the last column of W and of B.
    seen = worst_error_on_every_isa(TWO_K_PER_LANE_ON_EVERY_ISA, NPLORA_OUTER_MIN_ROWS="0")
    assert all(err < 1.0 for err in seen.values()), seen
    assert set(seen) == isas_this_cpu_runs(), seen


def test_every_instruction_set_gives_the_same_answer():
    # NPLORA_ISA lowers the kernels' instruction set in a fresh process; all must agree.
    script = (
        "import numpy as np, nplora, sys\n"
        "from nplora import _core\n"
        "rng = np.random.default_rng(0)\n"
        "w = rng.standard_normal((53, 91)); b = rng.standard_normal(53)\n"
        "layer = nplora.LoraLinear(w, b, r=3, init_lora_weights=False, seed=2).eval()\n"
        "x = rng.standard_normal((6, 91))\n"
        "ref = x @ w.T + b + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T\n"
        "print(_core.kernel_isa(), float(np.abs(layer(x) - ref).max()))\n"
    )
    seen = worst_error_on_every_isa(script)
    assert all(err < 1e-11 for err in seen.values()), seen
    assert set(seen) == isas_this_cpu_runs(), seen


def test_swap_is_one_update_with_the_right_result(rng, dtype):
    weight = rng.standard_normal((40, 30)).astype(dtype)
    original = weight.copy()
    first = nplora.LoraLinear(weight, r=3, lora_alpha=6, init_lora_weights=False, seed=1)
    second = nplora.LoraLinear(weight, r=5, lora_alpha=2, init_lora_weights=False, seed=2)
    first.merge()
    _core.swap_merged(first._core, second._core)
    assert not first.merged and second.merged
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(weight, original + second.delta_weight(), rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="not merged"):
        _core.swap_merged(first._core, second._core)
    other = nplora.LoraLinear(weight.copy(), r=2)
    with pytest.raises(ValueError, match="same weight"):
        _core.swap_merged(second._core, other._core)
    # Views of one buffer start at the same element: the shapes must match too (a (1, n) and an
    # (n, 1) view of 4M elements crashed the process).
    reshaped = nplora.LoraLinear(weight.reshape(60, 20), r=2)
    before = weight.copy()
    with pytest.raises(ValueError, match=r"40x30 view of it, the other over a 60x20"):
        nplora.swap_adapters(second, reshaped)
    np.testing.assert_array_equal(weight, before)
    assert second.merged and not reshaped.merged


# ------------------------------------------------------------------ the core's matrix product

GEMM_SHAPES = [
    (1, 1, 1),
    (3, 5, 7),
    (8, 32, 512),  # exactly one tile, one k block
    (9, 33, 513),  # one past every edge
    (37, 300, 1100),  # several W blocks and k blocks, ragged everywhere
    (200, 5, 70),  # tall and skinny C: the transposed route
    (16, 600, 40),
    # A few k deep (merge's C += B A): W blocks as wide as C's rows, C split by rows; past one such
    # block (5000 > 4096 floats at k = 16, 1100 > 1024 at k = 64) and one k past the route.
    (130, 5000, 16),
    (90, 1100, 64),
    (41, 700, 65),
]


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_matches_numpy(rng, dtype, backend, m, n, k, trans_a, trans_b):
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    op_a, op_b = (a.T if trans_a else a), (b.T if trans_b else b)
    exact = op_a.astype(np.float64) @ op_b.astype(np.float64)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    scale = np.abs(exact).max() + 1.0
    for alpha, beta in [(1.0, 0.0), (-0.5, 1.0), (2.0, 0.25)]:
        # C lives inside a wider array: a row stride above n must be honoured, the padding untouched.
        storage = rng.standard_normal((m, n + 3)).astype(dtype)
        c = storage[:, :n]
        before, padding = c.copy(), storage[:, n:].copy()
        if beta == 0.0:
            c[...] = np.nan  # beta == 0 must not read C
        _core.gemm(a, b, c, trans_a, trans_b, alpha, beta)
        want = alpha * exact + (beta * before if beta else 0.0)
        np.testing.assert_allclose(c, want, rtol=tol, atol=tol * scale * max(1.0, abs(alpha)))
        np.testing.assert_array_equal(storage[:, n:], padding)


def test_gemm_is_bitwise_the_same_on_one_and_two_threads(rng):
    # Each element is summed in one fixed order whichever thread computes it.
    nplora.use_blas("nplora", float64="nplora")
    before = nplora.get_num_threads()
    try:
        for dtype in (np.float32, np.float64):
            for m, n, k in [(300, 700, 1100), (400, 9, 600), (9, 900, 700), (300, 5000, 16)]:
                a = rng.standard_normal((m, k)).astype(dtype)
                b = rng.standard_normal((n, k)).astype(dtype)
                results = []
                for threads in (1, 2):
                    nplora.set_num_threads(threads)
                    c = np.empty((m, n), dtype)
                    _core.gemm(a, b, c, False, True)
                    results.append(c)
                np.testing.assert_array_equal(results[0], results[1])
    finally:
        nplora.set_num_threads(before)
        nplora.use_blas("nplora")


def test_float64_products_default_to_nplora_kernels_unless_numpy_is_asked_for():
    try:
        nplora.use_blas("nplora")
        if _core.kernel_isa() != "none":
            assert nplora.blas_info()["float64"] == "nplora"
            assert _core.own_gemm_enabled(True)
        nplora.use_blas("nplora", float64="numpy")
        if nplora.blas_info()["filepath"] is not None:  # NumPy has a CBLAS to hand them to
            assert nplora.blas_info()["float64"] == "numpy"
            assert not _core.own_gemm_enabled(True)
            assert _core.own_gemm_enabled(False) == (_core.kernel_isa() != "none")
    finally:
        nplora.use_blas("nplora")


BIT_FOR_BIT_ON_NUMPY = """
import numpy as np, nplora
rng = np.random.default_rng(5)
weight = rng.standard_normal((256, 4099))
layer = nplora.LoraLinear(weight, r=4, lora_alpha=4).eval()
nplora.use_blas("nplora", float64="numpy")
if nplora.blas_info()["float64"] != "numpy":
    print("skip")
else:
    for n in (65, 300):
        x = rng.standard_normal((n, 4099))
        np.testing.assert_array_equal(layer(x), x @ weight.T)
    print("ok")
"""


def test_float64_on_numpy_gives_numpys_products_bit_for_bit_past_64_rows():
    # What the README promises for use_blas(float64="numpy"): above kSmallBatchMaxRows the product
    # is NumPy's own dgemm call (B = 0 and no bias, so the layer's output is x @ W.T alone). In a
    # fresh process: late in the full suite (fresh virtualenv, no torch, on Zen 3) 2.8% of the
    # 65-row product differed in the last bits, after some earlier test's state, not yet found.
    out = subprocess.run([sys.executable, "-c", BIT_FOR_BIT_ON_NUMPY], capture_output=True, text=True,
                         check=True).stdout.split()
    if out == ["skip"]:
        pytest.skip("NumPy's BLAS has no CBLAS interface nplora can call")
    assert out == ["ok"], out


def test_backward_is_bitwise_the_same_on_any_thread_count(rng):
    # The thin products split out into a fixed number of parts (summed in part order) and the GEMM
    # splits C by columns, so no gradient depends on how many threads took part.
    nplora.use_blas("nplora", float64="nplora")
    before = nplora.get_num_threads()
    try:
        for dtype in (np.float32, np.float64):
            weight = rng.standard_normal((1000, 700)).astype(dtype)
            layer = nplora.LoraLinear(weight, r=16, lora_alpha=32, init_lora_weights="gaussian", seed=0)
            layer.lora_B[...] = rng.standard_normal(layer.lora_B.shape)
            x = rng.standard_normal((300, 700)).astype(dtype)
            g = rng.standard_normal((300, 1000)).astype(dtype)
            results = []
            for threads in (1, 2, 3):
                nplora.set_num_threads(threads)
                layer.zero_grad()
                layer(x)
                grad_x = layer.backward(g)
                results.append((grad_x, layer.lora_A_grad.copy(), layer.lora_B_grad.copy()))
            for other in results[1:]:
                for first, second in zip(results[0], other):
                    np.testing.assert_array_equal(first, second)
    finally:
        nplora.set_num_threads(before)
        nplora.use_blas("nplora")


def test_gemm_rejects_mismatched_shapes():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"op\(a\) is \(3, 4\), op\(b\) \(5, 2\)"):
        _core.gemm(a, np.ones((5, 2), np.float32), np.empty((3, 2), np.float32))
    with pytest.raises(TypeError):
        _core.gemm(a, np.ones((4, 2), np.float64), np.empty((3, 2), np.float32))


def test_every_instruction_set_runs_the_packed_product():
    # The AVX-512 and AVX2 builds of the packed product (and no SIMD at all) agree with NumPy.
    script = (
        "import numpy as np, nplora\n"
        "from nplora import _core\n"
        "nplora.use_blas('nplora', float64='nplora')\n"
        "rng = np.random.default_rng(0)\n"
        "worst = 0.0\n"
        "for m, n, k in [(37, 300, 1100), (200, 5, 70), (8, 32, 512)]:\n"
        "    for ta in (False, True):\n"
        "        for tb in (False, True):\n"
        "            a = rng.standard_normal((k, m) if ta else (m, k))\n"
        "            b = rng.standard_normal((n, k) if tb else (k, n))\n"
        "            c = np.empty((m, n))\n"
        "            _core.gemm(a, b, c, ta, tb)\n"
        "            ref = (a.T if ta else a) @ (b.T if tb else b)\n"
        "            worst = max(worst, float(np.abs(c - ref).max()))\n"
        "print(_core.kernel_isa(), worst)\n"
    )
    seen = worst_error_on_every_isa(script)
    assert all(err < 1e-10 for err in seen.values()), seen
    assert set(seen) == isas_this_cpu_runs(), seen


# ------------------------------------------------------------ NumPy's BLAS on nplora's threads

def test_numpy_blas_runs_on_nplora_threads_with_the_same_results(rng):
    info = nplora.blas_info()
    if not info["numpy_blas_on_nplora_threads"]:
        pytest.skip("NumPy's BLAS here has no caller-managed threading (OpenBLAS >= 0.3.27)")
    cases = [(rng.standard_normal((n, 700)).astype(dtype), rng.standard_normal((900, 700)).astype(dtype))
             for n in (1, 7, 300) for dtype in (np.float32, np.float64)]
    shared = [x @ w.T for x, w in cases]
    try:
        assert nplora.share_threads_with_numpy(False) is False
        assert nplora.blas_info()["numpy_blas_on_nplora_threads"] is False
        own = [x @ w.T for x, w in cases]
    finally:
        assert nplora.share_threads_with_numpy(True) is True
    for got, want in zip(shared, own):
        np.testing.assert_array_equal(got, want)


def test_numpy_blas_on_nplora_threads_never_runs_its_jobs_one_by_one():
    # OpenBLAS's threaded GEMM jobs wait on each other: run one after another they would spin
    # forever. That must not happen when nplora's pool is busy (another thread's forward) or has
    # fewer threads than OpenBLAS asks for. In a subprocess, so a hang fails on the timeout.
    if not nplora.blas_info()["numpy_blas_on_nplora_threads"]:
        pytest.skip("NumPy's BLAS here has no caller-managed threading (OpenBLAS >= 0.3.27)")
    script = (
        "import threading, numpy as np, nplora\n"
        "from nplora import _core\n"
        "rng = np.random.default_rng(0)\n"
        "cases = [(rng.standard_normal((300, 700)).astype(t), rng.standard_normal((900, 700)).astype(t))\n"
        "         for t in (np.float32, np.float64)]\n"
        "want = [x @ w.T for x, w in cases]\n"
        "layer = nplora.LoraLinear(rng.standard_normal((512, 512)).astype(np.float32), r=4).eval()\n"
        "xs = rng.standard_normal((300, 512)).astype(np.float32)\n"
        "stop = threading.Event()\n"
        "def busy():\n"
        "    while not stop.is_set():\n"
        "        layer(xs)\n"
        "t = threading.Thread(target=busy); t.start()\n"
        "for _ in range(30):\n"
        "    for (x, w), ref in zip(cases, want):\n"
        "        assert np.array_equal(x @ w.T, ref)\n"
        "stop.set(); t.join()\n"
        "_core.set_num_threads(1)  # the pool alone, below OpenBLAS's 2 jobs\n"
        "for (x, w), ref in zip(cases, want):\n"
        "    assert np.array_equal(x @ w.T, ref)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         check=True).stdout.strip()
    assert out == "ok"


def test_numpy_blas_on_nplora_threads_from_two_python_threads_at_once(rng):
    # OpenBLAS gives every call the same per-thread scratch buffers; through the callback, two
    # Python threads' products at once overwrote each other's packed panels (both wrong in ~9 of
    # 10 calls) until the callback ran one call's jobs at a time. A float64 layer's product goes
    # through the same BLAS, so it is one of the two threads.
    if not nplora.blas_info()["numpy_blas_on_nplora_threads"]:
        pytest.skip("NumPy's BLAS here has no caller-managed threading (OpenBLAS >= 0.3.27)")
    import threading

    w = rng.standard_normal((512, 512))
    x = rng.standard_normal((256, 512))
    layer = nplora.LoraLinear(w, r=8, seed=0).eval()  # B = 0: layer(x) is x @ W^T
    want = {"numpy": x @ w, "numpy_t": x @ w.T, "layer": x @ w.T}
    compute = {"numpy": lambda: x @ w, "numpy_t": lambda: x @ w.T, "layer": lambda: layer(x)}
    wrong = {name: 0 for name in want}

    def run(name):
        for _ in range(40):
            wrong[name] += not np.allclose(compute[name](), want[name], rtol=1e-12, atol=1e-9)

    for pair in (("numpy", "numpy_t"), ("layer", "numpy")):
        threads = [threading.Thread(target=run, args=(name,)) for name in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert wrong == {"numpy": 0, "numpy_t": 0, "layer": 0}


def test_sharing_threads_can_be_turned_off_at_import():
    script = "import nplora; print(nplora.blas_info()['numpy_blas_on_nplora_threads'])"
    env = dict(os.environ, NPLORA_SHARE_THREADS="0")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_gemm_with_alpha_zero_reads_neither_operand(rng, dtype, backend):
    # As BLAS: alpha == 0 means C = beta C, even when A or B hold inf or NaN.
    a = rng.standard_normal((70, 600)).astype(dtype)
    b = rng.standard_normal((600, 300)).astype(dtype)
    a[3, 5], b[7, 2] = np.inf, np.nan
    c0 = rng.standard_normal((70, 300)).astype(dtype)
    for beta in (0.0, 0.5):
        c = c0.copy()
        _core.gemm(a, b, c, False, False, 0.0, beta)
        np.testing.assert_array_equal(c, beta * c0)


@pytest.mark.parametrize("r", [1, 5, 16, 17, 32, 64, 65, 100, 600])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_large_batch_forward_and_backward_with_the_lora_term_fused(rng, dtype, backend, r,
                                                                   fan_in_fan_out):
    # Batch 129 takes the packed product; in=1100 spans three k blocks, out=300 two W blocks. The
    # LoRA term rides along with the last k block up to r=512 (float; 256 double), its own beyond.
    n, fan_in, fan_out = 129, 1100, 300
    weight = rng.standard_normal((fan_in, fan_out) if fan_in_fan_out else (fan_out, fan_in)).astype(dtype)
    bias = rng.standard_normal(fan_out).astype(dtype)
    layer = nplora.LoraLinear(weight, bias, r=r, lora_alpha=3, fan_in_fan_out=fan_in_fan_out,
                              init_lora_weights=False, seed=4)
    w = weight.T if fan_in_fan_out else weight
    a, b, s = layer.lora_A.astype(np.float64), layer.lora_B.astype(np.float64), layer.scaling
    x = rng.standard_normal((n, fan_in)).astype(dtype)
    g = rng.standard_normal((n, fan_out)).astype(dtype)
    tol = 2e-4 if dtype == np.float32 else 1e-10

    y_eval = layer.eval()(x)
    want = x @ w.T.astype(np.float64) + bias + s * (x @ a.T) @ b.T
    np.testing.assert_allclose(y_eval, want, rtol=tol, atol=tol * np.abs(want).max())

    layer.train()
    y = layer(x)
    grad_x = layer.backward(g)
    kept = x.astype(np.float64)
    g64 = g.astype(np.float64)
    want_y = x @ w.T.astype(np.float64) + bias + s * (kept @ a.T) @ b.T
    np.testing.assert_allclose(y, want_y, rtol=tol, atol=tol * np.abs(want_y).max())
    gb = g64 @ b
    want_dx = g64 @ w.astype(np.float64) + s * gb @ a
    np.testing.assert_allclose(grad_x, want_dx, rtol=tol, atol=tol * np.abs(want_dx).max())
    want_da, want_db = s * gb.T @ kept, s * g64.T @ (kept @ a.T)
    np.testing.assert_allclose(layer.lora_A_grad, want_da, rtol=tol, atol=tol * np.abs(want_da).max())
    np.testing.assert_allclose(layer.lora_B_grad, want_db, rtol=tol, atol=tol * np.abs(want_db).max())


BACKWARD_ON_EVERY_ISA = """
import numpy as np, nplora
from nplora import _core
rng = np.random.default_rng(5)
worst = 0.0
for r in (3, 8, 16, 24, 40):
    for dtype in (np.float32, np.float64):
        n, fan_in, fan_out = 601, 77, 150  # n past the kernel's 512-row stretch, odd tails
        layer = nplora.LoraLinear(rng.standard_normal((fan_out, fan_in)).astype(dtype), r=r,
                                  init_lora_weights=False, seed=r)
        a, b, s = layer.lora_A.astype(np.float64), layer.lora_B.astype(np.float64), layer.scaling
        x = rng.standard_normal((n, fan_in)).astype(dtype)
        wide = rng.standard_normal((n, fan_out + 3)).astype(dtype)
        g = wide[:, 2:2 + fan_out]  # rows of grad_y a stride apart
        layer(x)
        layer.backward(g)
        layer(x)
        layer.backward(g)  # the gradients accumulate
        g64, x64 = g.astype(np.float64), x.astype(np.float64)
        want_da, want_db = 2 * s * (g64 @ b).T @ x64, 2 * s * g64.T @ (x64 @ a.T)
        tol = 1e-4 if dtype == np.float32 else 1e-11
        for got, want in ((layer.lora_A_grad, want_da), (layer.lora_B_grad, want_db)):
            worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()) / tol)
print(_core.kernel_isa(), worst)
"""


def test_lora_gradients_on_every_instruction_set():
    # The streaming kernels for G B, G^T P and (G B)^T X on each ISA (r of one and two vectors,
    # and wider ones that take the packed product), against NumPy, accumulating over two steps.
    seen = worst_error_on_every_isa(BACKWARD_ON_EVERY_ISA)
    assert all(err < 1.0 for err in seen.values()), seen


MIXED_ON_EVERY_ISA = """
import numpy as np, nplora
from nplora import _core
rng = np.random.default_rng(6)
worst = 0.0
for dtype in (np.float32, np.float64):
    for n in (5, 13, 31, 64):
        fan_in, fan_out = 300, 1001  # outputs split over threads, tails at every tile size
        weight = rng.standard_normal((fan_out, fan_in)).astype(dtype)
        bias = rng.standard_normal(fan_out).astype(dtype)
        ranks = (1, 3, 16, 17, 40, 8, 2, 33, 5)
        config = lambda r: nplora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                             init_lora_weights=False)
        model = nplora.LoraModel({"proj.weight": weight, "proj.bias": bias}, config(ranks[0]), "a0",
                                 seed=0)
        for k, r in enumerate(ranks[1:], 1):
            model.add_adapter(f"a{k}", config(r), seed=k)
        model.eval()
        x = rng.standard_normal((n, fan_in)).astype(dtype)
        ids = rng.integers(-1, len(ranks), n)  # shared adapters, base-only rows, unused adapters
        y = model.forward("proj", x, adapter_ids=ids)
        x64 = x.astype(np.float64)
        want = x64 @ weight.T.astype(np.float64) + bias
        for k in range(len(ranks)):
            layer = model.layers(f"a{k}")["proj"]
            rows = ids == k
            a, b = layer.lora_A.astype(np.float64), layer.lora_B.astype(np.float64)
            want[rows] += layer.scaling * (x64[rows] @ a.T) @ b.T
        tol = 1e-4 if dtype == np.float32 else 1e-11
        worst = max(worst, float(np.abs(y - want).max() / np.abs(want).max()) / tol)
print(_core.kernel_isa(), worst)
"""


def test_mixed_and_small_batches_in_chunks_on_any_thread_count(rng):
    # Outputs go to the threads in chunks taken as they finish (72-240 rows of W here), so one
    # thread computes several apart: each row's B term must follow its thread's chunks across the
    # gaps. Batch 64 of 64 adapters and plain batches of the outer-product and dot-product kernels,
    # against NumPy, on 1 to 5 threads (more threads than cores interleave the chunks anyhow), and
    # bitwise the same whichever thread computed what.
    fan_in, fan_out, n = 4096, 2011, 64
    weight = rng.standard_normal((fan_out, fan_in)).astype(np.float32)
    config = nplora.LoraConfig(r=16, lora_alpha=32, target_modules=["proj"], init_lora_weights=False)
    model = nplora.LoraModel({"proj.weight": weight}, config, "a0", seed=0)
    for k in range(1, n):
        model.add_adapter(f"a{k}", config, seed=k)
    model.eval()
    x = rng.standard_normal((n, fan_in)).astype(np.float32)
    ids = rng.permutation(n)
    ids[5] = -1  # a base-only row
    x64 = x.astype(np.float64)
    want = x64 @ weight.T.astype(np.float64)
    for k in range(n):
        layer = model.layers(f"a{k}")["proj"]
        rows = ids == k
        a, b = layer.lora_A.astype(np.float64), layer.lora_B.astype(np.float64)
        want[rows] += layer.scaling * (x64[rows] @ a.T) @ b.T
    plain = model.layers("a0")["proj"]
    a0, b0 = plain.lora_A.astype(np.float64), plain.lora_B.astype(np.float64)
    before = nplora.get_num_threads()
    first: dict[object, np.ndarray] = {}
    try:
        for threads in (1, 2, 3, 5):
            nplora.set_num_threads(threads)
            for _ in range(3):
                y = model.forward("proj", x, adapter_ids=ids)
                error = np.abs(y - want).max() / np.abs(want).max()
                assert error < 1e-5, (threads, error)
                np.testing.assert_array_equal(y, first.setdefault("mixed", y), err_msg=str(threads))
            for rows in (3, 37):
                got = plain(x[:rows])
                exact = x64[:rows] @ weight.T.astype(np.float64) + plain.scaling * (x64[:rows] @ a0.T) @ b0.T
                error = np.abs(got - exact).max() / np.abs(exact).max()
                assert error < 1e-5, (threads, rows, error)
                np.testing.assert_array_equal(got, first.setdefault(rows, got), err_msg=str(threads))
    finally:
        nplora.set_num_threads(before)


def test_mixed_batches_on_every_instruction_set():
    # The mixed-batch kernel (x A^T, the base product, then the B term per chunk) on each ISA: ranks
    # of 1 to 40 side by side, rows sharing an adapter, base-only rows, against NumPy.
    seen = worst_error_on_every_isa(MIXED_ON_EVERY_ISA)
    assert all(err < 1.0 for err in seen.values()), seen
