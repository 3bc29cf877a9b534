"""NumPy pipeline fit: any array-like in, plain ndarrays out, ``out=`` respected, the dtype rule."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import nplora

OTHER = {np.float32: np.float64, np.float64: np.float32}
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mmap_pipeline.py"


def saved(tmp_path, name, array):
    """`array` written to a .npy file and opened again with np.load(mmap_mode="r")."""
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    return mapped


@pytest.fixture
def linear(rng, dtype):
    weight = rng.standard_normal((5, 7)).astype(dtype)
    bias = rng.standard_normal(5).astype(dtype)
    return nplora.LoraLinear(weight, bias, r=3, lora_alpha=6, init_lora_weights=False, seed=0)


@pytest.fixture
def embedding(rng, dtype):
    return nplora.LoraEmbedding(rng.standard_normal((11, 4)).astype(dtype), r=2, seed=0)


def test_linear_takes_memory_mapped_inputs_and_returns_ndarray(linear, rng, tmp_path, tol):
    x = rng.standard_normal((3, 4, 7)).astype(linear.dtype)
    y = linear.eval()(saved(tmp_path, "x", x))
    assert type(y) is np.ndarray
    assert y.dtype == linear.dtype and y.shape == (3, 4, 5)
    np.testing.assert_allclose(y, linear(x), **tol)


def test_linear_memory_mapped_weight_serves_forward(rng, dtype, tmp_path, tol):
    weight = saved(tmp_path, "w", rng.standard_normal((5, 7)).astype(dtype))
    layer = nplora.LoraLinear(weight, r=2, init_lora_weights=False, seed=0).eval()
    y = layer(rng.standard_normal((2, 7)).astype(dtype))
    assert type(y) is np.ndarray and type(layer.weight) is np.ndarray
    assert not layer.weight.flags.writeable
    x = rng.standard_normal((2, 7))
    np.testing.assert_allclose(layer(x), x.astype(dtype) @ layer.merged_weight().T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        layer.merge()


def test_linear_takes_lists_and_tuples(linear, rng):
    x = rng.standard_normal((2, 7)).round(3)
    expected = linear.eval()(x.astype(linear.dtype))
    for value in (x.tolist(), tuple(map(tuple, x)), x.tolist()[0]):
        y = linear(value)
        assert type(y) is np.ndarray and y.dtype == linear.dtype
        np.testing.assert_array_equal(y.reshape(-1, 5), expected[: y.size // 5])


def test_linear_casts_the_other_float_dtype(linear, rng, dtype):
    """The documented rule: real inputs of another dtype are cast to the layer's dtype."""
    x = rng.standard_normal((4, 7))
    y = linear.eval()(x.astype(OTHER[dtype]))
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, linear(x.astype(OTHER[dtype]).astype(dtype)))
    assert linear(np.arange(7)).dtype == dtype  # integers too
    with pytest.raises(TypeError):
        linear(x.astype(np.complex128))


@pytest.mark.parametrize("layout", ["fortran", "strided", "read-only", "memmap-slice"])
def test_linear_takes_any_layout(linear, rng, tmp_path, layout, tol):
    x = rng.standard_normal((6, 14)).astype(linear.dtype)
    if layout == "fortran":
        view = np.asfortranarray(x[:, :7])
    elif layout == "strided":
        view = x[::2, ::2]
    elif layout == "read-only":
        view = x[:, :7].copy()
        view.flags.writeable = False
    else:
        view = saved(tmp_path, "x", x)[1:5, 3:10]
    y = linear.eval()(view)
    assert type(y) is np.ndarray
    np.testing.assert_allclose(y, linear(np.ascontiguousarray(view)), **tol)


def test_forward_writes_into_out(linear, rng, tmp_path):
    x = saved(tmp_path, "x", rng.standard_normal((3, 7)))  # float64, memory-mapped
    out = np.full((3, 5), np.nan, dtype=linear.dtype)
    result = linear.eval()(x, out=out)
    assert result is out
    np.testing.assert_array_equal(out, linear(x))
    # A writable memory-mapped output file works the same: the result is that memmap.
    target = np.lib.format.open_memmap(tmp_path / "y.npy", mode="w+", dtype=linear.dtype, shape=(3, 5))
    assert linear(x, out=target) is target
    np.testing.assert_array_equal(target, out)
    # Rows of a bigger C-contiguous array: a block of a pipeline.
    big = np.zeros((10, 5), dtype=linear.dtype)
    linear(x, out=big[4:7])
    np.testing.assert_array_equal(big[4:7], out)
    assert not big[:4].any() and not big[7:].any()


def test_out_of_the_wrong_kind_is_refused(linear, rng):
    x = rng.standard_normal((3, 7)).astype(linear.dtype)
    with pytest.raises(TypeError, match="dtype"):
        linear(x, out=np.empty((3, 5), OTHER[linear.dtype.type]))
    with pytest.raises(ValueError, match="shape"):
        linear(x, out=np.empty((3, 4), linear.dtype))
    with pytest.raises(ValueError, match="C-contiguous"):
        linear(x, out=np.empty((5, 3), linear.dtype).T)
    with pytest.raises(TypeError):
        linear(x, out=[[0.0] * 5] * 3)


def test_backward_takes_memory_mapped_gradients(linear, rng, tmp_path, tol):
    x = saved(tmp_path, "x", rng.standard_normal((4, 7)).astype(linear.dtype))
    g = rng.standard_normal((4, 5)).astype(linear.dtype)
    linear.train()(x)
    grad_x = linear.backward(saved(tmp_path, "g", g))
    assert type(grad_x) is np.ndarray and grad_x.dtype == linear.dtype
    linear.zero_grad()
    linear(x)
    np.testing.assert_allclose(grad_x, linear.backward(g.tolist()), **tol)


def test_embedding_takes_lists_and_memory_mapped_ids(embedding, tmp_path):
    ids = np.array([[0, 3, 10], [2, 2, 7]])
    expected = embedding.eval()(ids)
    for value in (ids.tolist(), saved(tmp_path, "ids", ids), saved(tmp_path, "ids32", ids.astype(np.int32))):
        y = embedding(value)
        assert type(y) is np.ndarray and y.dtype == embedding.dtype
        np.testing.assert_array_equal(y, expected)
    out = np.empty((2, 3, 4), embedding.dtype)
    assert embedding(ids, out=out) is out
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(TypeError):
        embedding(ids.astype(np.float64))  # ids must be integers: never rounded silently


def test_model_forward_takes_memory_mapped_inputs(rng, dtype, tmp_path, tol):
    base = {"mlp.fc1.weight": rng.standard_normal((6, 4)).astype(dtype),
            "mlp.fc1.bias": rng.standard_normal(6).astype(dtype)}
    model = nplora.LoraModel(base, nplora.LoraConfig(r=2, target_modules=["fc1"],
                                                     init_lora_weights=False), seed=0).eval()
    x = rng.standard_normal((3, 4))
    expected = model.forward("mlp.fc1", x)
    for value in (saved(tmp_path, "x", x), x.tolist()):
        y = model.forward("mlp.fc1", value)
        assert type(y) is np.ndarray and y.dtype == dtype
        np.testing.assert_allclose(y, expected, **tol)
    other = x.astype(OTHER[dtype])
    y = model.forward("mlp.fc1", other)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, model.forward("mlp.fc1", other.astype(dtype)))
    mixed = model.forward("mlp.fc1", saved(tmp_path, "x2", x), adapter_ids=["default", None, 0])
    assert type(mixed) is np.ndarray
    np.testing.assert_allclose(mixed[[0, 2]], expected[[0, 2]], **tol)


def test_model_over_memory_mapped_weights_merges_into_plain_arrays(rng, tmp_path):
    weights = {"mlp.fc1.weight": rng.standard_normal((6, 4)).astype(np.float32)}
    nplora.save_weights(tmp_path / "model.safetensors", weights)
    base = nplora.open_weights(tmp_path / "model.safetensors")
    model = nplora.LoraModel(base, nplora.LoraConfig(r=2, target_modules=["fc1"],
                                                     init_lora_weights=False), seed=0)
    merged = model.merge_and_unload()
    assert type(merged["mlp.fc1.weight"]) is np.ndarray
    np.testing.assert_allclose(merged["mlp.fc1.weight"], model["mlp.fc1"].merged_weight())


def test_mmap_pipeline_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("mmap_pipeline", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--rows", "3000", "--features", "32", "--out-features", "16",
                         "--dir", str(tmp_path)]) == 0
    outputs = np.load(tmp_path / "outputs.npy")
    assert outputs.shape == (3000, 16) and outputs.dtype == np.float32
    assert "3000 rows" in capsys.readouterr().out
