"""Property tests: every layer operation on random shapes, dtypes and memory layouts, against NumPy.

Shapes include 1 x 1 layers, r = 1 and r > min(in, out), empty batches and several leading dims;
arrays come C-ordered, Fortran-ordered, strided, with negative strides, read-only, misaligned (a
view into a byte buffer at an odd offset), big-endian, or as nested lists. The reference is
computed in float64 from the values the layer was given, and compared with a tolerance scaled by
the size of the terms summed (so float32 is held to float32's accuracy, not to a fixed number).
Hypothesis shrinks any failure to a minimal case. NPLORA_HYPOTHESIS_EXAMPLES sets the examples
per property (default 150).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nplora
from nplora import _core

EXAMPLES = int(os.environ.get("NPLORA_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EPS = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-14}  # a few ulps per summed term

LAYOUTS = ["C", "F", "strided", "negative", "readonly", "unaligned", "bigendian", "list"]
dtypes = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])
features = st.integers(1, 12) | st.integers(13, 70)  # small, and past the SIMD widths
ranks = st.integers(1, 16)  # often above min(in, out), as PEFT allows
batch_shapes = (st.lists(st.integers(0, 4), max_size=3) | st.lists(st.integers(5, 100), max_size=1)).map(tuple)
# (() is a single vector, a 0 an empty batch; up to 100 rows, past the small-batch kernel)
alphas = st.floats(-16, 16, allow_nan=False, allow_infinity=False).filter(lambda a: a != 0)
seeds = st.integers(0, 2**32 - 1)


def relayout(array: np.ndarray, layout: str) -> np.ndarray | list:
    """The same values in another memory layout."""
    array = np.asarray(array)
    if array.ndim == 0 and layout in ("C", "F", "strided", "negative"):  # (ascontiguousarray: 0-D -> 1-D)
        return array.copy()
    if layout == "C":
        return np.ascontiguousarray(array)
    if layout == "F":
        return np.asfortranarray(array)
    if layout == "strided":
        if array.ndim == 0:
            return array
        wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), array.dtype)
        wide[..., ::2] = array
        return wide[..., ::2]
    if layout == "negative":
        return np.flip(np.ascontiguousarray(np.flip(array)))
    if layout == "readonly":
        copy = array.copy()
        copy.flags.writeable = False
        return copy
    if layout == "unaligned":
        buffer = np.zeros(array.nbytes + array.itemsize, np.uint8)
        view = buffer[1:1 + array.nbytes].view(array.dtype).reshape(array.shape)
        view[...] = array
        assert view.size == 0 or view.itemsize == 1 or not view.flags.aligned
        return view
    if layout == "bigendian":
        return array.astype(array.dtype.newbyteorder(">"))
    if layout == "list":  # (an empty nested list loses the trailing dims: keep the array)
        return array.tolist() if array.size else array
    raise AssertionError(layout)


def values(a: object, dtype: np.dtype = np.dtype(np.float64)) -> np.ndarray:
    return np.array(a, dtype=dtype)


def assert_close(got: np.ndarray, want: np.ndarray, scale: np.ndarray, dtype: np.dtype, terms: int) -> None:
    """|got - want| <= terms * eps * scale, scale being the sum of |products| behind each value."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    # (plus the dtype's smallest normal number: values that small underflow, e.g. a tiny alpha)
    bound = (terms + 2) * (EPS[np.dtype(dtype)] * np.asarray(scale) + np.finfo(dtype).tiny)
    error = np.abs(got - want)
    assert np.all(error <= bound), f"max error {error.max()}, bound {bound.max()}"


def random(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return rng.uniform(-1, 1, shape).astype(dtype)


def make_linear(data: st.DataObject, dtype: np.dtype, weight_layout: str | None = None):
    out_f, in_f, r = data.draw(features, "out"), data.draw(features, "in"), data.draw(ranks, "r")
    fan_in_fan_out, use_bias = data.draw(st.booleans(), "fan_in_fan_out"), data.draw(st.booleans(), "bias")
    rng = np.random.default_rng(data.draw(seeds, "seed"))
    w = random(rng, (in_f, out_f) if fan_in_fan_out else (out_f, in_f), dtype)
    bias = random(rng, (out_f,), dtype) if use_bias else None
    layout = weight_layout or data.draw(st.sampled_from(LAYOUTS), "weight layout")
    given_w = relayout(w.copy(), layout)  # `w` stays the original values
    layer = nplora.LoraLinear(given_w, bias, r=r, lora_alpha=data.draw(alphas, "alpha"),
                              use_rslora=data.draw(st.booleans(), "rslora"), fan_in_fan_out=fan_in_fan_out,
                              seed=0)
    layer.lora_A = random(rng, (r, in_f), dtype)
    layer.lora_B = random(rng, (out_f, r), dtype)
    return layer, given_w, w, bias, rng


def linear_reference(layer: nplora.LoraLinear, w: np.ndarray, bias: np.ndarray | None, x: np.ndarray):
    """(y, |y| scale) in float64 for the layer's math."""
    w_out_in = values(w).T if layer.fan_in_fan_out else values(w)
    a, b, s = values(layer.lora_A), values(layer.lora_B), layer.scaling
    y = x @ w_out_in.T + s * (x @ a.T) @ b.T
    scale = np.abs(x) @ np.abs(w_out_in).T + abs(s) * (np.abs(x) @ np.abs(a).T) @ np.abs(b).T
    if bias is not None:
        y, scale = y + values(bias), scale + np.abs(values(bias))
    return y, scale


@SETTINGS
@given(st.data(), dtypes)
def test_linear_forward(data: st.DataObject, dtype: np.dtype) -> None:
    layer, given_w, w, bias, rng = make_linear(data, dtype)
    dtype = layer.dtype  # a nested list of float32 values makes a float64 layer
    if isinstance(given_w, np.ndarray) and given_w.dtype == dtype and given_w.flags.c_contiguous \
            and given_w.flags.aligned:
        assert layer.weight is given_w  # used in place, not copied
    else:
        assert layer.weight.flags.c_contiguous and layer.weight.flags.aligned
    batch = data.draw(batch_shapes, "batch")
    x_dtype = data.draw(st.sampled_from([dtype, np.float32, np.float64, np.float16, np.int32]), "x dtype")
    x = (rng.integers(-3, 4, batch + (layer.in_features,)) if np.dtype(x_dtype).kind == "i"
         else random(rng, batch + (layer.in_features,), x_dtype))
    x_given = relayout(x, data.draw(st.sampled_from(LAYOUTS), "x layout"))
    layer.train(data.draw(st.booleans(), "training"))
    y = layer(x_given)
    assert y.dtype == dtype and y.shape == batch + (layer.out_features,)
    want, scale = linear_reference(layer, w, bias, values(x, dtype).astype(np.float64))
    assert_close(y, want, scale, dtype, layer.in_features + layer.r)
    out = np.full_like(y, np.nan)
    assert layer(x_given, out=out) is out
    assert np.array_equal(out, y)
    assert np.array_equal(values(given_w), values(w))  # forward never writes the weight


@SETTINGS
@given(st.data(), dtypes)
def test_linear_backward(data: st.DataObject, dtype: np.dtype) -> None:
    layer, _, w, bias, rng = make_linear(data, dtype)
    dtype = layer.dtype
    batch = data.draw(batch_shapes, "batch")
    x = random(rng, batch + (layer.in_features,), dtype)
    g = random(rng, batch + (layer.out_features,), dtype)
    layer.train()
    layer(relayout(x, data.draw(st.sampled_from(LAYOUTS), "x layout")))
    grad_x = layer.backward(relayout(g, data.draw(st.sampled_from(LAYOUTS), "grad layout")))
    x2, g2 = values(x).reshape(-1, layer.in_features), values(g).reshape(-1, layer.out_features)
    w_out_in = values(w).T if layer.fan_in_fan_out else values(w)
    a, b, s = values(layer.lora_A), values(layer.lora_B), layer.scaling
    n = x2.shape[0]
    # dB = s G^T (x A^T), dA = s (G B)^T x, dX = G W + s (G B) A
    assert_close(layer.lora_B_grad, s * g2.T @ (x2 @ a.T), abs(s) * np.abs(g2).T @ (np.abs(x2) @ np.abs(a).T),
                 dtype, n + layer.in_features)
    assert_close(layer.lora_A_grad, s * (g2 @ b).T @ x2, abs(s) * (np.abs(g2) @ np.abs(b)).T @ np.abs(x2),
                 dtype, n + layer.out_features)
    want_x = (g2 @ w_out_in + s * (g2 @ b) @ a).reshape(grad_x.shape)
    scale_x = (np.abs(g2) @ np.abs(w_out_in) + abs(s) * (np.abs(g2) @ np.abs(b)) @ np.abs(a)).reshape(grad_x.shape)
    assert grad_x.dtype == dtype
    assert_close(grad_x, want_x, scale_x, dtype, layer.out_features + layer.r)
    first = layer.lora_A_grad.copy(), layer.lora_B_grad.copy()
    layer(x)
    layer.backward(g)  # gradients accumulate
    assert_close(layer.lora_A_grad, 2 * values(first[0]), 2 * np.abs(values(first[0])), dtype, 4)
    layer.zero_grad()
    assert not layer.lora_A_grad.any() and not layer.lora_B_grad.any()


@SETTINGS
@given(st.data(), dtypes)
def test_linear_merge_unmerge_and_deltas(data: st.DataObject, dtype: np.dtype) -> None:
    layer, given_w, w, bias, rng = make_linear(data, dtype)
    dtype = layer.dtype
    x = random(rng, data.draw(batch_shapes, "batch") + (layer.in_features,), dtype)
    layer.eval()
    before = layer(x)
    a, b, s = values(layer.lora_A), values(layer.lora_B), layer.scaling
    delta = s * b @ a
    delta_scale = abs(s) * np.abs(b) @ np.abs(a)
    if layer.fan_in_fan_out:
        delta, delta_scale = delta.T, delta_scale.T
    assert_close(layer.delta_weight(), delta, delta_scale, dtype, layer.r)
    merged = layer.merged_weight()
    assert_close(merged, values(w) + delta, np.abs(values(w)) + delta_scale, dtype, layer.r)
    if not layer.weight.flags.writeable:
        with pytest.raises(ValueError, match="read-only"):
            layer.merge()
        assert not layer.merged and np.array_equal(values(layer.weight), values(w))
        return
    layer.merge(safe_merge=data.draw(st.booleans(), "safe_merge"))
    assert layer.merged
    assert np.array_equal(layer.weight, merged)  # the in-place merge computes what merged_weight did
    assert_close(layer(x), before, linear_reference(layer, w, bias, values(x))[1] + 2 * np.abs(before),
                 dtype, layer.in_features + layer.r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nplora.LoraWarning)
        layer.merge()  # a second merge changes nothing
    assert np.array_equal(layer.weight, merged)
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight, values(w), np.abs(values(w)) + 2 * delta_scale, dtype, layer.r)
    if layer.weight is not given_w:
        assert np.array_equal(values(given_w), values(w))  # a copied weight: the caller's is untouched


@SETTINGS
@given(st.data(), dtypes)
def test_swap_adapters_is_unmerge_then_merge(data: st.DataObject, dtype: np.dtype) -> None:
    first, _, w, _, rng = make_linear(data, dtype, weight_layout="C")
    second = nplora.LoraLinear(first.weight, fan_in_fan_out=first.fan_in_fan_out, r=data.draw(ranks, "r2"),
                               lora_alpha=data.draw(alphas, "alpha2"), init_lora_weights=False, seed=1)
    first.merge()
    nplora.swap_adapters(first, second)
    assert not first.merged and second.merged
    a, b = values(second.lora_A), values(second.lora_B)
    delta = second.scaling * b @ a
    scale = abs(second.scaling) * np.abs(b) @ np.abs(a) + abs(first.scaling) * (
        np.abs(values(first.lora_B)) @ np.abs(values(first.lora_A)))
    if first.fan_in_fan_out:
        delta, scale = delta.T, scale.T
    assert_close(second.weight, values(w) + delta, np.abs(values(w)) + 2 * scale, dtype, first.r + second.r)


@SETTINGS
@given(st.data(), dtypes)
def test_embedding_forward_backward_merge(data: st.DataObject, dtype: np.dtype) -> None:
    num, dim, r = data.draw(features, "num"), data.draw(features, "dim"), data.draw(ranks, "r")
    rng = np.random.default_rng(data.draw(seeds, "seed"))
    table = random(rng, (num, dim), dtype)
    padding = data.draw(st.none() | st.integers(-num, num - 1), "padding_idx")
    table_given = relayout(table.copy(), data.draw(st.sampled_from(LAYOUTS), "table layout"))
    layer = nplora.LoraEmbedding(table_given, r=r, lora_alpha=data.draw(alphas, "alpha"), padding_idx=padding,
                                 use_rslora=data.draw(st.booleans(), "rslora"), seed=0)
    dtype = layer.dtype
    layer.lora_embedding_A = random(rng, (r, num), dtype)
    layer.lora_embedding_B = random(rng, (dim, r), dtype)
    ids_shape = data.draw(batch_shapes, "ids shape")
    ids = rng.integers(0, num, ids_shape)
    ids_dtype = data.draw(st.sampled_from([np.int64, np.int32, np.uint8, np.int16]), "ids dtype")
    ids_given = relayout(ids.astype(ids_dtype), data.draw(st.sampled_from(LAYOUTS), "ids layout"))
    a, b, s = values(layer.lora_embedding_A), values(layer.lora_embedding_B), layer.scaling
    want = values(table)[ids] + s * a.T[ids] @ b.T
    scale = np.abs(values(table))[ids] + abs(s) * np.abs(a.T[ids]) @ np.abs(b.T)

    layer.eval()
    assert_close(layer(ids_given), want, scale, dtype, r)
    layer.train()
    out = layer(ids_given)
    assert out.dtype == dtype and out.shape == ids_shape + (dim,)
    assert_close(out, want, scale, dtype, r)
    g = random(rng, ids_shape + (dim,), dtype)
    layer.backward(relayout(g, data.draw(st.sampled_from(LAYOUTS), "grad layout")))
    flat_ids, g2 = ids.reshape(-1), values(g).reshape(-1, dim)
    grad_a = np.zeros((r, num))
    np.add.at(grad_a.T, flat_ids, s * g2 @ b)  # dA^T[ids] += s G B
    if layer.padding_idx is not None:
        grad_a[:, layer.padding_idx] = 0
    grad_b = s * g2.T @ a.T[flat_ids]
    terms = flat_ids.size + dim
    scale_a = np.zeros((r, num))
    np.add.at(scale_a.T, flat_ids, abs(s) * np.abs(g2) @ np.abs(b))
    assert_close(layer.lora_embedding_A_grad, grad_a, scale_a, dtype, terms)
    assert_close(layer.lora_embedding_B_grad, grad_b, abs(s) * np.abs(g2).T @ np.abs(a.T[flat_ids]), dtype, terms)

    delta, delta_scale = (s * b @ a).T, (abs(s) * np.abs(b) @ np.abs(a)).T
    assert_close(layer.delta_weight(), delta, delta_scale, dtype, r)
    if not layer.weight.flags.writeable:
        with pytest.raises(ValueError, match="read-only"):
            layer.merge()
        return
    layer.merge()
    assert_close(layer.weight, values(table) + delta, np.abs(values(table)) + delta_scale, dtype, r)
    layer.eval()
    assert_close(layer(ids_given), want, scale + delta_scale.max(), dtype, r + 2)
    layer.unmerge()
    assert_close(layer.weight, values(table), np.abs(values(table)) + 2 * delta_scale, dtype, r)


def adamw_reference(p, g, m, v, step, lr, b1, b2, eps, wd):
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - b2**step) + eps
    return p - lr / (1 - b1**step) * m / denom, m, v


@SETTINGS
@given(st.data(), dtypes)
def test_optimizer_steps_match_the_torch_rules(data: st.DataObject, dtype: np.dtype) -> None:
    layer, _, _, _, rng = make_linear(data, dtype, weight_layout="C")
    lr = data.draw(st.floats(1e-4, 1e-1), "lr")
    wd = data.draw(st.floats(0, 0.1), "weight_decay")
    if data.draw(st.booleans(), "adamw"):
        opt = nplora.AdamW(layer, lr=lr, weight_decay=wd)
        state = [(values(p), np.zeros(p.shape), np.zeros(p.shape)) for _, p in layer.named_parameters()]
        for step in (1, 2):
            layer.lora_A_grad = random(rng, layer.lora_A.shape, dtype)
            layer.lora_B_grad = random(rng, layer.lora_B.shape, dtype)
            grads = [values(g) for _, g in layer.named_grads()]
            opt.step()
            state = [adamw_reference(p, g, m, v, step, lr, 0.9, 0.999, 1e-8, wd)
                     for (p, m, v), g in zip(state, grads)]
            for (_, got), (want, _, _) in zip(layer.named_parameters(), state):
                np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32 else 1e-10,
                                           atol=1e-5 if dtype == np.float32 else 1e-12)
    else:
        momentum = data.draw(st.sampled_from([0.0, 0.9]), "momentum")
        opt = nplora.SGD(layer, lr=lr, momentum=momentum, weight_decay=wd)
        params = [values(p) for _, p in layer.named_parameters()]
        buffers = [None, None]
        for _ in (1, 2):
            layer.lora_A_grad = random(rng, layer.lora_A.shape, dtype)
            layer.lora_B_grad = random(rng, layer.lora_B.shape, dtype)
            opt.step()
            for i, (_, g) in enumerate(layer.named_grads()):
                d = values(g) + wd * params[i]
                if momentum:
                    buffers[i] = d if buffers[i] is None else momentum * buffers[i] + d
                    d = buffers[i]
                params[i] = params[i] - lr * d
            for (_, got), want in zip(layer.named_parameters(), params):
                np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                           atol=1e-6 if dtype == np.float32 else 1e-13)


@SETTINGS
@given(st.data(), dtypes)
def test_mixed_batch_rows_match_their_own_adapter(data: st.DataObject, dtype: np.dtype) -> None:
    out_f, in_f = data.draw(features, "out"), data.draw(features, "in")
    rng = np.random.default_rng(data.draw(seeds, "seed"))
    weights = {"m.proj.weight": random(rng, (out_f, in_f), dtype)}
    model = nplora.LoraModel(weights, nplora.LoraConfig(r=data.draw(ranks, "r0"), target_modules=["proj"],
                                                          init_lora_weights=False), "a", seed=1)
    model.add_adapter("b", nplora.LoraConfig(r=data.draw(ranks, "r1"), lora_alpha=data.draw(alphas, "alpha"),
                                             target_modules=["proj"], init_lora_weights=False), seed=2)
    model.eval()
    batch = data.draw(batch_shapes, "batch")
    x = random(rng, batch + (in_f,), dtype)
    ids = rng.integers(-1, 2, batch)
    y = model.forward("m.proj", relayout(x, data.draw(st.sampled_from(LAYOUTS), "x layout")), adapter_ids=ids)
    layers = [model.layers(name)["m.proj"] for name in ("a", "b")]
    w = values(weights["m.proj.weight"])
    x64 = values(x)
    want, scale = x64 @ w.T, np.abs(x64) @ np.abs(w).T
    for k, layer in enumerate(layers):
        a, b, s = values(layer.lora_A), values(layer.lora_B), layer.scaling
        rows = (ids == k)[..., None]
        want = want + rows * (s * (x64 @ a.T) @ b.T)
        scale = scale + rows * (abs(s) * (np.abs(x64) @ np.abs(a).T) @ np.abs(b).T)
    assert_close(y, want, scale, dtype, in_f + 16)


# ----------------------------------------------------------------------------- misaligned arrays
def test_misaligned_arrays_never_reach_the_core() -> None:
    # Reading a float through a misaligned pointer is undefined behaviour (UBSan reports it): the
    # Python layer copies such arrays, and the bindings refuse them.
    x = relayout(np.ones((3, 4), np.float32), "unaligned")
    w = relayout(np.ones((2, 4), np.float32), "unaligned")
    layer = nplora.LoraLinear(w, relayout(np.ones(2, np.float32), "unaligned"), r=1)
    assert layer.weight.flags.aligned and layer.bias.flags.aligned and layer.weight is not w
    assert np.array_equal(layer.eval()(x), layer(np.ones((3, 4), np.float32)))
    core = _core.LoraLinear_float32(np.ones((2, 4), np.float32), None, False, 1, 1.0, 0.0, False, 0, 0)
    with pytest.raises(ValueError, match="x is not aligned"):
        core.forward(x, np.zeros((3, 2), np.float32), False)
    with pytest.raises(ValueError, match="aligned"):
        layer(np.ones((3, 4), np.float32), out=relayout(np.zeros((3, 2), np.float32), "unaligned"))
    emb = nplora.LoraEmbedding(np.ones((5, 2)), r=1)
    ids = relayout(np.array([1, 4, 0]), "unaligned")
    assert np.array_equal(emb(ids), emb(np.array([1, 4, 0])))
