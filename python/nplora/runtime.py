"""Threads, and what the core's matrix products run on.

By default the products run on nplora's own packed AVX-512/AVX2 kernels on nplora's own threads
("nplora"): faster than OpenBLAS here, and they never wake NumPy's BLAS threads, whose spinning
after each call would take a core from nplora's. ``use_blas("numpy")`` hands them to the BLAS NumPy
itself links instead (found through threadpoolctl), and ``use_blas("eigen")`` to Eigen. A CPU
without AVX2 uses NumPy's BLAS, or Eigen. ``NPLORA_BLAS`` sets the choice at import.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from . import _core
from ._arrays import check_int

# Far past this kind of machine's cores; a typo such as 2**31 is refused instead of starting
# threads until the system runs out.
MAX_THREADS = 4096

# (sgemm symbol, dgemm symbol, 64-bit integers)
_CBLAS_SYMBOLS = (
    ("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", True),
    ("cblas_sgemm64_", "cblas_dgemm64_", True),
    ("scipy_cblas_sgemm", "scipy_cblas_dgemm", None),
    ("cblas_sgemm", "cblas_dgemm", None),
)

_blas: dict[str, Any] = {"backend": "eigen", "float64": "eigen", "filepath": None, "symbol": None}
_shared: dict[str, Any] = {"numpy_blas_on_nplora_threads": False, "library": None, "symbol": None}

# OpenBLAS >= 0.3.27 lets the caller run its parallel jobs (openblas_set_threads_callback_function).
_CALLBACK_SYMBOLS = (
    "scipy_openblas_set_threads_callback_function64_",
    "scipy_openblas_set_threads_callback_function",
    "openblas_set_threads_callback_function64_",
    "openblas_set_threads_callback_function",
)

BACKENDS = ("nplora", "numpy", "eigen")


def _openblas_is_ilp64(lib: ctypes.CDLL) -> bool | None:
    for name in ("scipy_openblas_get_config64_", "openblas_get_config64_", "scipy_openblas_get_config",
                 "openblas_get_config"):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            return b"USE64BITINT" in (fn() or b"")
    return None


def _numpy_openblas() -> list[tuple[ctypes.CDLL, str]]:
    """The OpenBLAS libraries NumPy has loaded, opened with ctypes, with their paths."""
    try:
        import numpy  # noqa: F401  (its BLAS must be loaded before we look)
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    found = []
    for info in threadpool_info():
        if info.get("internal_api") != "openblas":
            continue
        try:
            found.append((ctypes.CDLL(info.get("filepath")), info.get("filepath")))
        except OSError:
            continue
    return found


def share_threads_with_numpy(enabled: bool = True) -> bool:
    """Run the parallel parts of NumPy's own BLAS calls on nplora's threads (on by default).

    NumPy's OpenBLAS keeps its worker threads spinning for a while after every call, so in a
    program that alternates NumPy and nplora calls those spinning threads take cores from
    nplora's. With this on, OpenBLAS hands its parallel jobs to nplora's pool instead (OpenBLAS's
    caller-managed threading), and the process has one set of threads. NumPy's results are the
    same; only which threads run them changes. ``NPLORA_SHARE_THREADS=0`` turns it off at import.

    Parameters
    ----------
    enabled : bool
        True to hand NumPy's BLAS jobs to nplora's pool, False to give OpenBLAS its own threads back.

    Returns
    -------
    bool
        Whether NumPy's BLAS now runs on nplora's threads (False when NumPy's BLAS is not an
        OpenBLAS with this hook, e.g. OpenBLAS before 0.3.27 or MKL).
    """
    address = _core.blas_threads_callback_address() if enabled else 0
    done = False
    for lib, path in _numpy_openblas():
        for name in _CALLBACK_SYMBOLS:
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = None
            fn(address)
            _shared.update(library=path, symbol=name)
            done = True
            break
    _shared["numpy_blas_on_nplora_threads"] = done and enabled
    return bool(_shared["numpy_blas_on_nplora_threads"])


def _find_numpy_cblas() -> tuple[int, int, bool, str, str] | None:
    """Addresses of cblas_sgemm/dgemm in the OpenBLAS NumPy loaded, with their integer width."""
    for lib, path in _numpy_openblas():
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


def use_blas(backend: str = "nplora", *, float64: str | None = None) -> str:
    """Choose what the core's matrix products run on.

    Parameters
    ----------
    backend : {"nplora", "numpy", "eigen"}
        "nplora": nplora's own packed SIMD kernels on nplora's threads (the default). "numpy": the
        BLAS NumPy links. "eigen": Eigen on nplora's threads. The environment variable
        ``NPLORA_BLAS`` sets it at import.
    float64 : {"nplora", "numpy"} or None
        With backend "nplora", where float64 products go. None (the default) is "nplora": at
        512 x 4096 x 4096 nplora's dgemm took 0.90-1.02x the time of NumPy's OpenBLAS in five
        sets of alternating calls (median 0.95x). "numpy" gives float64 products of more than 64
        rows that match NumPy's own bit for bit; batches of up to 64 rows run on nplora's
        weight-streaming kernels either way.

    Returns
    -------
    str
        The backend in use: "nplora" needs AVX2 or AVX-512 (else "numpy" is tried), and "numpy" a
        BLAS with a CBLAS interface in NumPy (else "eigen").
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if float64 not in (None, "nplora", "numpy"):
        raise ValueError(f"float64 must be None, 'nplora' or 'numpy', got {float64!r}")
    if backend == "nplora" and _core.kernel_isa() == "none":
        backend = "numpy"
    # Under "nplora" NumPy's CBLAS stays set: float64 products may go there.
    found = _find_numpy_cblas() if backend in ("nplora", "numpy") else None
    own = backend == "nplora"
    own_float64 = own and (float64 != "numpy" or found is None)
    _core.set_own_gemm(own, own_float64)
    if found is None:
        _core.set_cblas_gemm(0, 0, False)
        _blas.update(backend="nplora" if own else "eigen", filepath=None, symbol=None)
    else:
        s_addr, d_addr, ilp64, path, symbol = found
        _core.set_cblas_gemm(s_addr, d_addr, ilp64)
        _blas.update(backend=backend, filepath=path, symbol=symbol)
    if own:
        _blas["float64"] = "nplora" if own_float64 else "numpy"
    else:
        _blas["float64"] = _blas["backend"]
    return _blas["backend"]


def blas_info() -> dict[str, Any]:
    """Which product backend the core uses.

    Returns
    -------
    dict
        ``{"backend": "nplora", "numpy" or "eigen", "float64": where float64 products run,
        "filepath": NumPy's BLAS library or None, "symbol": its sgemm symbol or None}``, and
        ``"numpy_blas_on_nplora_threads"``: whether NumPy's BLAS runs its jobs on nplora's
        threads (see `share_threads_with_numpy`).
    """
    return {**_blas, "numpy_blas_on_nplora_threads": _shared["numpy_blas_on_nplora_threads"]}


def get_num_threads() -> int:
    """Threads nplora's own kernels use (products, merge, embeddings, optimizers).

    Returns
    -------
    int
        At least 1.
    """
    return int(_core.get_num_threads())


def set_num_threads(n: int) -> None:
    """Set the threads nplora's kernels use.

    While NumPy's BLAS runs on nplora's threads (`share_threads_with_numpy`), its thread count is
    set to ``n`` too, so both split their work the same way. Otherwise NumPy's BLAS keeps its own
    setting (``threadpoolctl`` or ``OPENBLAS_NUM_THREADS``).

    Parameters
    ----------
    n : int
        Number of threads, >= 1.
    """
    n = check_int("n", n, 1)  # a NumPy integer too
    if n > MAX_THREADS:
        raise ValueError(f"n must be <= {MAX_THREADS}, got {n}")
    _core.set_num_threads(n)
    if _shared["numpy_blas_on_nplora_threads"]:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n, user_api="blas")


use_blas(os.environ.get("NPLORA_BLAS", "nplora"))
share_threads_with_numpy(os.environ.get("NPLORA_SHARE_THREADS", "1") not in ("0", "false", "no", "off"))
