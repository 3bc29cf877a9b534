"""Streaming, atomic writing of ``.safetensors`` files (the format is described in safetensors_io).

A writer takes the whole header first, so a merged model can be written tensor by tensor (even
row block by row block) without holding it in memory; the file appears under its name only once
complete.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from .safetensors_io import _CODES, _DTYPES, MAX_HEADER_SIZE, PathLike, code_of


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SafetensorsWriter:
    """Stream tensors into a ``.safetensors`` file one at a time; the file appears only when complete.

    The header is written first, then ``write(name, array)`` appends each tensor in header order.
    Everything goes to ``<path>.tmp-<random>``, which ``close()`` (or leaving a ``with`` block
    normally) renames to ``path`` once every tensor is written. On any error, or a ``with`` block
    left by an exception, the temporary file is removed and ``path`` is untouched.

    Parameters
    ----------
    path : str or PathLike
        The file to create or replace.
    header : Mapping
        ``{name: (dtype, shape)}`` in the order the tensors will be written; dtype a NumPy dtype
        (``ml_dtypes.bfloat16`` for BF16) or a safetensors code (``"F32"``).
    metadata : Mapping of str to str, optional
        The ``__metadata__`` map (PEFT and transformers write ``{"format": "pt"}``).
    """

    def __init__(self, path: PathLike, header: Mapping[str, tuple[Any, Any]],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = os.fspath(path)
        self._specs: list[tuple[str, np.dtype, tuple[int, ...]]] = []
        entries: dict[str, Any] = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise TypeError(f"metadata must map str to str, got {dict(metadata)!r}")
            if not all(_is_utf8(k) and _is_utf8(v) for k, v in metadata.items()):
                raise ValueError(f"metadata must be valid UTF-8, got {dict(metadata)!r}")
            entries["__metadata__"] = dict(metadata)
        offset = 0
        for name, (dtype, shape) in header.items():
            if not isinstance(name, str) or name == "__metadata__":
                raise ValueError(f"tensor name {name!r} is not allowed")
            if not _is_utf8(name):  # json.dumps would escape it into a header no reader accepts
                raise ValueError(f"tensor name {name!r} is not valid UTF-8 (a lone surrogate, as "
                                 "os.fsdecode makes of undecodable bytes)")
            code = code_of(dtype)
            if not isinstance(shape, (tuple, list)) or not all(
                    isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError(f"shape of {name!r} must be a tuple of non-negative ints, got {shape!r}")
            shape = tuple(int(d) for d in shape)
            size = math.prod(shape) * _DTYPES[code].itemsize
            entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._specs.append((name, _DTYPES[code], shape))
            offset += size
        raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, padded with spaces as the reference does
        if len(raw) > MAX_HEADER_SIZE:
            raise ValueError(f"{self.path}: header of {len(raw)} bytes exceeds the limit of {MAX_HEADER_SIZE}")
        self.nbytes = offset
        self._tmp = f"{self.path}.tmp-{secrets.token_hex(4)}"
        self._file: Any = open(self._tmp, "xb")  # noqa: SIM115 - closed by close()/abort()
        self._next = 0
        self._rows_done = 0  # of the current tensor, when written by write_rows
        try:
            self._file.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.abort()
            raise

    @property
    def written(self) -> int:
        """How many tensors have been written."""
        return self._next

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(self, name: str, array: Any) -> None:
        """Append the next tensor; it must be the next name in header order, dtype and shape as declared.

        Any error aborts the writer (the temporary file is removed).
        """
        if self._rows_done:
            self.abort()
            raise ValueError(f"{self.path}: tensor {name!r} is partly written by write_rows already")
        self._write(name, array, whole=True)

    def write_rows(self, name: str, array: Any) -> None:
        """Append the next rows (first axis) of the current tensor; the tensor is complete, and the
        next one may start, once all its rows are written. Errors abort the writer as ``write`` does.
        """
        self._write(name, array, whole=False)

    def _write(self, name: str, array: Any, *, whole: bool) -> None:
        try:
            if self._file is None:
                raise ValueError(f"{self.path}: the writer is closed")
            if self._next >= len(self._specs):
                raise ValueError(f"{self.path}: every tensor of the header is written already, got {name!r}")
            expected, dtype, shape = self._specs[self._next]
            if name != expected:
                raise ValueError(f"{self.path}: expected tensor {expected!r} next (header order), got {name!r}")
            array = np.asarray(array)
            if code_of(array.dtype) != _CODES[dtype]:
                raise TypeError(f"{self.path}: tensor {name!r} must have dtype {dtype}, got {array.dtype}")
            rows = array.shape[0] if array.ndim and not whole else None
            if rows is None and array.shape != shape or rows is not None and (
                    array.shape[1:] != shape[1:] or self._rows_done + rows > shape[0]):
                what = "shape" if rows is None else f"rows {self._rows_done}:{self._rows_done + rows} of shape"
                raise ValueError(f"{self.path}: tensor {name!r} must have {what} {shape}, got {array.shape}")
            data = np.ascontiguousarray(array, dtype=dtype)  # also fixes a big-endian byte order
            self._file.write(data.reshape(-1).view(np.uint8))
            self._rows_done = shape[0] if rows is None and shape else self._rows_done + (rows or 0)
            if not shape or self._rows_done == shape[0]:
                self._next += 1
                self._rows_done = 0
        except BaseException:
            self.abort()
            raise

    def close(self) -> None:
        """Finish the file and rename it into place; raises (and removes it) if tensors are missing."""
        if self._file is None:
            return
        if self._next < len(self._specs):
            missing = [name for name, _, _ in self._specs[self._next:]]
            self.abort()
            raise ValueError(f"{self.path}: not written, {len(missing)} tensor(s) missing: {missing[:5]}")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        file, self._file = self._file, None
        if file is not None:
            file.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self.abort()


def save_weights(path: PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``{name: array}`` to a ``.safetensors`` file atomically.

    Tensors are laid out as the safetensors package does (larger itemsize first, then by name) so
    each one is aligned to its dtype.

    Parameters
    ----------
    path : str or PathLike
        The file to create or replace.
    tensors : Mapping of str to array_like
        Any dtype ``code_of`` accepts.
    metadata : Mapping of str to str, optional
        The ``__metadata__`` map.
    """
    arrays = {name: np.asarray(array) for name, array in tensors.items()}
    order = sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))
    with SafetensorsWriter(path, {name: (arrays[name].dtype, arrays[name].shape) for name in order},
                           metadata) as writer:
        for name in order:
            writer.write(name, arrays[name])
