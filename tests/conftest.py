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
    """Runs a test on each product backend (nplora's kernels, NumPy's BLAS, Eigen), restoring the default."""
    # "nplora" here runs float64 on nplora's kernels too (by default it goes to NumPy's dgemm).
    used = nplora.use_blas(request.param, float64="nplora" if request.param == "nplora" else None)
    if used != request.param:
        pytest.skip(f"backend {request.param} not available here")
    yield request.param
    nplora.use_blas("nplora")
