"""LoraLinear against a plain NumPy reference, finite differences, and PEFT's semantics."""

from __future__ import annotations

import numpy as np
import pytest

import nplora


def make_layer(rng, dtype, in_features=7, out_features=5, r=3, *, bias=True, fan_in_fan_out=False,
               **kwargs):
    shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
    weight = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(out_features).astype(dtype) if bias else None
    kwargs.setdefault("init_lora_weights", False)  # a non-zero update, so the branch is exercised
    kwargs.setdefault("seed", 0)
    layer = nplora.LoraLinear(weight, b, r=r, lora_alpha=6, fan_in_fan_out=fan_in_fan_out, **kwargs)
    return layer, weight, b


def reference_forward(layer, x, weight, bias):
    w = weight.T if layer.fan_in_fan_out else weight
    y = x @ w.T + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    return y if bias is None else y + bias


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(4,), (2, 3), (), (0,)])
def test_forward_matches_numpy(rng, dtype, tol, backend, fan_in_fan_out, bias, batch_shape):
    layer, weight, b = make_layer(rng, dtype, bias=bias, fan_in_fan_out=fan_in_fan_out)
    x = rng.standard_normal(batch_shape + (7,)).astype(dtype)
    y = layer(x)
    assert y.shape == batch_shape + (5,) and y.dtype == dtype
    np.testing.assert_allclose(y, reference_forward(layer, x, weight, b), **tol)


def test_forward_large_matches_numpy(rng, dtype, backend):
    # Big enough for the threaded and blocked paths of both backends.
    layer, weight, b = make_layer(rng, dtype, in_features=300, out_features=257, r=16)
    x = rng.standard_normal((129, 300)).astype(dtype)
    rtol = 1e-4 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(layer(x), reference_forward(layer, x, weight, b), rtol=rtol, atol=rtol)


def test_forward_with_few_input_features_matches_numpy(rng, dtype, backend):
    # in + r <= 64: the LoRA term rides in the product's one k block, W blocks as wide as y's rows.
    layer, weight, b = make_layer(rng, dtype, in_features=40, out_features=1300, r=8)
    x = rng.standard_normal((150, 40)).astype(dtype)
    rtol = 1e-4 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(layer(x), reference_forward(layer, x, weight, b), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("layout", ["fortran", "strided", "negative", "readonly"])
def test_any_input_layout_gives_the_right_answer(rng, dtype, tol, layout):
    layer, weight, b = make_layer(rng, dtype)
    base = rng.standard_normal((6, 14)).astype(dtype)
    x = {"fortran": np.asfortranarray(base[:, :7]), "strided": base[:, ::2],
         "negative": base[::-1, 7:], "readonly": base[:, :7].copy()}[layout]
    if layout == "readonly":
        x.flags.writeable = False
    np.testing.assert_allclose(layer(x), reference_forward(layer, np.array(x), weight, b), **tol)


def test_weight_is_shared_when_contiguous_and_copied_otherwise(rng, dtype, tol):
    weight = rng.standard_normal((5, 7)).astype(dtype)
    shared = nplora.LoraLinear(weight, r=2)
    assert shared.weight is weight
    fortran = np.asfortranarray(weight)
    copied = nplora.LoraLinear(fortran, r=2, seed=0, init_lora_weights=False)
    assert not np.shares_memory(copied.weight, fortran)
    x = rng.standard_normal((3, 7)).astype(dtype)
    np.testing.assert_allclose(copied(x), reference_forward(copied, x, weight, None), **tol)


def test_parameters_share_memory_with_the_layer(rng, dtype, tol):
    layer, weight, b = make_layer(rng, dtype)
    a, bb = layer.lora_A, layer.lora_B
    assert a.shape == (3, 7) and bb.shape == (5, 3) and a.dtype == dtype
    assert np.shares_memory(a, layer.lora_A) and np.shares_memory(bb, layer.lora_B)
    assert np.shares_memory(layer.lora_A_grad, layer.lora_A_grad)
    a[...] = 0.5  # an in-place edit is seen by the C++ layer
    x = rng.standard_normal((2, 7)).astype(dtype)
    expected = x @ weight.T + b + layer.scaling * (x @ np.full((3, 7), 0.5, dtype).T) @ bb.T
    np.testing.assert_allclose(layer(x), expected, **tol)


def test_assigning_a_parameter_copies_into_shared_memory(rng, dtype):
    layer, _, _ = make_layer(rng, dtype)
    view = layer.lora_B
    new = rng.standard_normal((5, 3))
    layer.lora_B = new  # float64 into either dtype: cast, then copied in place
    np.testing.assert_allclose(view, new.astype(dtype))
    with pytest.raises(ValueError, match=r"lora_B must have shape \(5, 3\), got \(3, 5\)"):
        layer.lora_B = new.T
    with pytest.raises(ValueError, match=r"lora_A must have shape \(3, 7\), got \(3,\)"):
        layer.lora_A = np.zeros(3)
    # A view of the parameter itself, as NumPy's a[...] = a[::-1] gets it right.
    flipped = layer.lora_A[::-1].copy()
    layer.lora_A = layer.lora_A[::-1]
    np.testing.assert_array_equal(layer.lora_A, flipped)
    square, _, _ = make_layer(rng, dtype, in_features=4, out_features=4, r=4)
    transposed = square.lora_B.T.copy()
    square.lora_B = square.lora_B.T
    np.testing.assert_array_equal(square.lora_B, transposed)


def finite_difference(f, array, h):
    grad = np.zeros_like(array)
    flat, out = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + h
        up = f()
        flat[i] = keep - h
        down = f()
        flat[i] = keep
        out[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_gradients_match_finite_differences(rng, backend, fan_in_fan_out, use_rslora):
    layer, weight, b = make_layer(rng, np.float64, fan_in_fan_out=fan_in_fan_out,
                                  use_rslora=use_rslora)
    x = rng.standard_normal((2, 3, 7))
    probe = rng.standard_normal((2, 3, 5))  # loss = sum(probe * y)
    layer.zero_grad()
    layer.train()
    layer(x)
    grad_x = layer.backward(probe)

    def loss():
        layer.eval()
        value = float(np.sum(probe * layer(x)))
        layer.train()
        return value

    h = 1e-6
    np.testing.assert_allclose(layer.lora_A_grad, finite_difference(loss, layer.lora_A, h), atol=1e-7)
    np.testing.assert_allclose(layer.lora_B_grad, finite_difference(loss, layer.lora_B, h), atol=1e-7)
    np.testing.assert_allclose(grad_x, finite_difference(loss, x, h), atol=1e-7)


def test_gradients_match_numpy_reference_and_accumulate(rng, dtype, tol, backend):
    layer, weight, b = make_layer(rng, dtype, in_features=40, out_features=30, r=4)
    x = rng.standard_normal((9, 40)).astype(dtype)
    g = rng.standard_normal((9, 30)).astype(dtype)
    layer(x)
    grad_x = layer.backward(g)
    s, A, B = layer.scaling, layer.lora_A, layer.lora_B
    rtol = 1e-4 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(layer.lora_B_grad, s * g.T @ (x @ A.T), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(layer.lora_A_grad, s * (g @ B).T @ x, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(grad_x, g @ weight + s * (g @ B) @ A, rtol=rtol, atol=rtol)
    first = layer.lora_A_grad.copy()
    with pytest.raises(RuntimeError, match="each forward serves one backward"):
        layer.backward(g)  # used to add the same gradient again, silently
    np.testing.assert_array_equal(layer.lora_A_grad, first)
    layer(x)
    layer.backward(g)  # another forward and backward: the gradients accumulate
    np.testing.assert_allclose(layer.lora_A_grad, 2 * first, rtol=rtol, atol=rtol)
    # Two backwards on one forward when asked for (PyTorch's retain_graph): they add up to one
    # backward of the sum, as backward is linear in grad_y.
    layer.zero_grad()
    layer(x)
    h = rng.standard_normal((9, 30)).astype(dtype)
    gx_g = layer.backward(g, retain_graph=True)
    gx_h = layer.backward(h)
    np.testing.assert_allclose(gx_g + gx_h, g @ weight + s * (g @ B) @ A + h @ weight + s * (h @ B) @ A,
                               rtol=rtol, atol=rtol)
    np.testing.assert_allclose(layer.lora_A_grad, s * ((g + h) @ B).T @ x, rtol=rtol, atol=rtol)
    with pytest.raises(RuntimeError, match="unless retain_graph=True"):
        layer.backward(g)
    layer.zero_grad()
    assert not layer.lora_A_grad.any() and not layer.lora_B_grad.any()


def test_dropout_gradient_uses_the_forward_mask(rng):
    # With W = 0 and A = B = I the output is scaling * dropout(x): the mask can be read off it.
    n = 6
    layer = nplora.LoraLinear(np.zeros((n, n)), r=n, lora_alpha=n, lora_dropout=0.5, seed=3)
    layer.lora_A = np.eye(n)
    layer.lora_B = np.eye(n)
    x = np.ones((50, n))
    y = layer(x)
    kept = y != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(y[kept], 2.0)  # 1 / (1 - p) on the kept inputs
    g = rng.standard_normal((50, n))
    grad_x = layer.backward(g)
    np.testing.assert_allclose(grad_x, np.where(kept, 2.0 * g, 0.0), atol=1e-12)
    np.testing.assert_allclose(layer.lora_A_grad, g.T @ (x * np.where(kept, 2.0, 0.0)), atol=1e-12)


def test_dropout_keeps_nan_where_it_drops(rng):
    # torch's dropout multiplies by its mask, so NaN * 0 stays NaN in the LoRA branch (and in the
    # gradients); writing 0 where dropped hid it.
    layer, _, _ = make_layer(rng, np.float64, lora_dropout=0.999)
    x = rng.standard_normal((4, 7))
    x[1, 2] = np.nan
    layer(x)
    layer.backward(np.ones((4, 5)))
    assert np.isnan(layer.lora_A_grad).any() and np.isnan(layer.lora_B_grad).any()


def test_dropout_statistics_and_eval_mode(rng):
    p = 0.3
    layer = nplora.LoraLinear(np.zeros((4, 4)), r=4, lora_alpha=4, lora_dropout=p, seed=1)
    layer.lora_A = np.eye(4)
    layer.lora_B = np.eye(4)
    y = layer(np.ones((20000, 4)))
    assert abs((y == 0).mean() - p) < 0.01  # the drop rate
    assert abs(y.mean() - 1.0) < 0.02  # inverted dropout keeps the expectation
    layer.eval()
    np.testing.assert_array_equal(layer(np.ones((3, 4))), np.ones((3, 4)))


def test_seed_reproducibility(rng):
    weight = rng.standard_normal((6, 5))
    kwargs = dict(r=2, lora_dropout=0.5, init_lora_weights=False)
    one = nplora.LoraLinear(weight, seed=42, **kwargs)
    two = nplora.LoraLinear(weight, seed=42, **kwargs)
    other = nplora.LoraLinear(weight, seed=43, **kwargs)
    np.testing.assert_array_equal(one.lora_A, two.lora_A)
    np.testing.assert_array_equal(one.lora_B, two.lora_B)
    assert not np.array_equal(one.lora_A, other.lora_A)
    x = np.ones((8, 5))
    np.testing.assert_array_equal(one(x), two(x))  # same dropout stream
    assert not np.array_equal(one(x), two(x) * 0 + one(x) * 0 + other(x))


def test_initialisation_follows_peft(dtype):
    in_features, out_features, r = 400, 300, 16
    weight = np.zeros((out_features, in_features), dtype)
    default = nplora.LoraLinear(weight, r=r, seed=1)
    bound = 1 / np.sqrt(in_features)
    assert np.abs(default.lora_A).max() <= bound
    assert np.abs(default.lora_A).max() > 0.95 * bound  # uniform over the whole interval
    assert not default.lora_B.any()
    gaussian = nplora.LoraLinear(weight, r=r, seed=1, init_lora_weights="gaussian")
    assert abs(gaussian.lora_A.std() - 1 / r) < 0.05 / r
    assert not gaussian.lora_B.any()
    random = nplora.LoraLinear(weight, r=r, seed=1, init_lora_weights=False)
    assert np.abs(random.lora_B).max() <= 1 / np.sqrt(r) and random.lora_B.any()
    with pytest.raises(NotImplementedError, match="pissa"):
        nplora.LoraLinear(weight, r=r, init_lora_weights="pissa")


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling(use_rslora):
    layer = nplora.LoraLinear(np.zeros((3, 3)), r=4, lora_alpha=8, use_rslora=use_rslora)
    assert layer.scaling == (8 / 2 if use_rslora else 8 / 4)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_unmerge_round_trip(rng, dtype, tol, backend, fan_in_fan_out):
    layer, weight, b = make_layer(rng, dtype, fan_in_fan_out=fan_in_fan_out)
    original = weight.copy()
    x = rng.standard_normal((4, 7)).astype(dtype)
    layer.eval()
    before = layer(x)
    delta = layer.delta_weight()
    expected_delta = layer.scaling * layer.lora_B @ layer.lora_A
    np.testing.assert_allclose(delta, expected_delta.T if fan_in_fan_out else expected_delta, **tol)
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(weight, original + delta, **tol)  # in place, in the caller's array
    np.testing.assert_allclose(layer(x), before, rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)
    with pytest.warns(nplora.LoraWarning, match="Already merged"):
        layer.merge()
    np.testing.assert_allclose(weight, original + delta, **tol)  # the second merge changed nothing
    layer.unmerge()
    assert not layer.merged
    np.testing.assert_allclose(weight, original, rtol=1e-5 if dtype == np.float32 else 1e-13,
                               atol=1e-5 if dtype == np.float32 else 1e-13)
    with pytest.warns(nplora.LoraWarning, match="Already unmerged"):
        layer.unmerge()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_of_a_large_layer_matches_numpy(rng, dtype, backend, fan_in_fan_out):
    # Rows past one wide W block (4096 floats at r = 16), many row chunks on the threads, ragged edges.
    layer, weight, _ = make_layer(rng, dtype, in_features=4500, out_features=1030, r=16, bias=False,
                                  fan_in_fan_out=fan_in_fan_out)
    original = weight.copy()
    delta = layer.scaling * layer.lora_B.astype(np.float64) @ layer.lora_A.astype(np.float64)
    layer.merge()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(weight, original + (delta.T if fan_in_fan_out else delta), rtol=tol,
                               atol=tol)
    layer.unmerge()
    np.testing.assert_allclose(weight, original, rtol=tol, atol=tol)


def test_backward_after_merged_forward_raises(rng):
    layer, _, _ = make_layer(rng, np.float64)
    layer.merge()
    layer(np.ones((2, 7)))
    with pytest.raises(RuntimeError, match="merged"):
        layer.backward(np.ones((2, 5)))


def test_merge_between_forward_and_backward_drops_what_the_forward_kept(rng):
    # The forward ran on W; a backward after merge() would read W + s B A and add the LoRA term
    # again (grad_x off by up to ~1.5 here before merge() dropped the kept activations).
    for change in ("merge", "unmerge", "swap"):
        layer, weight, _ = make_layer(rng, np.float64)
        other = nplora.LoraLinear(weight, r=2, init_lora_weights=False, seed=5)
        if change == "unmerge":
            layer.merge()
            layer.adapter_enabled = True
        x = rng.standard_normal((3, 7))
        if change == "swap":
            layer.merge()
            other(x)
            nplora.swap_adapters(layer, other)
            with pytest.raises(RuntimeError, match="merge, unmerge and swap"):
                other.backward(np.ones((3, 5)))
            continue
        layer(x)
        getattr(layer, change)()
        with pytest.raises(RuntimeError, match="merge, unmerge and swap"):
            layer.backward(np.ones((3, 5)))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("n", [3, 100])  # the small-batch kernel and the packed product
def test_disabled_adapter_merged_afterwards_still_gives_the_base_layer(rng, dtype, tol,
                                                                        fan_in_fan_out, n):
    layer, weight, bias = make_layer(rng, dtype, fan_in_fan_out=fan_in_fan_out)
    base = weight.copy()
    layer.adapter_enabled = False
    layer.merge()  # allowed (PEFT merges too), but the layer is still disabled
    assert layer.merged
    x = rng.standard_normal((n, 7)).astype(dtype)
    want = x @ (base if fan_in_fan_out else base.T) + bias
    for training in (False, True):
        layer.train(training)
        np.testing.assert_allclose(layer(x), want, **tol)
    with pytest.raises(RuntimeError, match="disabled"):
        layer.backward(np.ones((n, 5), dtype=dtype))
    layer.adapter_enabled = True  # merged, enabled: W + s B A
    np.testing.assert_allclose(layer(x), reference_forward(layer, x, base, bias), **tol)


def test_backward_without_training_forward_raises(rng):
    layer, _, _ = make_layer(rng, np.float64)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones((2, 5)))
    layer.eval()
    layer(np.ones((2, 7)))
    with pytest.raises(RuntimeError, match="training mode"):
        layer.backward(np.ones((2, 5)))


def test_read_only_weight_serves_forward_but_refuses_merge(rng, dtype, tol):
    weight = rng.standard_normal((5, 7)).astype(dtype)
    weight.flags.writeable = False
    layer = nplora.LoraLinear(weight, r=2, seed=0, init_lora_weights=False)
    assert layer.weight is weight
    x = rng.standard_normal((3, 7)).astype(dtype)
    np.testing.assert_allclose(layer(x), reference_forward(layer, x, weight, None), **tol)
    with pytest.raises(ValueError, match="read-only"):
        layer.merge()
    assert not layer.merged


def test_out_argument_and_dtype_rule(rng, dtype, tol):
    layer, weight, b = make_layer(rng, dtype)
    x64 = rng.standard_normal((4, 7))
    out = np.empty((4, 5), dtype)
    result = layer(x64, out=out)
    assert result is out
    np.testing.assert_allclose(out, reference_forward(layer, x64.astype(dtype), weight, b), **tol)
    assert layer([[1, 2, 3, 4, 5, 6, 7]]).dtype == dtype  # integers and lists are cast too
    with pytest.raises(ValueError, match=r"out must have shape \(4, 5\), got \(4, 6\)"):
        layer(x64, out=np.empty((4, 6), dtype))
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(TypeError, match="out must have dtype"):
        layer(x64, out=np.empty((4, 5), other))
    with pytest.raises(TypeError, match="complex"):
        layer(x64 + 1j)


def test_stats_and_named_parameters(rng):
    layer, _, _ = make_layer(rng, np.float32)
    assert layer.stats() == {"trainable_params": 3 * 7 + 5 * 3, "frozen_params": 5 * 7 + 5,
                             "total_params": 3 * 7 + 5 * 3 + 5 * 7 + 5}
    names = [name for name, _ in layer.named_parameters()]
    assert names == ["lora_A", "lora_B"]
    for (_, p), (_, g) in zip(layer.named_parameters(), layer.named_grads()):
        assert p.shape == g.shape


def test_results_identical_for_one_and_two_threads(rng, backend):
    layer, _, _ = make_layer(rng, np.float64, in_features=200, out_features=150, r=8)
    x = rng.standard_normal((70, 200))
    g = rng.standard_normal((70, 150))
    results = []
    for threads in (1, 2):
        nplora.set_num_threads(threads)
        layer.zero_grad()
        y = layer(x)
        gx = layer.backward(g)
        results.append((y, gx, layer.lora_A_grad.copy()))
    nplora.set_num_threads(2)
    for first, second in zip(*results):
        np.testing.assert_allclose(first, second, rtol=1e-12, atol=1e-12)


def test_assigning_a_parameter_drops_the_kept_forward_and_refuses_non_real_values(rng):
    # A backward after `layer.lora_A = new` mixed the old A (in the kept x A^T) with the new one:
    # PyTorch refuses a backward after such an in-place change. The cast of a complex array
    # dropped its imaginary part with only NumPy's warning; strings gave pybind's message.
    layer, _, _ = make_layer(rng, np.float64)
    for name in ("lora_A", "lora_B"):
        layer(rng.standard_normal((3, 7)))
        setattr(layer, name, getattr(layer, name) * 2)
        with pytest.raises(RuntimeError, match="needs a forward"):
            layer.backward(np.ones((3, 5)))
    layer(rng.standard_normal((3, 7)))
    layer.lora_A_grad = np.zeros_like(layer.lora_A_grad)  # a gradient: the forward still serves
    layer.backward(np.ones((3, 5)))
    for bad in (layer.lora_A + 1j, np.full(layer.lora_A.shape, "1.5"), "abc", None,
                np.array(layer.lora_A, dtype=object)):
        with pytest.raises(TypeError, match="lora_A must be real numbers, got dtype"):
            layer.lora_A = bad
    emb = nplora.LoraEmbedding(np.ones((6, 4)), r=2)
    with pytest.raises(TypeError, match="lora_embedding_B must be real numbers, got dtype complex128"):
        emb.lora_embedding_B = emb.lora_embedding_B + 1j
