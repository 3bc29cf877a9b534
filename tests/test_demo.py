from __future__ import annotations

import io
import os
import sys
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")

from nplora.cli import main  # noqa: E402
from nplora.demo import run_demo  # noqa: E402

EPOCHS = 3  # enough for the adapters to learn task B, short enough for the suite


def run_quietly(**kwargs: Any) -> tuple[dict[str, Any], str]:
    out = io.StringIO()
    result = run_demo(progress=False, out=out, **{"seed": 0, "epochs": EPOCHS, **kwargs})
    return result, out.getvalue()


def without_timings(result: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in result.items() if key != "seconds"}


@pytest.fixture(scope="module", params=["float32", "float64"])
def demo(request: pytest.FixtureRequest) -> tuple[dict[str, Any], str]:
    return run_quietly(dtype=request.param)


def test_lora_learns_task_b(demo: tuple[dict[str, Any], str]) -> None:
    result, _ = demo
    assert result["accuracy_a_pretrained"] > 0.9
    assert result["accuracy_b_frozen"] < 0.3
    assert result["accuracy_b_lora"] > 0.8
    assert result["accuracy_b_lora"] > result["accuracy_b_frozen"] + 0.5
    assert result["epoch_losses"][-1] < result["epoch_losses"][0]


def test_only_a_small_share_is_trainable(demo: tuple[dict[str, Any], str]) -> None:
    result, _ = demo
    rank = result["rank"]
    assert result["trainable_params"] == rank * (64 + 128) + rank * (128 + 10)
    assert result["frozen_params"] == 128 * 64 + 128 + 10 * 128 + 10
    assert result["trainable_params"] < 0.25 * result["frozen_params"]
    total = result["trainable_params"] + result["frozen_params"]
    assert result["trainable_share"] == pytest.approx(result["trainable_params"] / total)


def test_merge_and_unmerge_agree(demo: tuple[dict[str, Any], str]) -> None:
    result, _ = demo
    assert result["merge_max_abs_diff"] <= 1e-4
    assert result["accuracy_b_merged"] == result["accuracy_b_lora"]
    assert result["unmerge_max_abs_diff"] <= 1e-5
    assert result["accuracy_a_unmerged"] == result["accuracy_a_pretrained"]
    # The adapters are for task B: merged, the model forgets much of task A.
    assert result["accuracy_a_merged"] < result["accuracy_a_pretrained"]


def test_report_prints_the_returned_numbers(demo: tuple[dict[str, Any], str]) -> None:
    result, text = demo
    assert result["task"] in text
    assert f"{result['accuracy_b_frozen']:6.1%}" in text
    assert f"{result['accuracy_b_lora']:6.1%}" in text
    assert f"{result['trainable_params']:,}" in text
    assert f"max |diff| = {result['merge_max_abs_diff']:.2g}" in text
    assert set(result["seconds"]) == {"load", "pretrain", "lora", "merge", "total"}


def test_same_seed_same_numbers(demo: tuple[dict[str, Any], str]) -> None:
    result, _ = demo
    again, _ = run_quietly(dtype=result["dtype"])
    assert without_timings(again) == without_timings(result)
    other, _ = run_quietly(dtype=result["dtype"], seed=1)
    assert other["epoch_losses"] != result["epoch_losses"]


def test_cli_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quiet", "--epochs", "1"]) == 0
    captured = capsys.readouterr()
    for line in ["test accuracy on task A:", "frozen model on task B:", "after LoRA on task B:",
                 "trainable params:", "merged vs unmerged logits: max |diff|",
                 "merged model on task A:", "base model on task A:"]:
        assert line in captured.out
    assert captured.err == ""  # --quiet: no progress bar


def test_progress_bar_changes_nothing_but_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with_bar = run_demo(epochs=1, progress=True)
    captured = capsys.readouterr()
    assert "LoRA fine-tuning" in captured.err
    assert "LoRA fine-tuning" not in captured.out
    without_bar, _ = run_quietly(epochs=1)
    assert without_timings(with_bar) == without_timings(without_bar)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"epochs": 0}, ValueError, "epochs must be >= 1, got 0"),
    ({"rank": 0}, ValueError, "rank must be >= 1, got 0"),
    ({"dtype": np.int32}, TypeError, "dtype must be float32 or float64, got int32"),
])
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        run_quietly(**kwargs)


def test_cli_bad_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quiet", "--epochs", "0"]) == 1
    assert "epochs must be >= 1, got 0" in capsys.readouterr().err
    # More than memory holds: a clean error, not MemoryError's traceback. (Not under the sanitizer
    # run: ASan reports every allocation it refuses, which .ci/sanitize counts as a failure.)
    if "ASAN_OPTIONS" not in os.environ:
        assert main(["demo", "--quiet", "--rank", str(10**13)]) == 1
        assert "nplora demo: error: out of memory" in capsys.readouterr().err


def test_missing_scikit_learn(monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "nplora\[demo\]"'):
        run_quietly()
    assert main(["demo", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert 'pip install "nplora[demo]"' in captured.err
    assert captured.out == ""
