"""Memory-mapped reading of ``.safetensors`` files and shard folders (writing: safetensors_write).

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the tensor bytes. Headers are parsed and validated here (with the same rules as the
``safetensors`` package, which checks them a second time) so that each tensor can be mapped on its
own: ``weights[name]`` maps just that tensor's pages, read-only, and unmaps them when the array is
garbage-collected, so a multi-GB model never has to sit in RAM.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import ml_dtypes
import numpy as np

from .config import (
    _unique_keys,  # a JSON object with a key twice is refused, not resolved
)

MAX_HEADER_SIZE = 100_000_000  # the safetensors package's own limit
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

PathLike = Union[str, "os.PathLike[str]"]

_DTYPES: dict[str, np.dtype] = {
    code: np.dtype(dtype)
    for code, dtype in {
        "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
        "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
        "F16": np.float16, "F32": np.float32, "F64": np.float64, "C64": np.complex64,
        "BF16": ml_dtypes.bfloat16,
        # float8 types, as far as the installed ml_dtypes has them
        "F8_E5M2": getattr(ml_dtypes, "float8_e5m2", None),
        "F8_E4M3": getattr(ml_dtypes, "float8_e4m3fn", None),
        "F8_E8M0": getattr(ml_dtypes, "float8_e8m0fnu", None),
        "F8_E4M3FNUZ": getattr(ml_dtypes, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(ml_dtypes, "float8_e5m2fnuz", None),
    }.items()
    if dtype is not None
}
_CODES: dict[np.dtype, str] = {dtype: code for code, dtype in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A malformed ``.safetensors`` file or shard index; the message names the file (and tensor)."""


def dtype_from_code(code: str) -> np.dtype:
    """The NumPy dtype of a safetensors dtype code such as ``"BF16"`` (bfloat16 via ml_dtypes)."""
    try:
        return _DTYPES[code]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported safetensors dtype {code!r} (supported: {sorted(_DTYPES)})") from None


def code_of(dtype: Any) -> str:
    """The safetensors dtype code of a NumPy dtype, or of a code given as is (``"F32"``)."""
    if isinstance(dtype, str) and dtype in _DTYPES:
        return dtype
    try:
        normal = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
        return _CODES[normal]
    except (KeyError, TypeError):
        raise TypeError(f"dtype {dtype!r} cannot be stored in safetensors "
                        f"(supported: {sorted(str(d) for d in _CODES)})") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: its dtype, shape and absolute byte range ``[start, end)`` in its file."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class _Header:
    path: str
    tensors: dict[str, TensorInfo]  # in file (offset) order
    metadata: dict[str, str]




def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: str, name: str, entry: Any, data_size: int) -> tuple[int, int, TensorInfo]:
    def fail(what: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: tensor {name!r}: {what}")

    if not isinstance(entry, dict):
        raise fail(f"header entry must be an object, got {entry!r}")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in _DTYPES:
        raise fail(f"unsupported dtype {code!r} (supported: {sorted(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise fail(f"shape must be a list of non-negative ints, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise fail(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    begin, end = offsets
    if end > data_size:
        raise fail(f"data_offsets {offsets} run past the end of the data ({data_size} bytes); "
                   "is the file truncated?")
    dtype = _DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise fail(f"data_offsets {offsets} span {end - begin} bytes, but shape {shape} of {code} "
                   f"needs {expected}")
    return begin, end, TensorInfo(dtype, tuple(shape), begin, end)


def read_header(path: PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of a ``.safetensors`` file without reading any tensor.

    Parameters
    ----------
    path : str or PathLike
        The file.

    Returns
    -------
    tensors : dict
        ``{name: TensorInfo}`` in file order, byte ranges absolute in the file.
    metadata : dict
        The ``__metadata__`` map (``{}`` when absent).

    Raises
    ------
    SafetensorsError
        Naming the file and tensor: truncated file, header too long or not JSON, unknown dtype,
        bad shape, offsets out of range, inconsistent with the shape, overlapping or leaving gaps.
    """
    header = _read_header(os.fspath(path))
    return header.tensors, header.metadata


def _read_header(path: str) -> _Header:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: {size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_SIZE:
            raise SafetensorsError(f"{path}: header length {length} exceeds the limit of {MAX_HEADER_SIZE} bytes")
        if 8 + length > size:
            raise SafetensorsError(f"{path}: header length {length} runs past the end of the file "
                                   f"({size} bytes); is the file truncated?")
        raw = f.read(length)
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("it does not start with '{'")
        parsed = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as error:  # also UnicodeDecodeError, JSONDecodeError
        raise SafetensorsError(f"{path}: the header is not a valid JSON object: {error}") from None
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map str to str, got {metadata!r}")
    data_start, data_size = 8 + length, size - 8 - length
    entries = sorted((_check_entry(path, name, entry, data_size) + (name,) for name, entry in parsed.items()),
                     key=lambda item: (item[0], item[1]))
    covered, previous, tensors = 0, None, {}
    for begin, end, info, name in entries:
        if begin < covered:
            raise SafetensorsError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] overlaps "
                                   f"tensor {previous!r}")
        if begin > covered:
            raise SafetensorsError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] leaves a gap "
                                   f"of {begin - covered} bytes before it")
        covered, previous = end, name
        tensors[name] = TensorInfo(info.dtype, info.shape, data_start + begin, data_start + end)
    if covered != data_size:
        raise SafetensorsError(f"{path}: {data_size - covered} bytes after the last tensor are covered by "
                               "no tensor")
    _cross_check(path)
    return _Header(path, tensors, dict(metadata))


def _cross_check(path: str) -> None:
    # The reference implementation's own validation, for any rule it has that ours lacks.
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except SafetensorError as error:
        raise SafetensorsError(f"{path}: rejected by the safetensors package: {error}") from None


def _read_index(folder: str) -> tuple[dict[str, str], dict[str, Any]]:
    path = os.path.join(folder, INDEX_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as error:
        raise SafetensorsError(f"{path}: not a valid JSON index: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafetensorsError(f"{path}: 'weight_map' must map tensor names to shard file names")
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: 'metadata' must be an object, got {metadata!r}")
    for shard in set(weight_map.values()):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise SafetensorsError(f"{path}: shard {shard!r} must be a plain file name in {folder}")
        if not os.path.isfile(os.path.join(folder, shard)):
            raise SafetensorsError(f"{path}: shard {shard!r} does not exist in {folder}")
    return weight_map, metadata


class LazyWeights(Mapping):
    """Read-only ``{name: ndarray}`` over a safetensors file or shard folder; see ``open_weights``.

    Indexing maps one tensor's bytes read-only (``np.frombuffer`` over an ``mmap``): nothing is read
    until the array is touched, and the pages are unmapped when the array is garbage-collected.
    """

    def __init__(self, root: str, headers: list[_Header], index_metadata: dict[str, Any] | None) -> None:
        self.root = root
        self.is_sharded = index_metadata is not None
        self._headers = {os.path.basename(h.path): h for h in headers}
        self._where = {name: h for h in headers for name in h.tensors}
        self._index_metadata = index_metadata
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # arrays may be mapped from several threads

    # ---------------------------------------------------------------- Mapping
    def __getitem__(self, name: str) -> np.ndarray:
        info = self._where[name].tensors[name]
        return self._map(name, info.start, info.shape)

    def slice_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (first axis) of a tensor, mapping only their bytes.

        Streaming a large tensor block by block this way keeps only one block resident, where
        walking one full map would keep every page touched so far mapped into the process.
        """
        info = self.info(name)
        if not info.shape:
            raise ValueError(f"tensor {name!r} is 0-d and has no rows")
        start, stop, _ = slice(start, stop).indices(info.shape[0])
        stop = max(start, stop)
        row = math.prod(info.shape[1:]) * info.dtype.itemsize
        return self._map(name, info.start + start * row, (stop - start,) + info.shape[1:])

    def _map(self, name: str, start: int, shape: tuple[int, ...]) -> np.ndarray:
        header = self._where[name]
        dtype = header.tensors[name].dtype
        count = math.prod(shape)
        if count == 0:
            array = np.empty(shape, dtype=dtype)
            array.flags.writeable = False
            return array
        with self._lock:
            fd = self._fds.get(header.path)
            if fd is None:
                fd = self._fds[header.path] = os.open(header.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            aligned = start - start % mmap.ALLOCATIONGRANULARITY
            end = start + count * dtype.itemsize
            mapped = mmap.mmap(fd, end - aligned, access=mmap.ACCESS_READ, offset=aligned)
        return np.frombuffer(mapped, dtype=dtype, count=count, offset=start - aligned).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    # ---------------------------------------------------------------- header facts, no data touched
    def info(self, name: str) -> TensorInfo:
        """dtype, shape and byte range of a tensor."""
        return self._where[name].tensors[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, from the header."""
        return self.info(name).shape

    def dtype_of(self, name: str) -> np.dtype:
        """NumPy dtype of a tensor (``ml_dtypes.bfloat16`` for BF16), from the header."""
        return self.info(name).dtype

    def shard_of(self, name: str) -> str:
        """File name (without folder) of the file holding a tensor."""
        return os.path.basename(self._where[name].path)

    @property
    def shards(self) -> list[str]:
        """File names of the files, in reading order (sorted for a shard folder)."""
        return list(self._headers)

    def tensors_in(self, shard: str) -> list[str]:
        """Names of the tensors of one file, in file order."""
        return list(self._headers[shard].tensors)

    def file_metadata(self, shard: str) -> dict[str, str]:
        """The ``__metadata__`` of one file."""
        return dict(self._headers[shard].metadata)

    @property
    def metadata(self) -> dict[str, Any]:
        """The file's ``__metadata__``; for a shard folder, the index's ``metadata``."""
        if self._index_metadata is not None:
            return dict(self._index_metadata)
        return dict(next(iter(self._headers.values())).metadata)

    @property
    def nbytes(self) -> int:
        """Total size of the tensor data."""
        return sum(h.tensors[n].nbytes for h in self._headers.values() for n in h.tensors)

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Close the file descriptors; arrays already returned stay valid (they own their maps)."""
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> LazyWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"LazyWeights({self.root!r}, {len(self)} tensors in {len(self._headers)} file(s))"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Pickled as its path (reopened, and validated again, on load), never as its bytes.
        return open_weights, (self.root,)


def open_weights(path: PathLike) -> LazyWeights:
    """Open a ``.safetensors`` file or a model folder as a lazy, read-only ``{name: ndarray}``.

    Parameters
    ----------
    path : str or PathLike
        A ``.safetensors`` file; or a folder holding ``model.safetensors``, or shards listed by
        ``model.safetensors.index.json`` (every shard must exist and every tensor be listed once).

    Returns
    -------
    LazyWeights
        BF16 tensors come back as ``ml_dtypes.bfloat16`` arrays; every array is read-only.

    Raises
    ------
    SafetensorsError
        A malformed file or index, naming it. FileNotFoundError when nothing is there.
    """
    root = os.fspath(path)
    if os.path.isfile(root):
        return LazyWeights(root, [_read_header(root)], None)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no safetensors file or model folder at {root}")
    single, index = os.path.join(root, SINGLE_NAME), os.path.join(root, INDEX_NAME)
    if os.path.isfile(single) and os.path.isfile(index):
        raise SafetensorsError(f"{root} holds both {SINGLE_NAME} and {INDEX_NAME}; which one is the model?")
    if os.path.isfile(single):
        return LazyWeights(root, [_read_header(single)], None)
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{root} holds neither {SINGLE_NAME} nor {INDEX_NAME}")
    weight_map, metadata = _read_index(root)
    headers = [_read_header(os.path.join(root, shard)) for shard in sorted(set(weight_map.values()))]
    for header in headers:
        shard = os.path.basename(header.path)
        for name in header.tensors:
            listed = weight_map.get(name)
            if listed is None:
                raise SafetensorsError(f"{os.path.join(root, INDEX_NAME)}: tensor {name!r} of shard {shard!r} "
                                       "is not in the weight_map")
            if listed != shard:
                raise SafetensorsError(f"{os.path.join(root, INDEX_NAME)}: tensor {name!r} is listed in shard "
                                       f"{listed!r} but also stored in {shard!r}")
    stored = {name for header in headers for name in header.tensors}
    for name, shard in weight_map.items():
        if name not in stored:
            raise SafetensorsError(f"{os.path.join(root, INDEX_NAME)}: tensor {name!r} is listed in shard "
                                   f"{shard!r}, which does not hold it")
    return LazyWeights(root, headers, metadata)
