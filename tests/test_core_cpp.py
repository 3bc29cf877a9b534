"""Builds the C++ core's own test program with CMake and runs it through ctest (no Python in it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("simd", ["ON", "OFF"])
def test_cpp_core_tests_pass(tmp_path, simd):
    # OFF builds the core as on a CPU without the x86 kernels (e.g. aarch64): Eigen products only.
    cmake = shutil.which("cmake")
    if cmake is None or not (ROOT / "cpp").is_dir():
        pytest.skip("cmake or the source tree is not available")
    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DNPLORA_BUILD_PYTHON=OFF",
                 "-DNPLORA_BUILD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release", f"-DNPLORA_SIMD_KERNELS={simd}",
                 f"-DPython_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    env = dict(os.environ)
    result = subprocess.run(configure, capture_output=True, text=True, env=env)
    if result.returncode != 0 and "Eigen3" in result.stdout + result.stderr:
        pytest.skip("Eigen is not installed for a standalone build (pip install cmeel-eigen)")
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([cmake, "--build", str(build), "-j2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(["ctest", "--output-on-failure"], cwd=build, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout
