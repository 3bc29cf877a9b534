"""Mixed batches: every row of one call may use a different adapter (or none)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _core
from ._arrays import as_input
from .embedding import as_ids

BASE_NAMES = (None, "__base__")


def index_error(value: int, adapters: int) -> IndexError:
    """The error for an adapter index outside [-1, adapters)."""
    return IndexError(f"adapter index {value} is out of range for {adapters} adapters "
                      "(-1 is the base model)")


def adapter_indices(adapter_ids: Any, names: Sequence[str], shape: tuple[int, ...]) -> np.ndarray:
    """adapter_ids (names, indices into `names`, or -1/None/"__base__") as an int64 array of `shape`."""
    raw = np.asarray(adapter_ids, dtype=object if not isinstance(adapter_ids, np.ndarray) else None)
    if raw.shape != shape:
        raise ValueError(f"adapter_ids must have shape {shape} (one per row), got {raw.shape}")
    if raw.dtype.kind == "u" and raw.size and int(raw.max()) >= len(names):
        # Before the cast to int64, where 2**64 - 1 would become -1 (the base model).
        raise index_error(int(raw.max()), len(names))
    if raw.dtype.kind in "iu":
        indices = raw.astype(np.int64)
    else:
        lookup: dict[str | None, int] = {name: i for i, name in enumerate(names)}
        lookup.update({base: -1 for base in BASE_NAMES})
        flat = []
        for value in raw.reshape(-1):
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                flat.append(int(value))
            elif value in lookup:
                flat.append(lookup[value])
            else:
                raise KeyError(f"adapter_ids names no adapter {value!r}; adapters: {list(names)}")
        for value in flat:
            if not -1 <= value < len(names):  # before int64, which cannot hold every Python int
                raise index_error(value, len(names))
        indices = np.array(flat, dtype=np.int64).reshape(shape)
    bad = (indices < -1) | (indices >= len(names))
    if bad.any():
        raise index_error(int(indices[bad][0]), len(names))
    return indices


def mixed_forward(module: Any, names: Sequence[str], x: Any, adapter_ids: Any) -> np.ndarray:
    """Base output for every row, plus, per row, the LoRA branch of that row's adapter.

    Rows whose adapter this module lacks, or whose layer is disabled (``adapter_enabled`` False,
    as under ``disable_adapter()``), get the base output alone, as in PEFT.
    """
    if module.kind == "embedding":
        ids = as_ids(x, module.weight.shape[0])
        rows = ids.reshape(-1)
        table = module.weight
        next(iter(module.layers.values()))._core.check_ids(rows)  # table[-1] would be the last row
        out = np.asarray(table[rows], dtype=table.dtype)
        indices = adapter_indices(adapter_ids, names, ids.shape).reshape(-1)
        for k, name in enumerate(names):
            layer = module.layers.get(name)
            selected = np.nonzero(indices == k)[0]
            if layer is None or not layer.adapter_enabled or selected.size == 0:
                continue
            a, b = layer.lora_embedding_A, layer.lora_embedding_B
            with np.errstate(all="ignore"):  # inf as the layer's own forward gives, whatever errstate
                out[selected] += layer.scaling * (a.T[rows[selected]] @ b.T)
        return out.reshape(ids.shape + (table.shape[1],))

    weight = module.weight
    first = next(iter(module.layers.values()))
    in_features = first.in_features
    x = as_input(x, weight.dtype, in_features)
    batch_shape = x.shape[:-1]
    indices = adapter_indices(adapter_ids, names, batch_shape).reshape(-1)
    present = [module.layers.get(name) for name in names]
    remap = np.array([i if layer is not None and layer.adapter_enabled else -1
                      for i, layer in enumerate(present)] + [-1])
    indices = remap[indices]  # -1 maps through the last entry
    layers = [layer if layer is not None else first for layer in present]
    y = np.empty(batch_shape + (first.out_features,), dtype=weight.dtype)
    _core.mixed_linear_forward(
        weight, None if module.bias is None else np.ascontiguousarray(module.bias),
        first.fan_in_fan_out, x.reshape(-1, in_features),
        y.reshape(-1, first.out_features), [layer._core for layer in layers],
        np.ascontiguousarray(indices, dtype=np.int64))
    return y
