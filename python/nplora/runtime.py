"""Threads, and which BLAS the core's large products run on.

nplora hands its large matrix products to the BLAS NumPy itself links (found at import through
threadpoolctl), so both share one thread pool instead of two pools fighting over the cores. If no
usable BLAS is found, or ``NPLORA_BLAS=eigen`` is set, the core falls back to Eigen on its own pool.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from . import _core

# (sgemm symbol, dgemm symbol, 64-bit integers)
_CBLAS_SYMBOLS = (
    ("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", True),
    ("cblas_sgemm64_", "cblas_dgemm64_", True),
    ("scipy_cblas_sgemm", "scipy_cblas_dgemm", None),
    ("cblas_sgemm", "cblas_dgemm", None),
)

_blas: dict[str, Any] = {"backend": "eigen", "filepath": None, "symbol": None}


def _openblas_is_ilp64(lib: ctypes.CDLL) -> bool | None:
    for name in ("scipy_openblas_get_config64_", "openblas_get_config64_", "scipy_openblas_get_config",
                 "openblas_get_config"):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            return b"USE64BITINT" in (fn() or b"")
    return None


def _find_numpy_cblas() -> tuple[int, int, bool, str, str] | None:
    """Addresses of cblas_sgemm/dgemm in the OpenBLAS NumPy loaded, with their integer width."""
    try:
        import numpy  # noqa: F401  (its BLAS must be loaded before we look)
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for info in threadpool_info():
        if info.get("internal_api") != "openblas":
            continue
        path = info.get("filepath")
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sgemm, dgemm, ilp64 in _CBLAS_SYMBOLS:
            s_fn, d_fn = getattr(lib, sgemm, None), getattr(lib, dgemm, None)
            if s_fn is None or d_fn is None:
                continue
            if ilp64 is None:
                ilp64 = _openblas_is_ilp64(lib)
                if ilp64 is None:
                    continue  # integer width unknown: calling it could crash
            s_addr = ctypes.cast(s_fn, ctypes.c_void_p).value
            d_addr = ctypes.cast(d_fn, ctypes.c_void_p).value
            if s_addr and d_addr:
                return s_addr, d_addr, bool(ilp64), path, sgemm
    return None


def use_blas(backend: str = "numpy") -> str:
    """Choose what the core's large products run on: "numpy" (NumPy's own BLAS) or "eigen".

    Parameters
    ----------
    backend : {"numpy", "eigen"}
        "numpy" shares NumPy's BLAS and its thread pool; "eigen" uses the built-in kernels on
        nplora's own threads. The environment variable ``NPLORA_BLAS`` sets it at import.

    Returns
    -------
    str
        The backend in use ("eigen" when NumPy's BLAS cannot be used).
    """
    if backend not in ("numpy", "eigen"):
        raise ValueError(f"backend must be 'numpy' or 'eigen', got {backend!r}")
    found = _find_numpy_cblas() if backend == "numpy" else None
    if found is None:
        _core.set_cblas_gemm(0, 0, False)
        _blas.update(backend="eigen", filepath=None, symbol=None)
    else:
        s_addr, d_addr, ilp64, path, symbol = found
        _core.set_cblas_gemm(s_addr, d_addr, ilp64)
        _blas.update(backend="numpy", filepath=path, symbol=symbol)
    return _blas["backend"]


def blas_info() -> dict[str, Any]:
    """Which product backend the core uses.

    Returns
    -------
    dict
        ``{"backend": "numpy" or "eigen", "filepath": the BLAS library or None,
        "symbol": the sgemm symbol used or None}``.
    """
    return dict(_blas)


def get_num_threads() -> int:
    """Threads nplora's own kernels use (merge, embeddings, optimizers, the Eigen fallback).

    Returns
    -------
    int
        At least 1.
    """
    return int(_core.get_num_threads())


def set_num_threads(n: int) -> None:
    """Set the threads nplora's own kernels use.

    Products that run on NumPy's BLAS follow that BLAS's thread setting (``threadpoolctl`` or
    ``OPENBLAS_NUM_THREADS``), shared with NumPy.

    Parameters
    ----------
    n : int
        Number of threads, >= 1.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _core.set_num_threads(n)


use_blas(os.environ.get("NPLORA_BLAS", "numpy"))
