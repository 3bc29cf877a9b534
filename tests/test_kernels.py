"""The SIMD kernels behind the public API: every tile shape, every instruction set, the swap."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import nplora
from nplora import _core


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 31, 63, 64, 65])
@pytest.mark.parametrize("in_features,out_features", [(37, 13), (64, 64), (130, 71)])
def test_small_batch_kernel_matches_numpy(rng, dtype, n, in_features, out_features):
    # Odd widths exercise the masked tails; n around 64 crosses to the BLAS path.
    weight = rng.standard_normal((out_features, in_features)).astype(dtype)
    bias = rng.standard_normal(out_features).astype(dtype)
    layer = nplora.LoraLinear(weight, bias, r=5, lora_alpha=3, init_lora_weights=False, seed=1).eval()
    x = rng.standard_normal((n, in_features)).astype(dtype)
    expected = x @ weight.T + bias + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer(x), expected, rtol=tol, atol=tol * np.abs(expected).max())


def test_every_instruction_set_gives_the_same_answer():
    # NPLORA_ISA lowers the kernels' instruction set in a fresh process; all must agree.
    script = (
        "import numpy as np, nplora, sys\n"
        "from nplora import _core\n"
        "rng = np.random.default_rng(0)\n"
        "w = rng.standard_normal((53, 91)); b = rng.standard_normal(53)\n"
        "layer = nplora.LoraLinear(w, b, r=3, init_lora_weights=False, seed=2).eval()\n"
        "x = rng.standard_normal((6, 91))\n"
        "ref = x @ w.T + b + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T\n"
        "print(_core.kernel_isa(), float(np.abs(layer(x) - ref).max()))\n"
    )
    seen = {}
    for isa in ("avx512", "avx2", "none"):
        env = dict(os.environ, NPLORA_ISA=isa)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        seen[out[0]] = float(out[1])
    assert all(err < 1e-11 for err in seen.values()), seen
    assert "none" in seen


def test_swap_is_one_update_with_the_right_result(rng, dtype):
    weight = rng.standard_normal((40, 30)).astype(dtype)
    original = weight.copy()
    first = nplora.LoraLinear(weight, r=3, lora_alpha=6, init_lora_weights=False, seed=1)
    second = nplora.LoraLinear(weight, r=5, lora_alpha=2, init_lora_weights=False, seed=2)
    first.merge()
    _core.swap_merged(first._core, second._core)
    assert not first.merged and second.merged
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(weight, original + second.delta_weight(), rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="not merged"):
        _core.swap_merged(first._core, second._core)
    other = nplora.LoraLinear(weight.copy(), r=2)
    with pytest.raises(ValueError, match="same weight"):
        _core.swap_merged(second._core, other._core)
