"""Reliability: no data lost on failure, threads that get errors instead of races, pickling.

1. An exception part-way through merge_adapter/unmerge_adapter, a backward or an optimizer step
   leaves the weights (and the optimizer state) as they were; saving is atomic; a killed
   ``nplora merge`` leaves its inputs untouched and nothing that looks complete (the kill itself
   is test_merge_cli's script, reused); NaN/Inf from training is caught by ``safe_merge=True``.
2. Eval-mode forward on shared layers from many threads gives one thread's results; calls that
   change a layer raise RuntimeError while another thread uses it, and never tear a result.
3. Layers, models and configs survive pickle, copy.deepcopy and a multiprocessing hand-off.
"""

from __future__ import annotations

import copy
import hashlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nplora
import test_merge_cli as merge_tests
from nplora import merge_cli
from nplora.safetensors_io import INDEX_NAME, open_weights
from nplora.safetensors_write import save_weights

PATHS = [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]


def make_weights(dtype: Any = np.float64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {f"{p}.weight": rng.standard_normal((12, 10)).astype(dtype) for p in PATHS}
    weights["model.embed_tokens.weight"] = rng.standard_normal((20, 10)).astype(dtype)
    return weights


def make_model(dtype: Any = np.float64, seed: int = 0) -> nplora.LoraModel:
    config = nplora.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "embed_tokens"],
                               init_lora_weights=False)
    return nplora.LoraModel(make_weights(dtype, seed), config, seed=seed)


def snapshot(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in weights.items()}


class FailingCore:
    """Wraps a layer's C++ core; the named method raises `error` instead of running."""

    def __init__(self, core: Any, method: str, error: BaseException) -> None:
        self._core, self._method, self._error = core, method, error

    def __getattr__(self, name: str) -> Any:
        if name == self._method:
            def fail(*args: Any) -> None:
                raise self._error
            return fail
        return getattr(self._core, name)


# ============================================================================ 1. no data lost
@pytest.mark.parametrize("error", [MemoryError("injected"), KeyboardInterrupt()], ids=["MemoryError", "Ctrl-C"])
@pytest.mark.parametrize("fail_at", [0, 2, 4])
def test_merge_adapter_failing_part_way_leaves_the_weights(error: BaseException, fail_at: int) -> None:
    model = make_model()
    before = snapshot(model.base_weights)
    layer = list(model.layers().values())[fail_at]
    real = layer._core
    layer._core = FailingCore(real, "merge", error)
    with pytest.raises(type(error)):
        model.merge_adapter()
    layer._core = real
    assert not any(layer.merged for layer in model.layers().values())
    for key, value in before.items():  # exact where never merged, to rounding where rolled back
        np.testing.assert_allclose(model.base_weights[key], value, rtol=0, atol=1e-13, err_msg=key)
    model.merge_adapter()  # and the model still works
    assert all(layer.merged for layer in model.layers().values())


def test_unmerge_adapter_failing_part_way_keeps_every_module_merged() -> None:
    model = make_model()
    model.merge_adapter()
    merged = snapshot(model.base_weights)
    layer = list(model.layers().values())[3]
    real = layer._core
    layer._core = FailingCore(real, "unmerge", RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        model.unmerge_adapter()
    layer._core = real
    assert all(layer.merged for layer in model.layers().values())
    for key, value in merged.items():
        np.testing.assert_allclose(model.base_weights[key], value, rtol=0, atol=1e-13, err_msg=key)


def test_safe_merge_checks_every_module_before_merging_any() -> None:
    # A NaN in the third module's B: nothing may be merged, not even the first two.
    model = make_model()
    before = snapshot(model.base_weights)
    list(model.layers().values())[2].lora_B[0, 0] = np.nan
    with pytest.raises(ValueError, match="q_proj.weight: the adapter seems to be broken; nothing was merged"):
        model.merge_adapter(safe_merge=True)
    assert not any(layer.merged for layer in model.layers().values())
    for key, value in before.items():
        assert np.array_equal(model.base_weights[key], value), key
    with pytest.raises(ValueError, match="NaNs or infinities"):
        model.merge_and_unload(safe_merge=True)
    model.merge_adapter()  # without the check (PEFT's default) the NaN goes in
    assert np.isnan(model.base_weights[f"{PATHS[2]}.weight"]).any()


def test_nan_or_inf_from_a_training_step_is_caught_by_safe_merge() -> None:
    weight = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    layer = nplora.LoraLinear(weight, r=2, init_lora_weights=False, seed=0)
    pristine = weight.copy()
    optimizer = nplora.SGD(layer, lr=1e38)
    layer(np.ones((3, 5), np.float32))
    layer.backward(np.full((3, 6), 100, np.float32))
    optimizer.step()  # a diverged step: float32 overflows
    assert not np.isfinite(layer.lora_B).all() or not np.isfinite(layer.lora_A).all()
    with pytest.raises(ValueError, match="NaNs or infinities detected .* left unchanged"):
        layer.merge(safe_merge=True)
    assert not layer.merged and np.array_equal(weight, pristine)
    assert not np.isfinite(layer.merged_weight()).all()  # merging without the check would break it


@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()], ids=["RuntimeError", "Ctrl-C"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_an_optimizer_step_failing_part_way_changes_nothing(monkeypatch: pytest.MonkeyPatch, kind: str,
                                                            error: BaseException) -> None:
    def setup() -> tuple[nplora.LoraModel, nplora.Optimizer]:
        model = make_model(np.float32)
        model.train()
        optimizer = nplora.AdamW(model, lr=0.1) if kind == "adamw" else nplora.SGD(model, lr=0.1, momentum=0.9)
        for path in model:
            layer = model[path]
            layer(np.ones((2, 10), np.float32) if path != "model.embed_tokens" else np.arange(4))
            layer.backward(np.ones((2, 12) if path != "model.embed_tokens" else (4, 10), np.float32))
        optimizer.step()  # one good step first: the state is not trivially zero
        return model, optimizer

    model, optimizer = setup()
    state = lambda: [a.copy() for _, a in model.named_parameters()] + [  # noqa: E731
        a.copy() for s in getattr(optimizer, "state", []) for a in s] + [
        b.copy() for b in getattr(optimizer, "momentum_buffers", [])]
    before, count = state(), optimizer.step_count
    real = nplora.optim._core
    name = "adamw_step" if kind == "adamw" else "sgd_step"
    calls = [0]

    class Flaky:
        def __getattr__(self, attr: str) -> Any:
            function = getattr(real, attr)
            if attr != name:
                return function

            def step(*args: Any) -> None:
                calls[0] += 1
                if calls[0] == 4:  # the fourth of five parameter arrays
                    raise error
                function(*args)
            return step

    monkeypatch.setattr(nplora.optim, "_core", Flaky())
    with pytest.raises(type(error)):
        optimizer.step()
    monkeypatch.setattr(nplora.optim, "_core", real)
    assert calls[0] == 4 and optimizer.step_count == count
    for got, want in zip(state(), before):
        assert np.array_equal(got, want)
    optimizer.step()  # the retried step is the step that would have been
    reference, reference_optimizer = setup()
    reference_optimizer.step()
    for (_, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        assert np.array_equal(got, want)


def test_a_failed_backward_changes_nothing() -> None:
    weight = np.random.default_rng(0).standard_normal((6, 5))
    layer = nplora.LoraLinear(weight, r=2, init_lora_weights=False, seed=0)
    layer(np.ones((3, 5)))
    layer.backward(np.ones((3, 6)))
    before = [a.copy() for a in (layer.weight, layer.lora_A, layer.lora_B, layer.lora_A_grad, layer.lora_B_grad)]
    layer(np.ones((3, 5)))  # the last backward used up what the first forward kept
    with pytest.raises(ValueError, match="grad_y must have shape"):
        layer.backward(np.ones((4, 6)))
    assert layer._batch_shape == (3,)  # a failed backward leaves the forward's state for a retry
    layer.merge()
    layer(np.ones((3, 5)))
    with pytest.raises(RuntimeError, match="merged"):
        layer.backward(np.ones((3, 6)))
    layer.unmerge()
    after = (layer.weight, layer.lora_A, layer.lora_B, layer.lora_A_grad, layer.lora_B_grad)
    for got, want in zip(after[1:], before[1:]):
        assert np.array_equal(got, want)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-14)


def test_leaving_training_mode_by_assignment_frees_the_kept_activations() -> None:
    # `layer.training = False` is `layer.eval()`: what backward needed is dropped, so concurrent
    # eval-mode forwards never free it from several threads at once.
    layer = nplora.LoraLinear(np.ones((3, 4)), r=1)
    layer(np.ones((2, 4)))
    layer.training = False
    assert layer.training is False
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(np.ones((2, 3)))


# ------------------------------------------------------------------ saving
def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_save_leaves_the_previous_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.numpy

    model = make_model(np.float32)
    model.save_adapter(tmp_path / "adapter")
    saved = file_bytes(tmp_path / "adapter")
    model["model.layers.0.self_attn.q_proj"].lora_A[...] = 7

    def half_then_fail(tensors: dict, path: str, metadata: dict | None = None) -> None:
        Path(path).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_fail)
    with pytest.raises(OSError, match="injected"):
        model.save_adapter(tmp_path / "adapter")
    assert file_bytes(tmp_path / "adapter") == saved  # no temporary file left either
    monkeypatch.undo()
    model.peft_config["default"].r = 0  # a config that no longer validates
    with pytest.raises(ValueError, match="r must be"):
        model.save_adapter(tmp_path / "adapter")
    assert file_bytes(tmp_path / "adapter") == saved
    # Valid, but not JSON: this failed only after the new weights had replaced the old ones.
    model.peft_config["default"].r = 3
    model.peft_config["default"].extra["note"] = np.float32(1.5)
    with pytest.raises(TypeError, match="cannot be written as JSON"):
        model.save_adapter(tmp_path / "adapter")
    assert file_bytes(tmp_path / "adapter") == saved


def test_a_failed_save_of_several_adapters_writes_none(tmp_path: Path) -> None:
    # The second adapter's config could not be written as JSON after the first's files had been
    # replaced: the folder held a new default beside the old "second".
    model = make_model(np.float32)
    config = nplora.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False)
    model.add_adapter("second", config, seed=1)
    model.save_adapter(tmp_path)
    saved = file_bytes(tmp_path)
    model["model.layers.0.self_attn.q_proj"].lora_A[...] = 7
    model.peft_config["second"].extra["note"] = np.float32(1.5)
    with pytest.raises(TypeError, match="cannot be written as JSON"):
        model.save_adapter(tmp_path)
    assert file_bytes(tmp_path) == saved


def test_saved_files_get_the_umasks_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        make_model(np.float32).save_adapter(tmp_path)
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


KILLED_SAVE = r"""
import os, signal, sys
import numpy as np, nplora, safetensors.numpy
from nplora.safetensors_io import open_weights

model = nplora.load_adapter(sys.argv[1], open_weights(sys.argv[2]))
next(model.named_parameters())[1][...] = 7

def dying(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"partial")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.numpy.save_file = dying
model.save_adapter(sys.argv[1])
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_save_killed_part_way_leaves_the_previous_adapter(tmp_path: Path) -> None:
    model = make_model(np.float32)
    save_weights(tmp_path / "base.safetensors", model.base_weights)
    model.save_adapter(tmp_path / "adapter")
    saved = file_bytes(tmp_path / "adapter")
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "adapter"),
                           str(tmp_path / "base.safetensors")], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    after = file_bytes(tmp_path / "adapter")
    assert {k: v for k, v in after.items() if k in saved} == saved
    assert all(name.startswith(".") for name in set(after) - set(saved))  # a hidden temporary at most
    loaded = dict(nplora.load_adapter(tmp_path / "adapter", model.base_weights).named_parameters())
    for name, want in model.named_parameters():
        assert np.array_equal(loaded[name], want), name


# ------------------------------------------------------------------ nplora merge, killed
def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


KILL_BEFORE_RENAME = r"""
import os, signal, sys
from nplora import merge_cli

merge_cli._move_into_place = lambda tmp, out: os.kill(os.getpid(), signal.SIGKILL)
merge_cli.merge(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, overwrite=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("when", ["first-write", "mid-write", "before-rename"])
@pytest.mark.parametrize("previous_output", [False, True])
def test_a_killed_merge_leaves_the_inputs_untouched(tmp_path: Path, when: str, previous_output: bool) -> None:
    # test_merge_cli's kill script (SIGKILL on the 12th block written), moved to other moments.
    merge_tests.write_model(tmp_path / "base", merge_tests.base_tensors(np.float32))
    merge_tests.make_adapter(tmp_path / "adapter")
    if previous_output:
        merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    inputs = {name: tree_hashes(tmp_path / name) for name in ("base", "adapter", "out") if (tmp_path / name).exists()}
    script = {"first-write": merge_tests.KILL_SCRIPT.replace("calls[0] == 12", "calls[0] == 1"),
              "mid-write": merge_tests.KILL_SCRIPT, "before-rename": KILL_BEFORE_RENAME}[when]
    if previous_output and when != "before-rename":
        script = script.replace("progress=False)", "progress=False, overwrite=True)")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "base"), str(tmp_path / "adapter"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    # The inputs (and a previous output) are byte for byte as they were; nothing else looks complete.
    assert {name: tree_hashes(tmp_path / name) for name in inputs} == inputs
    assert (tmp_path / "out").exists() == previous_output
    for partial in merge_tests.leftovers(tmp_path):
        assert partial.startswith("out.tmp-")
        if when != "before-rename":
            assert INDEX_NAME not in os.listdir(tmp_path / partial)


# ============================================================================ 2. threads
def mixed(model: nplora.LoraModel, path: str) -> Any:
    return lambda x, ids: model.forward(path, x, adapter_ids=ids)


def test_concurrent_forwards_on_shared_layers_match_one_thread() -> None:
    model = make_model(np.float32)
    model.add_adapter("other", nplora.LoraConfig(r=5, target_modules=["q_proj"], init_lora_weights=False), seed=3)
    model.eval()
    for name in ("default", "other"):
        for layer in model.layers(name).values():
            layer.eval()
    rng = np.random.default_rng(0)
    jobs = []  # (callable, args): linear layers at small and large batches, embeddings, mixed batches
    for n in (1, 3, 64, 300):
        x = rng.standard_normal((n, 10)).astype(np.float32)
        for path in PATHS:
            jobs.append((model[path], (x,)))
        jobs.append((mixed(model, PATHS[0]), (x, rng.integers(-1, 2, n))))
        jobs.append((mixed(model, "model.embed_tokens"), (rng.integers(0, 20, (n, 2)), rng.integers(-1, 1, (n, 2)))))
    expected = [fn(*args) for fn, args in jobs]
    errors: list[BaseException] = []
    mismatches: list[int] = []
    start = threading.Barrier(6)
    # nplora's kernels and NumPy's BLAS give the same bits whatever the threads do (each element of
    # a product is summed in one fixed order, whoever computes it). The Eigen fallback splits a product
    # over nplora's pool, which a call finding the pool busy runs alone: the same sums, rounded in
    # another order (as for set_num_threads(1) against 2), so within a few float32 ulps.
    exact = nplora.blas_info()["backend"] in ("nplora", "numpy")

    def same(got: np.ndarray, want: np.ndarray) -> bool:
        return np.array_equal(got, want) if exact else np.allclose(got, want, rtol=1e-5, atol=1e-5)

    def worker(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(len(jobs) * 5) % len(jobs)
        start.wait()
        try:
            for k in order:
                fn, args = jobs[k]
                if not same(fn(*args), expected[k]):
                    mismatches.append(int(k))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches


class Holder:
    """Holds a guard in another thread (a call in flight there) until release()."""

    def __init__(self, enter: Any) -> None:
        self._entered, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(enter,))
        self._thread.start()
        assert self._entered.wait(10)

    def _run(self, enter: Any) -> None:
        with enter():
            self._entered.set()
            self._release.wait(10)

    def release(self) -> None:
        self._release.set()
        self._thread.join()


def test_changes_refuse_while_another_thread_reads_and_reads_run_alongside() -> None:
    model = make_model(np.float32)
    layer = model[PATHS[0]]
    optimizer = nplora.AdamW(model)
    # Over raw pairs of the layer's own arrays: they lead to its guard (a step tore concurrent merges).
    pairs = nplora.SGD([(layer.lora_A, layer.lora_A_grad)], lr=0.1)
    x = np.ones((2, 10), np.float32)
    layer.eval()
    expected = layer(x)
    reader = Holder(lambda: layer._guard)  # an eval-mode forward in flight in another thread
    try:
        assert np.array_equal(layer(x), expected)  # eval forwards run together
        busy = "in use by another thread"
        for call in (layer.merge, layer.unmerge, layer.train, layer.eval, layer.zero_grad, optimizer.step,
                     model.merge_adapter, optimizer.zero_grad, pairs.step):
            with pytest.raises(RuntimeError, match=busy):
                call()
        with pytest.raises(RuntimeError, match=busy):
            layer.adapter_enabled = False
        a = layer.lora_A.copy()
        for name in ("lora_A", "lora_B", "lora_A_grad"):  # copied in while the forward read A
            with pytest.raises(RuntimeError, match=busy):
                setattr(layer, name, np.zeros_like(getattr(layer, name)))
        assert np.array_equal(layer.lora_A, a)
        assert not layer.merged and layer.training is False
    finally:
        reader.release()
    layer.train()
    layer(x)
    layer.backward(np.ones((2, 12), np.float32))
    optimizer.step()
    layer.merge()
    layer.unmerge()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_can_change_a_layer_another_thread_was_reading() -> None:
    # The other thread does not exist in the child, but its mark stayed in the guard: every merge,
    # train() or step on that layer raised "in use by another thread" there, forever.
    layer = nplora.LoraLinear(np.ones((6, 4)), r=2, init_lora_weights=False, seed=0).eval()
    reader = Holder(lambda: layer._guard)
    try:
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():  # Python 3.12+ warns of fork() beside threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: report, then leave without running pytest's teardown
            try:
                layer.merge()
                layer.unmerge()
                layer.train()
                message = b"ok"
            except BaseException as error:
                message = repr(error).encode()[:200]
            os.write(write_end, message)
            os._exit(0)
        os.close(write_end)
        message = os.read(read_end, 200)
        os.close(read_end)
        os.waitpid(pid, 0)
        assert message == b"ok"
        with pytest.raises(RuntimeError, match="in use by another thread"):
            layer.merge()  # in the parent the reader is still there
    finally:
        reader.release()


def test_mixed_batches_in_training_mode_run_side_by_side() -> None:
    # Dropping a kept forward took each layer to itself, so two threads' mixed batches refused
    # each other in training mode (a model's default); they only read the layers.
    model = make_model(np.float32)
    layer = model[PATHS[0]]
    x = np.ones((2, 10), np.float32)
    reader = Holder(lambda: layer._guard)  # another thread's mixed batch in flight
    try:
        assert layer.training
        model.forward(PATHS[0], x, adapter_ids=[0, -1])
    finally:
        reader.release()


def test_a_raw_pair_over_a_memoryview_needs_no_layer() -> None:
    # Looking its buffer up among the layers' cores raised "cannot hash writable memoryview".
    buffer = memoryview(bytearray(64))
    param, grad = np.frombuffer(buffer, np.float64, 4), np.ones(4)
    param[:] = 1
    nplora.SGD([(param, grad)], lr=0.1).step()
    np.testing.assert_allclose(param, 0.9)


def assert_merge_refused_while_read(merged: nplora.LoraLinear, read: nplora.LoraLinear) -> None:
    """`merged.merge()` is refused while another thread reads `read` (an eval forward in flight)."""
    reader = Holder(lambda: read._guard)
    try:
        with pytest.raises(RuntimeError, match="in use by another thread"):
            merged.merge()
    finally:
        reader.release()


def test_layers_over_overlapping_views_of_one_buffer_share_a_guard() -> None:
    # A fused QKV weight and a layer over its q rows: a merge through one changes what the other
    # reads, but their guards were keyed by (address, size) and never saw each other.
    fused = np.ones((12, 4))
    whole = nplora.LoraLinear(fused, r=2, init_lora_weights=False, seed=0).eval()
    rows = nplora.LoraLinear(fused[4:8], r=2, init_lora_weights=False, seed=1)
    apart = nplora.LoraLinear(np.ones((12, 4)), r=2, seed=2)  # another buffer: not held up
    reader = Holder(lambda: whole._guard)  # an eval forward on the whole weight in flight
    try:
        with pytest.raises(RuntimeError, match="in use by another thread"):
            rows.merge()
        apart.merge()
    finally:
        reader.release()
    assert np.all(fused == 1)
    rows.merge()
    assert not np.all(fused[4:8] == 1)
    # Built the other way round (the views first, then the whole): the same.
    buffer = np.ones((12, 4))
    q_rows = nplora.LoraLinear(buffer[0:4], r=2, seed=0).eval()
    k_rows = nplora.LoraLinear(buffer[4:8], r=2, seed=0).eval()
    whole = nplora.LoraLinear(buffer, r=2, init_lora_weights=False, seed=0)
    assert_merge_refused_while_read(whole, k_rows)
    assert q_rows._guard.weight is whole._guard.weight
    # Memory no ndarray owns, reached through different objects: two memoryviews of one buffer.
    raw = bytearray(np.ones((12, 4)).tobytes())
    first = nplora.LoraLinear(np.frombuffer(memoryview(raw), np.float64).reshape(12, 4), r=2,
                              init_lora_weights=False, seed=0)
    rows_of_second = nplora.LoraLinear(np.frombuffer(memoryview(raw), np.float64).reshape(12, 4)[4:8],
                                       r=2, seed=1).eval()
    assert_merge_refused_while_read(first, rows_of_second)


def test_reads_refuse_while_another_thread_changes_the_weight() -> None:
    model = make_model(np.float32)
    model.add_adapter("other", nplora.LoraConfig(r=2, target_modules=["q_proj"]), seed=1)
    model.eval()
    for layer in model.layers("other").values():
        layer.eval()
    x = np.ones((2, 10), np.float32)
    layer, sibling = model[PATHS[0]], model.layers("other")[PATHS[0]]  # two adapters over one weight
    writer = Holder(lambda: layer._guard.writing_weight("merge"))  # a merge in flight
    try:
        for call in (lambda: layer(x), lambda: sibling(x), layer.delta_weight, layer.merged_weight,
                     lambda: model.forward(PATHS[0], x, adapter_ids=[0, 1]), lambda: pickle.dumps(layer)):
            with pytest.raises(RuntimeError, match=r"is being modified by another thread \(merge\)"):
                call()
        model[PATHS[1]](x)  # another module's weight is free
    finally:
        writer.release()
    trainer = Holder(lambda: layer._guard.writing_layer("run backward"))  # this layer's own state
    try:
        with pytest.raises(RuntimeError, match=r"being modified by another thread \(run backward\)"):
            layer(x)
        with pytest.raises(RuntimeError, match="by another thread"):
            layer.merge()
        sibling(x)  # the other adapter only reads the shared weight: allowed
        with pytest.raises(RuntimeError, match="in use by another thread"):
            sibling.merge()  # but writing that weight is not
    finally:
        trainer.release()


def test_racing_merges_and_forwards_never_tear_a_result() -> None:
    weight = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    layer = nplora.LoraLinear(weight, r=8, lora_alpha=64, init_lora_weights=False, seed=0).eval()
    x = np.random.default_rng(1).standard_normal((32, 256)).astype(np.float32)
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    layer.unmerge()
    stop = time.monotonic() + 1.0
    counts = {"forward": 0, "refused": 0, "merge": 0}
    torn: list[float] = []
    unexpected: list[BaseException] = []

    def forwards() -> None:
        while time.monotonic() < stop:
            try:
                y = layer(x)
            except RuntimeError:
                counts["refused"] += 1
                continue
            except BaseException as error:  # noqa: BLE001
                unexpected.append(error)
                return
            counts["forward"] += 1
            time.sleep(0.001)  # (continuous readers would refuse every merge: leave it windows)
            if not (np.allclose(y, unmerged, atol=1e-3) or np.allclose(y, merged, atol=1e-3)):
                torn.append(float(np.abs(y - unmerged).max()))

    def merges() -> None:
        while time.monotonic() < stop:
            try:
                layer.merge() if not layer.merged else layer.unmerge()
                counts["merge"] += 1
            except RuntimeError:
                counts["refused"] += 1
            except BaseException as error:  # noqa: BLE001
                unexpected.append(error)
                return

    threads = [threading.Thread(target=forwards) for _ in range(3)] + [threading.Thread(target=merges)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not unexpected and not torn, (unexpected, torn[:3])
    assert counts["forward"] > 0 and counts["merge"] > 0


def test_threads_training_their_own_layers_match_training_alone() -> None:
    def train(layer: nplora.LoraLinear, seed: int) -> None:
        rng = np.random.default_rng(seed)
        optimizer = nplora.AdamW(layer, lr=1e-2)
        for _ in range(20):
            x = rng.standard_normal((16, 32))
            optimizer.zero_grad()
            layer(x)
            layer.backward(rng.standard_normal((16, 24)))
            optimizer.step()

    def layers() -> list[nplora.LoraLinear]:
        return [nplora.LoraLinear(np.random.default_rng(k).standard_normal((24, 32)), r=4, seed=k) for k in range(4)]

    alone, together = layers(), layers()
    for k, layer in enumerate(alone):
        train(layer, k)
    threads = [threading.Thread(target=train, args=(layer, k)) for k, layer in enumerate(together)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exact = nplora.blas_info()["backend"] in ("nplora", "numpy")  # (see the test above)
    for a, b in zip(alone, together):
        for p, q in ((a.lora_A, b.lora_A), (a.lora_B, b.lora_B)):
            assert np.array_equal(p, q) if exact else np.allclose(p, q, rtol=1e-10, atol=1e-12)


# ============================================================================ 3. pickle and copy
LAYER_CASES = {
    "linear-f32": lambda w: nplora.LoraLinear(w.astype(np.float32), r=3, init_lora_weights=False, seed=1),
    "linear-f64-bias-rslora": lambda w: nplora.LoraLinear(w, np.arange(6.0), r=2, lora_alpha=5, use_rslora=True,
                                                          init_lora_weights=False, seed=2),
    "linear-fan_in_fan_out": lambda w: nplora.LoraLinear(w.T.copy(), r=4, fan_in_fan_out=True,
                                                         init_lora_weights="gaussian", seed=3),
    "linear-dropout": lambda w: nplora.LoraLinear(w, r=2, lora_dropout=0.3, init_lora_weights=False, seed=4),
    "embedding-padding": lambda w: nplora.LoraEmbedding(w, r=2, padding_idx=1, init_lora_weights=False, seed=5),
}
STATES = ["fresh", "trained", "merged", "eval", "disabled"]
COPIES = {f"pickle-{p}": (lambda obj, p=p: pickle.loads(pickle.dumps(obj, protocol=p)))
          for p in range(2, pickle.HIGHEST_PROTOCOL + 1)}
COPIES.update({"deepcopy": copy.deepcopy, "copy": copy.copy})


def layer_input(layer: nplora.LoraLayerBase, n: int = 4) -> np.ndarray:
    if isinstance(layer, nplora.LoraEmbedding):
        return np.arange(n) % layer.num_embeddings
    return np.random.default_rng(9).standard_normal((n, layer.in_features)).astype(layer.dtype)


def prepare(kind: str, state: str) -> nplora.LoraLayerBase:
    layer = LAYER_CASES[kind](np.random.default_rng(0).standard_normal((6, 5)))
    x = layer_input(layer)
    if state in ("trained", "merged", "eval", "disabled"):
        optimizer = nplora.AdamW(layer, lr=0.05)
        for _ in range(2):
            out = layer(x)
            layer.backward(np.ones_like(out))
            optimizer.step()
        layer(x)
        layer.backward(np.full_like(out, 0.5))  # grads left non-zero
    if state == "merged":
        layer.merge()
    if state == "eval":
        layer.eval()
    if state == "disabled":
        layer.adapter_enabled = False
    return layer


def assert_same_layer(a: nplora.LoraLayerBase, b: nplora.LoraLayerBase) -> None:
    assert type(a) is type(b) and a.dtype == b.dtype
    assert (a.r, a.scaling, a.lora_alpha, a.merged, a.training, a.adapter_enabled) == \
           (b.r, b.scaling, b.lora_alpha, b.merged, b.training, b.adapter_enabled)
    assert np.array_equal(a.weight, b.weight) and not np.shares_memory(a.weight, b.weight)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert np.array_equal(p, q), name
    for (name, p), (_, q) in zip(a.named_grads(), b.named_grads()):
        assert np.array_equal(p, q), name


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", sorted(LAYER_CASES))
def test_layers_survive_pickle_and_copy(kind: str, state: str, how: str) -> None:
    original = prepare(kind, state)
    weight_before = original.weight.copy()
    restored = COPIES[how](original)
    assert_same_layer(original, restored)
    assert np.array_equal(original.weight, weight_before)  # copying changed nothing
    assert restored.weight.flags.writeable and restored.weight.flags.c_contiguous  # it owns its copy
    x = layer_input(original)
    dropout = getattr(original, "lora_dropout", 0) > 0
    for layer in (original, restored):
        layer.eval()
    assert np.array_equal(original(x), restored(x))
    if not dropout:  # (a restored dropout stream starts again at the seed)
        for layer in (original, restored):
            layer.train(state != "eval")
        if not original.merged and original.adapter_enabled and original.training:
            g = np.ones_like(original(x))
            restored(x)
            for layer in (original, restored):
                layer.backward(g)
            assert_same_layer(original, restored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nplora.LoraWarning)
        for layer in (original, restored):
            layer.adapter_enabled = True
            layer.unmerge()
            layer.merge()
    assert np.array_equal(original.weight, restored.weight)


def test_restored_dropout_streams_start_again_at_the_seed() -> None:
    layer = prepare("linear-dropout", "trained")
    data = pickle.dumps(layer)
    one, two = pickle.loads(data), pickle.loads(data)
    x = layer_input(layer)
    assert np.array_equal(one(x), two(x)) and np.array_equal(one(x), two(x))


def model_for_pickling(tmp_path: Path | None = None) -> nplora.LoraModel:
    weights = make_weights(np.float32)
    if tmp_path is not None:
        save_weights(tmp_path / "base.safetensors", weights)
        weights = open_weights(tmp_path / "base.safetensors")
    config = nplora.LoraConfig(r=3, target_modules=["q_proj", "embed_tokens"],
                               rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}, extra={"future": [1]})
    model = nplora.LoraModel(weights, config, seed=0)
    model.add_adapter("other", nplora.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), seed=1)
    for name, array in model.named_parameters():  # (default init: B = 0, or embedding A = 0)
        array[...] += 0.25
    return model


def model_outputs(model: nplora.LoraModel) -> list[np.ndarray]:
    x = np.random.default_rng(3).standard_normal((5, 10)).astype(np.float32)
    outputs = []
    for name in model.adapter_names:
        model.set_adapter(name)
        outputs += [model[p](x) for p in PATHS] + [model.forward(PATHS[0], x, adapter_ids=[0, 1, -1, 1, 0])]
    model.set_adapter("default")
    return outputs + [model["model.embed_tokens"](np.arange(7))]


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("merged", [False, True])
def test_models_survive_pickle_and_deepcopy(how: str, merged: bool) -> None:
    model = model_for_pickling()
    model.eval()
    expected = model_outputs(model)
    if merged:
        model.merge_adapter()
    restored = pickle.loads(pickle.dumps(model)) if how == "pickle" else copy.deepcopy(model)
    assert restored.adapter_names == model.adapter_names and restored.active_adapter == model.active_adapter
    assert restored.peft_config == model.peft_config
    for path in PATHS:  # the adapters of a module share one restored weight, the model's own
        shared = restored.base_weights[f"{path}.weight"]
        assert restored.layers("default")[path].weight is shared
        assert restored.layers("other")[path].weight is shared
        assert not np.shares_memory(shared, model.base_weights[f"{path}.weight"])
    if merged:
        for m in (model, restored):
            m.unmerge_adapter()
    for got, want in zip(model_outputs(restored), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    restored.merge_adapter()
    assert not any(layer.merged for layer in model.layers().values())


def test_a_model_over_memory_mapped_weights_pickles_as_its_path(tmp_path: Path) -> None:
    model = model_for_pickling(tmp_path).eval()
    data = pickle.dumps(model)
    assert len(data) < 200_000  # not the base model's bytes (only the adapted weights the layers carry)
    restored = pickle.loads(data)
    assert type(restored.base_weights).__name__ == "LazyWeights"
    for got, want in zip(model_outputs(restored), model_outputs(model)):
        assert np.array_equal(got, want)


def test_configs_survive_pickle_and_deepcopy() -> None:
    config = nplora.LoraConfig(r=4, target_modules="q|v", rank_pattern={"q": 2}, alpha_pattern={"v": 3.5},
                               use_rslora=True, extra={"future_field": {"a": [1, 2]}})
    for restored in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
        assert restored == config and restored.to_dict() == config.to_dict()
        assert restored.extra is not config.extra


def _child(layer: nplora.LoraLinear, model: nplora.LoraModel, config: nplora.LoraConfig,
           x: np.ndarray) -> tuple:
    """Runs in a fresh interpreter (spawn): everything it gets was pickled."""
    layer.eval()
    model.eval()
    return layer(x), model_outputs(model), config.to_dict(), layer


def test_multiprocessing_hand_off_gives_identical_outputs() -> None:
    layer = prepare("linear-f64-bias-rslora", "trained")
    model = model_for_pickling().eval()
    config = model.peft_config["default"]
    x = layer_input(layer)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        y, outputs, config_dict, returned = pool.apply(_child, (layer, model, config, x))
    layer.eval()
    assert np.array_equal(y, layer(x))
    for got, want in zip(outputs, model_outputs(model)):
        assert np.array_equal(got, want)
    assert config_dict == config.to_dict()
    returned.train()
    layer.train()
    assert_same_layer(layer, returned)
