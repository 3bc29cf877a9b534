"""Bad input gets a clear exception naming the shape, dtype or option: never a crash."""

from __future__ import annotations

import os

import numpy as np
import pytest

import nplora


@pytest.mark.parametrize("kwargs,error,match", [
    ({"r": 0}, ValueError, "r must be >= 1, got 0"),
    ({"r": -3}, ValueError, "r must be >= 1"),
    ({"r": 2.5}, TypeError, "r must be an int"),
    ({"r": True}, TypeError, "r must be an int"),
    ({"lora_alpha": float("nan")}, ValueError, "lora_alpha must be finite"),
    ({"lora_alpha": float("inf")}, ValueError, "lora_alpha must be finite"),
    ({"lora_alpha": "8"}, TypeError, "lora_alpha must be a real number"),
    ({"lora_dropout": 1.0}, ValueError, r"lora_dropout must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, ValueError, "lora_dropout"),
    ({"seed": -1}, ValueError, "seed"),
    ({"init_lora_weights": "nope"}, NotImplementedError, "nope"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        nplora.LoraLinear(np.zeros((3, 4)), **kwargs)
    if "lora_dropout" not in kwargs:
        with pytest.raises(error, match=match):
            nplora.LoraEmbedding(np.zeros((3, 4)), **kwargs)


def test_a_rank_too_large_to_exist_is_a_value_error():
    # Beyond int64 it was pybind's "incompatible constructor arguments"; below it, std::bad_alloc.
    for layer in (nplora.LoraLinear, nplora.LoraEmbedding):
        for r in (2**62, 2**63, 10**30):
            with pytest.raises(ValueError, match=rf"r={r} is too large: lora_A \({r}, \d\) and lora_B"):
                layer(np.zeros((3, 4), np.float32), r=r)


@pytest.mark.skipif("ASAN_OPTIONS" in os.environ,
                    reason="ASan reports each allocation it refuses, which .ci/sanitize counts as a failure")
def test_a_rank_too_large_for_memory_names_its_sizes():
    with pytest.raises(MemoryError, match=r"cannot allocate r=1099511627776: lora_A \(1099511627776, 4\) "
                                          r"and lora_B \(3, 1099511627776\) of float32 with their "
                                          r"gradients need 5.73e\+04 GiB"):
        nplora.LoraLinear(np.zeros((3, 4), np.float32), r=2**40)
    with pytest.raises(MemoryError, match=r"lora_A \(1099511627776, 3\) and lora_B \(4, 1099511627776\) "
                                          r"of float64"):
        nplora.LoraEmbedding(np.zeros((3, 4)), r=2**40)


def test_a_scaling_beyond_the_layers_dtype_is_refused():
    # Finite in float64, infinite in float32: every float32 output was NaN, even with B = 0.
    for layer in (nplora.LoraLinear, nplora.LoraEmbedding):
        with pytest.raises(ValueError, match="lora_alpha=1e\\+39 gives a scaling of 5e\\+38, beyond float32"):
            layer(np.zeros((3, 4), np.float32), r=2, lora_alpha=1e39)
        assert layer(np.zeros((3, 4)), r=2, lora_alpha=1e39).scaling == 5e38


@pytest.mark.parametrize("weight,error,match", [
    (np.zeros(4), ValueError, r"weight must be 2-D, got shape \(4,\)"),
    (np.zeros((2, 3, 4)), ValueError, r"weight must be 2-D, got shape \(2, 3, 4\)"),
    (np.zeros((0, 4)), ValueError, "must not be empty"),
    (np.zeros((3, 4), np.float16), TypeError, "weight must be float32 or float64, got float16"),
    (np.zeros((3, 4), np.int64), TypeError, "got int64"),
    (np.zeros((3, 4), complex), TypeError, "complex128"),
])
def test_bad_weights(weight, error, match):
    with pytest.raises(error, match=match):
        nplora.LoraLinear(weight)
    with pytest.raises(error, match=match):
        nplora.LoraEmbedding(weight)


def test_bad_bias():
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\), got \(4,\)"):
        nplora.LoraLinear(np.zeros((3, 4)), np.zeros(4))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(3,\)"):
        nplora.LoraLinear(np.zeros((3, 4)), np.zeros(3), fan_in_fan_out=True)
    with pytest.raises(TypeError, match="bias must be real"):
        nplora.LoraLinear(np.zeros((3, 4)), np.array(["a", "b", "c"]))


def test_bad_inputs():
    layer = nplora.LoraLinear(np.zeros((3, 4), np.float32), r=2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\), got \(2, 5\)"):
        layer(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\), got \(\)"):
        layer(np.float32(1.0))
    with pytest.raises(TypeError, match="x must be real numbers, got dtype <U1"):
        layer(np.array(["a", "b", "c", "d"]))
    layer(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"grad_y must have shape \(2, 3\), got \(5, 3\)"):
        layer.backward(np.zeros((5, 3)))
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        nplora.LoraLinear(np.zeros((4, 4), np.float32), r=1)(x, out=x)


def test_core_module_rejects_wrong_arrays_without_copying():
    # The bindings never convert silently: a float64 output for a float32 layer is a TypeError.
    from nplora import _core

    core = _core.LoraLinear_float32(np.zeros((3, 4), np.float32), None, False, 2, 2.0, 0.0, False, 0, 0)
    with pytest.raises(TypeError):
        core.forward(np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float64), False)
    with pytest.raises(ValueError, match=r"y must have shape \(2, 3\), got \(2, 2\)"):
        core.forward(np.zeros((2, 4), np.float32), np.zeros((2, 2), np.float32), False)
    with pytest.raises(ValueError, match="contiguous rows"):
        core.forward(np.zeros((2, 8), np.float32)[:, ::2], np.zeros((2, 3), np.float32), False)
    read_only = np.zeros((2, 3), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        core.forward(np.zeros((2, 4), np.float32), read_only, False)


def test_threads_setting():
    with pytest.raises(ValueError, match="n must be >= 1"):
        nplora.set_num_threads(0)
    with pytest.raises(TypeError):
        nplora.set_num_threads(1.5)
    with pytest.raises(ValueError, match="n must be <= 4096, got 2147483648"):
        nplora.set_num_threads(2**31)  # was pybind's TypeError about incompatible arguments
    before = nplora.get_num_threads()
    nplora.set_num_threads(np.int64(1))
    assert nplora.get_num_threads() == 1
    nplora.set_num_threads(before)


def test_out_may_not_overlap_the_layers_own_arrays():
    # layer(x, out=W[:b]) wrote the output into the frozen weight while the kernel read it (the
    # output off by up to 6e5, the weight destroyed); the bias, A, B and the table likewise.
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((8, 8)), rng.standard_normal(8)
    layer = nplora.LoraLinear(weight, bias, r=2, init_lora_weights=False, seed=0)
    before = [a.copy() for a in (weight, bias, layer.lora_A, layer.lora_B)]
    x = rng.standard_normal((2, 8))
    for out in (weight[:2], layer.lora_A, layer.lora_A_grad, layer.lora_B.reshape(2, 8),
                layer.lora_B_grad.reshape(2, 8)):
        with pytest.raises(ValueError, match="out must not overlap the layer's own arrays"):
            layer(x, out=out)
    with pytest.raises(ValueError, match=r"shares memory with one of shape \(8,\)"):
        layer(x[:1], out=bias.reshape(1, 8))
    for got, want in zip((weight, bias, layer.lora_A, layer.lora_B), before):
        assert np.array_equal(got, want)
    table = rng.standard_normal((10, 4))
    emb = nplora.LoraEmbedding(table, r=2)
    with pytest.raises(ValueError, match=r"shares memory with one of shape \(10, 4\)"):
        emb(np.array([1, 2]), out=table[:2])


def test_a_weight_made_read_only_after_construction_is_not_merged_into():
    weight = np.ones((4, 4))
    layer = nplora.LoraLinear(weight, r=2, init_lora_weights=False, seed=0)
    weight.flags.writeable = False  # the core looked at the flag only when the layer was built
    with pytest.raises(ValueError, match="weight is read-only"):
        layer.merge()
    assert np.all(weight == 1) and not layer.merged
    np.testing.assert_allclose(layer.merged_weight(), 1 + layer.delta_weight())  # reads still work
