"""Shared fixtures: dtypes with their tolerances, seeded generators, and both product backends."""

from __future__ import annotations

import numpy as np
import pytest

import nplora

# (dtype, rtol, atol): float64 is checked tightly, float32 loosely.
TOLERANCES = {np.float32: (2e-5, 2e-5), np.float64: (1e-12, 1e-12)}


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def tol(dtype):
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=["nplora", "numpy", "eigen"])
def backend(request):
    """Runs a test on each product backend (nplora's kernels, NumPy's BLAS, Eigen), restoring the
    one in use before (NPLORA_BLAS's choice, in a run that sets it)."""
    before = nplora.blas_info()
    # "nplora" here runs float64 on nplora's kernels too (by default it goes to NumPy's dgemm).
    used = nplora.use_blas(request.param, float64="nplora" if request.param == "nplora" else None)
    try:
        if used != request.param:
            pytest.skip(f"backend {request.param} not available here")
        yield request.param
    finally:
        nplora.use_blas(before["backend"],
                        float64=before["float64"] if before["backend"] == "nplora" else None)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "each_backend: takes the backend fixture, so runs on every product backend "
        "whatever NPLORA_BLAS says (a run under another NPLORA_BLAS can leave it out: -m 'not each_backend')")


def pytest_collection_modifyitems(items):
    for item in items:
        if "backend" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.each_backend)
