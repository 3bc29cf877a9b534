"""Array checks shared by the layers: dtype rules, layouts, and error messages that name shapes."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def aligned(array: np.ndarray) -> np.ndarray:
    """`array`, or a copy if its data is not aligned to its dtype (a view into a byte buffer at an
    odd offset): C++ reading a float through a misaligned pointer is undefined behaviour."""
    return array if array.flags.aligned else array.copy()


def as_weight(weight: Any, name: str = "weight") -> np.ndarray:
    """Return `weight` as a 2-D float32/float64 array with contiguous rows, copying only if needed.

    A C-contiguous float array comes back as the same object, so the layer shares (and, on merge,
    writes into) the caller's memory. Any other layout is copied.
    """
    array = np.asarray(weight)
    if array.dtype.kind == "f" and array.dtype.newbyteorder("=") in FLOAT_DTYPES:
        array = array.astype(array.dtype.newbyteorder("="), copy=False)  # big-endian: a native copy
    if array.dtype not in FLOAT_DTYPES:
        if array.dtype.kind in "iub" and not isinstance(weight, np.ndarray):
            array = array.astype(np.float64)  # a nested list of numbers
        else:
            raise TypeError(
                f"{name} must be float32 or float64, got {array.dtype} "
                f"(convert it first, e.g. {name}.astype(np.float32))"
            )
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return aligned(array)


def as_vector(values: Any, dtype: np.dtype, length: int, name: str) -> np.ndarray:
    """Return `values` as a contiguous 1-D array of `dtype` and `length` (cast if needed)."""
    array = np.asarray(values)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers, got dtype {array.dtype}")
    if array.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {array.shape}")
    return aligned(np.ascontiguousarray(array, dtype=dtype))


def as_input(x: Any, dtype: np.dtype, width: int, name: str = "x") -> np.ndarray:
    """Return `x` (..., width) as a C-contiguous array of the layer's dtype.

    The dtype rule: real inputs of another dtype (float64 into a float32 layer, integers, ...) are
    cast to the layer's dtype; complex, object or string inputs raise TypeError.
    """
    array = np.asarray(x)
    if array.dtype != dtype:
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be real numbers, got dtype {array.dtype}")
        array = array.astype(dtype)
    if array.ndim == 0 or array.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}), got {array.shape}")
    return aligned(np.ascontiguousarray(array))


def byte_range(array: np.ndarray) -> tuple[int, int]:
    """[start, end) of a C-contiguous array's bytes."""
    start = array.__array_interface__["data"][0]
    return start, start + array.nbytes


def output_array(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype,
                 inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    """Return `out` checked to receive a result of `shape` and `dtype`, or a new array.

    `out` may not overlap `inputs` (nor, checked by the layer, its own arrays).
    """
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype}, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable or not out.flags.aligned:
        raise ValueError("out must be C-contiguous, aligned and writable")
    for array in inputs:
        if np.may_share_memory(out, array):
            raise ValueError("out must not overlap the input")
    return out


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int >= minimum; TypeError for non-integers (bool included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_rank(r: Any, a_cols: int, b_rows: int, dtype: np.dtype) -> int:
    """`r` as an int >= 1 for lora_A (r, a_cols) and lora_B (b_rows, r) of `dtype`.

    A rank whose parameters and gradients could not exist in a 64-bit address space is a
    ValueError here (as NumPy's "array is too big"), not an overflow in the core.
    """
    r = check_int("r", r, 1)
    nbytes = adapter_bytes(r, a_cols, b_rows, dtype)
    if nbytes >= 2**63:
        raise ValueError(f"r={r} is too large: lora_A ({r}, {a_cols}) and lora_B ({b_rows}, {r}) "
                         f"with their gradients would take {nbytes} bytes")
    return r


def adapter_bytes(r: int, a_cols: int, b_rows: int, dtype: np.dtype) -> int:
    """Bytes of lora_A (r, a_cols), lora_B (b_rows, r) and their two gradients."""
    return 2 * r * (a_cols + b_rows) * np.dtype(dtype).itemsize


def adapter_memory_error(r: int, a_cols: int, b_rows: int, dtype: np.dtype) -> MemoryError:
    """The MemoryError to raise when the core could not allocate a layer's adapter."""
    gib = adapter_bytes(r, a_cols, b_rows, dtype) / 2**30
    return MemoryError(f"cannot allocate r={r}: lora_A ({r}, {a_cols}) and lora_B ({b_rows}, {r}) "
                       f"of {np.dtype(dtype)} with their gradients need {gib:.3g} GiB")


def check_real(name: str, value: Any) -> float:
    """`value` as a float; TypeError for non-numbers, ValueError for NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_dropout(value: Any) -> float:
    """`value` as a dropout probability in [0, 1)."""
    p = check_real("lora_dropout", value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {p}")
    return p


INIT_MODES = {"default": 0, "gaussian": 1, "random": 2}


def init_mode(init_lora_weights: Any) -> int:
    """PEFT's init_lora_weights (True, "gaussian", False) as the core's InitMode number."""
    if init_lora_weights is True:
        return INIT_MODES["default"]
    if init_lora_weights is False:
        return INIT_MODES["random"]
    if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
        return INIT_MODES["gaussian"]  # as PEFT, whatever the case
    if isinstance(init_lora_weights, str):
        raise NotImplementedError(
            f"init_lora_weights={init_lora_weights!r} is not supported by nplora "
            "(supported: True, False, 'gaussian')"
        )
    raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")


def resolve_seed(seed: Any) -> int:
    """A 64-bit seed: `seed` itself, or fresh entropy when None."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed) & 0xFFFFFFFFFFFFFFFF
