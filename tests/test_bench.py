"""`nplora bench` runs every row and checks each against NumPy; no timing is asserted here."""

from __future__ import annotations

import contextlib
import io
import json
import statistics

import numpy as np
import pytest

import nplora
from nplora import bench
from nplora.cli import main

ROWS = {
    "forward_f32_b1", "forward_f32_b2", "forward_f32_b8", "forward_f32_b32", "forward_f32_b512",
    "forward_f64_b8", "forward_f64_b512", "backward_f32_b512", "merge", "unmerge", "swap",
    "mixed_64", "mixed_64_shared", "embedding", "limit_gemm", "limit_gemv",
}


@pytest.fixture(scope="module")
def quick_json() -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["bench", "--quick", "--json", "--repeats", "2", "--no-torch"])
    assert status == 0
    return json.loads(out.getvalue())


def test_json_has_every_row_checked_and_timed(quick_json: dict) -> None:
    rows = {row["id"]: row for row in quick_json["rows"]}
    assert set(rows) == ROWS
    assert quick_json["failed"] == []
    for row in rows.values():
        assert row["numpy_ms"] > 0
        assert row["others_cpu_share"] is None or 0 <= row["others_cpu_share"] <= 1
        if row["id"].startswith("limit_"):
            assert row["nplora_ms"] is None and row["check"] == "n/a"
            assert row["numpy_rate"] > 0
        else:
            assert row["check"] == "ok", row
            assert row["max_rel_error"] <= 1e-4
            assert row["nplora_ms"] > 0 and row["ratio"] > 0 and row["nplora_rate"] > 0
            assert row["target"] is not None and isinstance(row["target_met"], bool)
            assert row["torch_ms"] is None


def test_json_describes_the_machine_and_settings(quick_json: dict) -> None:
    machine, settings = quick_json["machine"], quick_json["settings"]
    for key in ("date", "cpu", "os_cpu_count", "numpy", "numpy_blas", "nplora", "nplora_threads",
                "nplora_blas"):
        assert key in machine
    assert settings["size"] == bench.QUICK_SIZE and settings["repeats"] == 2
    assert settings["torch"] is False
    assert quick_json["targets_total"] == 14
    assert 0 <= quick_json["targets_met"] <= quick_json["targets_total"]


def test_limit_shares_are_set_for_float32_forward_rows(quick_json: dict) -> None:
    for row in quick_json["rows"]:
        if row["id"].startswith("forward_f32"):
            assert row["limit"] in ("gemm", "gemv") and row["limit_share"] > 0
        else:
            assert row["limit_share"] is None


def test_weight_streaming_rows_time_their_own_gemv(quick_json: dict) -> None:
    # Batches below 512 are held against NumPy's W @ v timed in the same alternation (same W, same
    # moment), not against the separate limit row; batch 512 against the GEMM limit row.
    rows = {row["id"]: row for row in quick_json["rows"]}
    gemm = rows["limit_gemm"]["numpy_rate"]
    streaming = [row for key, row in rows.items() if key.startswith("forward_f32") and row["limit"] == "gemv"]
    assert streaming
    for row in streaming:
        assert row["limit_ms"] > 0 and len(row["samples_ms"]["limit"]) == len(row["samples_ms"]["nplora"])
        pairs = zip(row["samples_ms"]["limit"], row["samples_ms"]["nplora"])
        assert row["limit_share"] == pytest.approx(statistics.median(t / u for t, u in pairs), rel=1e-9)
    large = [row for row in rows.values() if row["id"].startswith("forward_f32") and row["limit"] == "gemm"]
    for row in large:
        assert row["limit_ms"] is None
        assert row["limit_share"] == pytest.approx(row["nplora_rate"] / gemm, rel=1e-9)


def test_ratio_is_the_median_of_round_by_round_ratios(quick_json: dict) -> None:
    # Each round's NumPy sample over the nplora sample beside it, then the median: not the ratio of
    # two medians, whose samples may come from moments the shared machine ran at other speeds.
    for row in quick_json["rows"]:
        if row["nplora_ms"] is None:
            continue
        pairs = zip(row["samples_ms"]["numpy"], row["samples_ms"]["nplora"])
        assert row["ratio"] == pytest.approx(statistics.median(t / u for t, u in pairs), rel=1e-12)


def test_header_says_where_float32_and_float64_products_run() -> None:
    from nplora.bench_harness import products_line
    lib = "/site/numpy.libs/libscipy_openblas64_-x.so"
    assert products_line({"backend": "nplora", "float64": "nplora", "filepath": lib}) == (
        "products (float32 and float64) on nplora's kernels")  # NumPy's library unused: not named
    assert products_line({"backend": "nplora", "float64": "numpy", "filepath": lib}) == (
        "products on nplora's kernels, float64 ones on NumPy's BLAS (libscipy_openblas64_-x.so)")
    assert products_line({"backend": "eigen", "float64": "eigen", "filepath": None}) == (
        "products (float32 and float64) on Eigen")


def test_rounds_alternate_which_side_goes_first() -> None:
    calls: list[str] = []

    def side(name: str) -> bench.Side:
        return bench.Side(lambda: calls.append(name) or np.zeros(3))

    case = bench.Case(id="order", kernel="order", shape="-", dtype=np.dtype(np.float64),
                      numpy=side("numpy"), nplora=side("nplora"), limit_side=side("limit"),
                      flops=1.0, target=1.0)
    from nplora.bench_harness import measure
    row = measure(case, repeats=4, min_sample=0.0)
    # 2 result checks (numpy's reference, nplora's) and 2 warm-up calls per side come first.
    timed = calls[2 + 2 * 3:]
    assert timed == ["numpy", "nplora", "limit", "limit", "nplora", "numpy"] * 2
    assert row.calls_per_sample == {"numpy": 1, "nplora": 1, "limit": 1}


def test_table_prints_header_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    threads = nplora.get_num_threads()
    status = main(["bench", "--quick", "--size", "128", "--repeats", "1", "--threads", "1",
                   "--no-torch"])
    printed = capsys.readouterr().out
    assert status == 0
    assert nplora.get_num_threads() == threads  # --threads lasts for the run only
    assert "machine:" in printed and "NumPy" in printed and "BLAS" in printed
    assert "threads on every side: 1" in printed
    assert "targets met: " in printed and " / 14" in printed
    assert "FAILED" not in printed


def test_a_wrong_result_fails_the_row_and_the_command(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    def broken_cases(size: int, r: int, vocab: int, torch_mod: object) -> object:
        x = np.ones((4, size), np.float32)
        yield bench.Case(id="broken", kernel="broken", shape="-", dtype=np.dtype(np.float32),
                         numpy=bench.Side(lambda: x * 2), nplora=bench.Side(lambda: x * 2.001),
                         flops=1.0, target=1.0)

    monkeypatch.setattr(bench, "all_cases", broken_cases)
    status = main(["bench", "--quick", "--size", "8", "--repeats", "1", "--no-torch"])
    printed = capsys.readouterr().out
    assert status == 1
    assert "FAILED correctness checks: broken" in printed


@pytest.mark.parametrize("option", ["--size", "--rank", "--repeats", "--threads"])
def test_non_positive_options_are_errors(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--no-torch", option, "0"]) == 1
    assert "must be >= 1" in capsys.readouterr().err
