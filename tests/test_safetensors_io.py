"""Tests of nplora.safetensors_io and safetensors_write: lazy memory-mapped reading, validation, streaming atomic writing."""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from nplora import safetensors_io
from nplora.safetensors_io import (
    INDEX_NAME,
    SafetensorsError,
    open_weights,
    read_header,
)
from nplora.safetensors_write import SafetensorsWriter, save_weights

CODES = sorted(safetensors_io._DTYPES)


def sample(code: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    dtype = safetensors_io.dtype_from_code(code)
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    values = rng.standard_normal(shape)
    if dtype.kind == "c":
        values = values + 1j * rng.standard_normal(shape)
    return values.astype(dtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def raw_file(path: Path, header: dict, data: bytes, *, length: int | None = None) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def entry(code: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": code, "shape": shape, "data_offsets": [begin, end]}


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("code", CODES)
def test_round_trip_every_dtype(tmp_path: Path, code: str) -> None:
    tensors = {"a": sample(code, (3, 5)), "b": sample(code, (7,), seed=1), "scalar": sample(code, (), seed=2)}
    save_weights(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    with open_weights(tmp_path / "x.safetensors") as weights:
        assert set(weights) == set(tensors) and len(weights) == 3
        assert weights.metadata == {"format": "pt"}
        for name, array in tensors.items():
            assert weights.dtype_of(name) == array.dtype and weights.shape_of(name) == array.shape
            assert same_bits(weights[name], array)
    with safe_open(str(tmp_path / "x.safetensors"), framework="numpy") as f:  # the reference reads ours
        assert sorted(f.keys()) == sorted(tensors) and f.metadata() == {"format": "pt"}
        assert f.get_slice("a").get_dtype() == code


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64, np.bool_])
def test_reference_loader_reads_ours_and_we_read_the_references(tmp_path: Path, dtype) -> None:
    tensors = {"w": sample(safetensors_io.code_of(dtype), (4, 6)), "e": np.zeros((0, 3), dtype)}
    save_weights(tmp_path / "ours.safetensors", tensors)
    theirs = load_file(tmp_path / "ours.safetensors")
    assert all(same_bits(theirs[k], v) for k, v in tensors.items())
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    with open_weights(tmp_path / "theirs.safetensors") as weights:
        assert weights.metadata == {"k": "v"}
        assert all(same_bits(weights[k], v) for k, v in tensors.items())


def test_empty_tensors_and_an_empty_file(tmp_path: Path) -> None:
    tensors = {"e0": np.zeros((0,), np.float32), "e1": np.zeros((2, 0, 3), np.float16), "x": np.ones(3, np.int8)}
    save_weights(tmp_path / "e.safetensors", tensors)
    with open_weights(tmp_path / "e.safetensors") as weights:
        for name, array in tensors.items():
            assert same_bits(weights[name], array) and not weights[name].flags.writeable
    save_weights(tmp_path / "none.safetensors", {})
    assert len(open_weights(tmp_path / "none.safetensors")) == 0
    assert load_file(tmp_path / "none.safetensors") == {}


def test_header_is_padded_to_8_bytes_and_tensors_are_aligned(tmp_path: Path) -> None:
    tensors = {"u": np.arange(3, dtype=np.uint8), "d": np.arange(3.0), "f": np.arange(5, dtype=np.float32)}
    save_weights(tmp_path / "a.safetensors", tensors)
    raw = (tmp_path / "a.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0 and raw[8:8 + length].rstrip(b" ").endswith(b"}")
    infos, _ = read_header(tmp_path / "a.safetensors")
    assert list(infos) == ["d", "f", "u"]  # larger itemsize first, as the reference lays them out
    assert all(info.start % info.dtype.itemsize == 0 for info in infos.values())


def test_arrays_are_read_only_views_of_a_map(tmp_path: Path) -> None:
    save_weights(tmp_path / "m.safetensors", {"w": np.arange(12.0).reshape(3, 4)})
    array = open_weights(tmp_path / "m.safetensors")["w"]
    assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        array[0, 0] = 1.0
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, (mmap.mmap, memoryview))


def test_big_endian_and_non_contiguous_inputs_are_written_little_endian(tmp_path: Path) -> None:
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    strided = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]
    save_weights(tmp_path / "b.safetensors", {"big": big, "strided": strided})
    weights = open_weights(tmp_path / "b.safetensors")
    assert weights.dtype_of("big") == np.dtype("<f4")
    np.testing.assert_array_equal(weights["big"], big)
    np.testing.assert_array_equal(weights["strided"], strided)


# ----------------------------------------------------------------------------- laziness
def test_nothing_is_read_before_indexing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lazy.safetensors"
    save_weights(path, {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)})
    weights = open_weights(path)

    def no_map(*args, **kwargs):
        raise AssertionError("a tensor was mapped")

    monkeypatch.setattr(safetensors_io.mmap, "mmap", no_map)
    assert sorted(weights.keys()) == ["a", "b"] and len(weights) == 2 and "a" in weights
    assert weights.shape_of("a") == (4,) and weights.dtype_of("b") == np.float32
    assert weights.shard_of("a") == "lazy.safetensors" and weights.nbytes == 32
    monkeypatch.undo()
    # Data written after opening is what indexing sees: it was not read at open time.
    info = weights.info("b")
    with open(path, "r+b") as f:
        f.seek(info.start)
        f.write(np.full(4, 7.0, np.float32).tobytes())
    np.testing.assert_array_equal(weights["b"], np.full(4, 7.0, np.float32))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_indexing_costs_no_ram_until_touched_and_is_released(tmp_path: Path) -> None:
    size = 64 << 20
    path = tmp_path / "big.safetensors"
    with SafetensorsWriter(path, {"big": (np.float32, (size // 4,))}) as writer:
        writer.write("big", np.ones(size // 4, np.float32))
    weights = open_weights(path)
    before = _rss_bytes()
    array = weights["big"]
    assert _rss_bytes() - before < size // 8  # mapped, not read
    assert float(array[:: 1024].sum()) == size // 4 / 1024  # touches every page
    touched = _rss_bytes()
    assert touched - before > size // 2
    del array
    assert touched - _rss_bytes() > size // 2  # unmapped with the array
    weights.close()
    path.unlink()  # pytest keeps the last runs' tmp_path folders


# ----------------------------------------------------------------------------- shard folders
def make_shards(folder: Path, layout: dict[str, dict[str, np.ndarray]], metadata: dict | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, tensors in layout.items():
        save_weights(folder / shard, tensors, metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
    index = {"metadata": metadata or {"total_size": 0}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return index


def test_sharded_folder(tmp_path: Path) -> None:
    layout = {
        "model-00001-of-00002.safetensors": {"a.weight": np.ones((2, 3), np.float32), "b.weight": np.zeros(4)},
        "model-00002-of-00002.safetensors": {"c.weight": np.arange(6, dtype=np.float16)},
    }
    make_shards(tmp_path / "m", layout, metadata={"total_size": 44})
    with open_weights(tmp_path / "m") as weights:
        assert weights.is_sharded and weights.metadata == {"total_size": 44}
        assert weights.shards == sorted(layout)
        assert list(weights) == ["b.weight", "a.weight", "c.weight"]  # file order, shard by shard
        assert weights.shard_of("c.weight") == "model-00002-of-00002.safetensors"
        assert weights.tensors_in("model-00001-of-00002.safetensors") == ["b.weight", "a.weight"]
        assert weights.file_metadata("model-00002-of-00002.safetensors") == {"format": "pt"}
        for tensors in layout.values():
            for name, array in tensors.items():
                assert same_bits(weights[name], array)


def test_folder_with_a_single_model_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    save_weights(tmp_path / "m" / "model.safetensors", {"w": np.eye(3, dtype=np.float32)}, {"format": "pt"})
    weights = open_weights(tmp_path / "m")
    assert not weights.is_sharded and weights.shards == ["model.safetensors"]
    assert weights.metadata == {"format": "pt"}
    np.testing.assert_array_equal(weights["w"], np.eye(3))


def _bad_index(folder: Path, case: str) -> str:
    layout = {"s1.safetensors": {"a": np.zeros(2, np.float32)}, "s2.safetensors": {"b": np.zeros(2, np.float32)}}
    index = make_shards(folder, layout)
    if case == "missing shard":
        (folder / "s2.safetensors").unlink()
        return "'s2.safetensors' does not exist"
    if case == "listed twice":
        (folder / INDEX_NAME).write_text('{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", '
                                         '"a": "s2.safetensors"}}')
        return "duplicate key 'a'"
    if case == "stored twice":
        save_weights(folder / "s2.safetensors", {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)})
        return "'a' is listed in shard 's1.safetensors' but also stored in 's2.safetensors'"
    if case == "not listed":
        save_weights(folder / "s2.safetensors", {"b": np.zeros(2, np.float32), "z": np.zeros(1, np.int8)})
        return "'z' of shard 's2.safetensors' is not in the weight_map"
    if case == "listed, not stored":
        index["weight_map"]["ghost"] = "s1.safetensors"
    elif case == "path in shard name":
        index["weight_map"]["b"] = "../s2.safetensors"
    elif case == "no weight_map":
        del index["weight_map"]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return {"listed, not stored": "'ghost' is listed in shard 's1.safetensors', which does not hold it",
            "path in shard name": "must be a plain file name",
            "no weight_map": "'weight_map' must map"}[case]


@pytest.mark.parametrize("case", ["missing shard", "listed twice", "stored twice", "not listed",
                                  "listed, not stored", "path in shard name", "no weight_map"])
def test_bad_shard_index(tmp_path: Path, case: str) -> None:
    message = _bad_index(tmp_path / "m", case)
    with pytest.raises(SafetensorsError) as error:
        open_weights(tmp_path / "m")
    assert message in str(error.value) and str(tmp_path / "m") in str(error.value)


def test_folder_without_weights_and_ambiguous_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        open_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="no safetensors file"):
        open_weights(tmp_path / "nothing")
    make_shards(tmp_path / "m", {"s.safetensors": {"a": np.zeros(1)}})
    save_weights(tmp_path / "m" / "model.safetensors", {"a": np.zeros(1)})
    with pytest.raises(SafetensorsError, match="both model.safetensors and"):
        open_weights(tmp_path / "m")


# ----------------------------------------------------------------------------- malformed files
MALFORMED = {
    # case: (header, data, header length override, expected words)
    "unknown dtype": ({"w": entry("F99", [2], 0, 8)}, 8, None, "'w': unsupported dtype 'F99'"),
    "sub-byte dtype": ({"w": entry("F4", [2], 0, 1)}, 1, None, "'w': unsupported dtype 'F4'"),
    "negative shape": ({"w": entry("F32", [-2], 0, 8)}, 8, None, "'w': shape must be a list of non-negative"),
    "float shape": ({"w": entry("F32", [2.0], 0, 8)}, 8, None, "'w': shape must be a list of non-negative"),
    "reversed offsets": ({"w": entry("F32", [0], 8, 0)}, 8, None, "'w': data_offsets must be [begin, end]"),
    "offsets out of range": ({"w": entry("F32", [4], 0, 16)}, 8, None, "'w': data_offsets [0, 16] run past"),
    "size mismatch": ({"w": entry("F32", [3], 0, 8)}, 8, None, "shape [3] of F32 needs 12"),
    "overlap": ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, 12, None, "'b' at data_offsets "
                "[4, 12] overlaps tensor 'a'"),
    "gap": ({"a": entry("F32", [1], 4, 8)}, 8, None, "leaves a gap of 4 bytes"),
    "trailing bytes": ({"a": entry("F32", [1], 0, 4)}, 8, None, "4 bytes after the last tensor"),
    "metadata not str": ({"__metadata__": {"n": 1}, "a": entry("F32", [1], 0, 4)}, 4, None, "__metadata__ must"),
    "header too long": ({}, 0, 100_000_001, "exceeds the limit"),
    "header past the end": ({}, 0, 4096, "runs past the end of the file"),
    "entry not an object": ({"a": [1, 2]}, 0, None, "'a': header entry must be an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_headers_are_rejected_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    header, data, length, words = MALFORMED[case]
    path = raw_file(tmp_path / "bad.safetensors", header, b"\0" * data, length=length)
    with pytest.raises(SafetensorsError) as error:
        open_weights(path)
    assert str(path) in str(error.value) and words in str(error.value)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("raw, words", [
    (b"\x10\0\0", "too short"),
    (struct.pack("<Q", 2) + b"[]", "not a valid JSON object"),
    (struct.pack("<Q", 3) + b"{x}", "not a valid JSON object"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "not a valid JSON object"),
    (struct.pack("<Q", 8) + b' {"a":1}', "does not start with '{'"),
    (struct.pack("<Q", 14) + b'{"a":1, "a":2}', "duplicate key 'a'"),
])
def test_unparseable_headers(tmp_path: Path, raw: bytes, words: str) -> None:
    (tmp_path / "bad.safetensors").write_bytes(raw)
    with pytest.raises(SafetensorsError, match=words):
        open_weights(tmp_path / "bad.safetensors")


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_weights(path, {"a": np.ones((8, 8), np.float32)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(SafetensorsError, match=r"'a': data_offsets \[0, 256\] run past .* truncated"):
        open_weights(path)
    path.write_bytes(raw[:20])
    with pytest.raises(SafetensorsError, match="truncated"):
        open_weights(path)


# ----------------------------------------------------------------------------- the streaming writer
def test_writer_streams_in_header_order(tmp_path: Path) -> None:
    header = {"z": (np.float32, (2, 2)), "a": ("BF16", [3]), "m": (np.dtype("int64"), ())}
    with SafetensorsWriter(tmp_path / "w.safetensors", header, metadata={"format": "pt"}) as writer:
        writer.write("z", np.eye(2, dtype=np.float32))
        assert not (tmp_path / "w.safetensors").exists() and writer.written == 1
        writer.write("a", np.ones(3, ml_dtypes.bfloat16))
        writer.write("m", np.int64(5))
    assert os.listdir(tmp_path) == ["w.safetensors"]
    infos, metadata = read_header(tmp_path / "w.safetensors")
    assert list(infos) == ["z", "a", "m"] and metadata == {"format": "pt"}
    loaded = load_file(tmp_path / "w.safetensors")
    assert loaded["a"].dtype == ml_dtypes.bfloat16 and loaded["m"] == 5


@pytest.mark.parametrize("mistake, words", [
    (lambda w: w.write("b", np.zeros(2, np.float32)), "expected tensor 'a' next"),
    (lambda w: w.write("a", np.zeros(2, np.float64)), "must have dtype float32, got float64"),
    (lambda w: w.write("a", np.zeros(3, np.float32)), r"must have shape \(2,\), got \(3,\)"),
    (lambda w: w.close(), r"1 tensor\(s\) missing: \['b'\]"),
])
def test_writer_mistakes_leave_nothing(tmp_path: Path, mistake, words: str) -> None:
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"previous")
    writer = SafetensorsWriter(target, {"a": (np.float32, (2,)), "b": (np.float32, (2,))})
    if "missing" in words:
        writer.write("a", np.zeros(2, np.float32))
    with pytest.raises((ValueError, TypeError), match=words):
        mistake(writer)
    assert writer.closed and os.listdir(tmp_path) == ["w.safetensors"]
    assert target.read_bytes() == b"previous"


def test_writer_exception_in_with_block_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(tmp_path / "w.safetensors", {"a": (np.float32, (2,))}) as writer:
            writer.write("a", np.zeros(2, np.float32))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_rejects_bad_headers(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot be stored in safetensors"):
        SafetensorsWriter(tmp_path / "w", {"a": (object, (1,))})
    with pytest.raises(ValueError, match="non-negative ints"):
        SafetensorsWriter(tmp_path / "w", {"a": (np.float32, (-1,))})
    with pytest.raises(ValueError, match="not allowed"):
        SafetensorsWriter(tmp_path / "w", {"__metadata__": (np.float32, (1,))})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        SafetensorsWriter(tmp_path / "w", {}, metadata={"a": 1})
    # What os.fsdecode makes of undecodable bytes: written, it was a header no reader could parse.
    with pytest.raises(ValueError, match="not valid UTF-8"):
        SafetensorsWriter(tmp_path / "w", {"bad\udcff": (np.float32, (1,))})
    with pytest.raises(ValueError, match="metadata must be valid UTF-8"):
        SafetensorsWriter(tmp_path / "w", {}, metadata={"a": "\udcff"})
    assert os.listdir(tmp_path) == []
