"""Tests of `nplora merge` / `nplora inspect`: results, layout, safety, PEFT parity, memory."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import nplora
from nplora import merge_cli
from nplora.adapters import AdapterError, AdapterModule, write_adapter
from nplora.cli import main
from nplora.config import LoraConfig
from nplora.safetensors_io import INDEX_NAME, open_weights
from nplora.safetensors_write import SafetensorsWriter, save_weights

HIDDEN, VOCAB, LAYERS = 16, 40, 3
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}
# (rtol, atol) of the merged weights, judged at the precision of the stored dtype
TOLERANCE = {"float32": (1e-6, 1e-6), "float16": (1e-3, 1e-3), "bfloat16": (1e-2, 1e-2), "float64": (1e-12, 1e-12)}


def base_tensors(dtype, *, fan_in_fan_out: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def linear(out_features: int, in_features: int) -> np.ndarray:
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        return rng.standard_normal(shape).astype(dtype)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(dtype)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{name}.weight"] = linear(HIDDEN, HIDDEN)
        tensors[f"{prefix}.mlp.up_proj.weight"] = linear(2 * HIDDEN, HIDDEN)
        tensors[f"{prefix}.mlp.down_proj.weight"] = linear(HIDDEN, 2 * HIDDEN)
        tensors[f"{prefix}.input_layernorm.weight"] = np.ones(HIDDEN, dtype)
    tensors["model.norm.weight"] = np.ones(HIDDEN, dtype)
    tensors["model.position_ids"] = np.arange(8, dtype=np.int64)[None]
    tensors["model.no_rows"] = np.zeros((0, HIDDEN), dtype)  # no rows to merge or copy in blocks
    tensors["model.no_elements"] = np.zeros((3, 0), dtype)
    tensors["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN)).astype(dtype)
    return tensors


def write_model(folder: Path, tensors: dict[str, np.ndarray], shards: int = 3) -> None:
    """A Hugging Face-like folder: shards, index, config and tokenizer files, a stray weight file."""
    folder.mkdir(parents=True)
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[k::shards]}
        save_weights(folder / shard, part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("kept")
    (folder / "pytorch_model.bin").write_bytes(b"unmerged weights in another format")
    (folder / "original").mkdir()  # a Llama snapshot's Meta checkpoint: the unmerged model again
    (folder / "original" / "consolidated.00.pth").write_bytes(b"unmerged weights again")
    (folder / "original" / "params.json").write_text("{}")
    (folder / "2_Dense").mkdir()  # a sentence-transformers module of its own: kept as it is
    (folder / "2_Dense" / "model.safetensors").write_bytes(b"another module's weights")
    (folder / "onnx").mkdir()  # an export of the unmerged model: served, it would skip the adapter
    (folder / "onnx" / "model.onnx").write_bytes(b"the unmerged model, exported")
    (folder / "onnx" / "config.json").write_text("{}")
    (folder / "model.onnx").write_bytes(b"the unmerged model, exported at the top")


def make_adapter(folder: Path, *, fan_in_fan_out: bool = False, use_rslora: bool = False, seed: int = 1,
                 shapes_from: dict[str, np.ndarray] | None = None) -> tuple[LoraConfig, dict[str, AdapterModule]]:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
                        rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3.0},
                        fan_in_fan_out=fan_in_fan_out, use_rslora=use_rslora)
    rng = np.random.default_rng(seed)
    modules = {}
    for i in range(LAYERS):
        for path, out_f, in_f in ((f"model.layers.{i}.self_attn.q_proj", HIDDEN, HIDDEN),
                                  (f"model.layers.{i}.self_attn.v_proj", HIDDEN, HIDDEN),
                                  (f"model.layers.{i}.mlp.up_proj", 2 * HIDDEN, HIDDEN)):
            r = config.rank_for(path)
            modules[path] = AdapterModule(path, "linear", rng.standard_normal((r, in_f)).astype(np.float32),
                                          rng.standard_normal((out_f, r)).astype(np.float32), r,
                                          config.alpha_for(path), config.scaling_for(path))
    path = "model.embed_tokens"
    modules[path] = AdapterModule(path, "embedding", rng.standard_normal((4, VOCAB)).astype(np.float32),
                                  rng.standard_normal((HIDDEN, 4)).astype(np.float32), 4,
                                  config.alpha_for(path), config.scaling_for(path))
    write_adapter(folder, config, modules)
    return config, modules


def expected_merge(tensors: dict[str, np.ndarray], config: LoraConfig,
                   modules: dict[str, AdapterModule]) -> dict[str, np.ndarray]:
    out = dict(tensors)
    for path, m in modules.items():
        key = f"{path}.weight"
        wide = np.float64 if tensors[key].dtype == np.float64 else np.float32
        delta = m.scaling * (m.lora_B.astype(np.float64) @ m.lora_A.astype(np.float64))
        if m.kind == "embedding" or config.fan_in_fan_out:
            delta = delta.T
        out[key] = (tensors[key].astype(wide) + delta.astype(wide)).astype(tensors[key].dtype)
    return out


def assert_merged(out: Path, expected: dict[str, np.ndarray], modules, dtype_name: str) -> None:
    rtol, atol = TOLERANCE[dtype_name]
    adapted = {f"{path}.weight" for path in modules}
    with open_weights(out) as weights:
        assert set(weights) == set(expected)
        for name, want in expected.items():
            got = weights[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            if name in adapted:
                np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol,
                                           err_msg=name)
            else:
                assert got.tobytes() == want.tobytes(), name


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------- results and layout
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_merge_sharded_model_matches_numpy(tmp_path: Path, dtype_name: str) -> None:
    tensors = base_tensors(DTYPES[dtype_name])
    write_model(tmp_path / "base", tensors)
    config, modules = make_adapter(tmp_path / "adapter")
    report = merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert (report.merged, report.copied, report.files) == (len(modules), len(tensors) - len(modules), 3)
    assert report.skipped_files == ["model.onnx", "onnx/model.onnx", "original/consolidated.00.pth",
                                    "pytorch_model.bin"]
    assert report.copied_weight_files == ["2_Dense/model.safetensors"] and report.peak_rss > 0
    assert_merged(tmp_path / "out", expected_merge(tensors, config, modules), modules, dtype_name)
    base, out = tmp_path / "base", tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted(set(os.listdir(base)) - {"pytorch_model.bin", "model.onnx"})
    for name in (INDEX_NAME, "config.json", "tokenizer.json", "extra/notes.txt",
                 "original/params.json", "2_Dense/model.safetensors", "onnx/config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert os.listdir(out / "original") == ["params.json"]
    with open_weights(base) as before, open_weights(out) as after:
        assert after.shards == before.shards
        assert all(after.shard_of(n) == before.shard_of(n) for n in before)
        assert all(after.tensors_in(s) == before.tensors_in(s) for s in before.shards)
        assert all(after.file_metadata(s) == {"format": "pt"} for s in after.shards)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["rows", "fan_in_fan_out", "rslora"])
def test_merge_in_small_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(merge_cli, "BLOCK_BYTES", 3 * HIDDEN * 8)  # three rows at a time: blocks cut tensors
    tensors = base_tensors(np.float32, fan_in_fan_out=kind == "fan_in_fan_out")
    write_model(tmp_path / "base", tensors, shards=2)
    config, modules = make_adapter(tmp_path / "adapter", fan_in_fan_out=kind == "fan_in_fan_out",
                                   use_rslora=kind == "rslora")
    merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert_merged(tmp_path / "out", expected_merge(tensors, config, modules), modules, "float32")


def test_single_file_base(tmp_path: Path) -> None:
    tensors = base_tensors(np.float16)
    save_weights(tmp_path / "model.safetensors", tensors, metadata={"format": "pt"})
    config, modules = make_adapter(tmp_path / "adapter")
    expected = expected_merge(tensors, config, modules)
    merge_cli.merge(tmp_path / "model.safetensors", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    assert_merged(tmp_path / "out" / "model.safetensors", expected, modules, "float16")
    merge_cli.merge(tmp_path / "model.safetensors", tmp_path / "adapter", tmp_path / "merged.safetensors",
                    progress=False)
    assert_merged(tmp_path / "merged.safetensors", expected, modules, "float16")
    (tmp_path / "folder").mkdir()
    save_weights(tmp_path / "folder" / "model.safetensors", tensors)
    (tmp_path / "folder" / "config.json").write_text("{}")
    merge_cli.merge(tmp_path / "folder", tmp_path / "adapter", tmp_path / "out2", progress=False)
    assert sorted(os.listdir(tmp_path / "out2")) == ["config.json", "model.safetensors"]
    assert_merged(tmp_path / "out2", expected, modules, "float16")


def test_dtype_option_converts_float_tensors_and_updates_the_index(tmp_path: Path) -> None:
    tensors = base_tensors(np.float32)
    write_model(tmp_path / "base", tensors)
    config, modules = make_adapter(tmp_path / "adapter")
    merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", dtype="bfloat16", progress=False)
    expected = {name: t.astype(ml_dtypes.bfloat16) if t.dtype == np.float32 else t
                for name, t in expected_merge(tensors, config, modules).items()}
    assert_merged(tmp_path / "out", expected, modules, "bfloat16")
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    assert index["weight_map"] == json.loads((tmp_path / "base" / INDEX_NAME).read_text())["weight_map"]
    # config.json names the new dtype, as PEFT's merge and save_pretrained write it (it said the
    # base's, so from_pretrained(out, dtype="auto") loaded bfloat16 weights as float32).
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "llama",
                                                                           "dtype": "bfloat16"}


def test_bfloat16_to_float16_overflow_is_an_error(tmp_path: Path) -> None:
    # ml_dtypes' bfloat16 -> float16 cast gives inf without NumPy's overflow error: an unmerged
    # tensor of 1e6 was written as inf, with exit status 0.
    tensors = {"model.embed_tokens.weight": np.ones((VOCAB, HIDDEN), ml_dtypes.bfloat16),
               "other": np.full((2, 3), 1e6, ml_dtypes.bfloat16)}
    save_weights(tmp_path / "base.safetensors", tensors)
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["embed_tokens"])
    write_adapter(tmp_path / "adapter", config, {"model.embed_tokens": AdapterModule(
        "model.embed_tokens", "embedding", np.ones((1, VOCAB), np.float32), np.ones((HIDDEN, 1), np.float32),
        1, 1.0, 1.0)})
    with pytest.raises(ValueError, match="other: values overflow float16"):
        merge_cli.merge(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors",
                        dtype="float16", progress=False)
    assert leftovers(tmp_path) == []
    # Into bfloat16 (kind "V" in ml_dtypes, and NumPy raises nothing for it either).
    with pytest.raises(ValueError, match=r"t: values overflow bfloat16 \(largest \|value\| 3.4e\+38\)"):
        merge_cli._cast(np.array([3.4e38, np.nan]), np.dtype(ml_dtypes.bfloat16), "t")


def test_float16_overflow_is_an_error(tmp_path: Path) -> None:
    tensors = {"model.embed_tokens.weight": np.full((VOCAB, HIDDEN), 60000, np.float16)}
    save_weights(tmp_path / "base.safetensors", tensors)
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["embed_tokens"])
    write_adapter(tmp_path / "adapter", config, {"model.embed_tokens": AdapterModule(
        "model.embed_tokens", "embedding", np.ones((1, VOCAB), np.float32), np.full((HIDDEN, 1), 1e4, np.float32),
        1, 1.0, 1.0)})
    with pytest.raises(ValueError, match="model.embed_tokens.weight: values overflow float16"):
        merge_cli.merge(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # Folders the merge made for its output go again too (they were left behind, empty).
    with pytest.raises(ValueError, match="values overflow float16"):
        merge_cli.merge(tmp_path / "base.safetensors", tmp_path / "adapter",
                        tmp_path / "new" / "deeper" / "merged.safetensors", progress=False)
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- safety
def test_refuses_to_write_over_its_inputs(tmp_path: Path) -> None:
    write_model(tmp_path / "base", base_tensors(np.float32))
    make_adapter(tmp_path / "adapter")
    save_weights(tmp_path / "one.safetensors", base_tensors(np.float32))
    cases = [("base", "base model"), ("base/sub", "base model"), (".", "base model"),
             ("adapter", "adapter"), ("one.safetensors", "base model")]
    for out, words in cases:
        base = tmp_path / ("one.safetensors" if out == "one.safetensors" else "base")
        with pytest.raises(ValueError, match=f"would overwrite the {words}"):
            merge_cli.merge(base, tmp_path / "adapter", tmp_path / out, overwrite=True, progress=False)
    assert not (tmp_path / "base" / "sub").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "taken", overwrite=True, progress=False)
    assert not (tmp_path / "taken" / "keep.txt").exists() and (tmp_path / "taken" / INDEX_NAME).exists()
    (tmp_path / "empty").mkdir()
    merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "empty", progress=False)
    assert (tmp_path / "empty" / "config.json").exists() and leftovers(tmp_path) == []


def test_shape_mismatch_names_the_key_and_writes_nothing(tmp_path: Path) -> None:
    tensors = base_tensors(np.float32)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((2 * HIDDEN, HIDDEN + 1), np.float32)
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((HIDDEN, 2 * HIDDEN), np.float32)  # (in, out)
    del tensors["model.layers.2.self_attn.q_proj.weight"]
    write_model(tmp_path / "base", tensors)
    make_adapter(tmp_path / "adapter")
    with pytest.raises(AdapterError) as error:
        merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    message = str(error.value)
    assert "model.layers.1.mlp.up_proj.weight: the base weight has shape (32, 17)" in message
    assert "needs (32, 16)" in message and message.count("it fits fan_in_fan_out=True") == 1
    assert "model.layers.2.mlp.up_proj.weight: the base weight has shape (16, 32)" in message
    assert "has no base weight 'model.layers.2.self_attn.q_proj.weight'" in message
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"]


@pytest.mark.parametrize("after", [0, 5, 17])
def test_failure_part_way_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    write_model(tmp_path / "base", base_tensors(np.float32))
    make_adapter(tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("old result")
    calls = {"n": 0}
    write_rows = SafetensorsWriter.write_rows

    def failing(self, name, array):
        if calls["n"] == after:
            raise OSError("disk full (injected)")
        calls["n"] += 1
        write_rows(self, name, array)

    monkeypatch.setattr(SafetensorsWriter, "write_rows", failing)
    with pytest.raises(OSError, match="injected"):
        merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", overwrite=True, progress=False)
    assert os.listdir(tmp_path / "out") == ["previous.txt"] and leftovers(tmp_path) == []
    with pytest.raises(OSError, match="injected"):
        merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_a_failure_between_the_final_renames_keeps_the_previous_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The previous output had been moved aside and the new one was then deleted: --out was gone.
    write_model(tmp_path / "base", base_tensors(np.float32))
    make_adapter(tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("old result")
    rename = os.rename

    def failing(source, target):
        if ".tmp-" in os.fspath(source):  # the new output into place
            raise KeyboardInterrupt
        rename(source, target)

    monkeypatch.setattr(merge_cli.os, "rename", failing)
    with pytest.raises(KeyboardInterrupt):
        merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", overwrite=True, progress=False)
    assert os.listdir(tmp_path / "out") == ["previous.txt"] and leftovers(tmp_path) == []


def test_a_tied_lm_head_is_named_as_the_cause(tmp_path: Path) -> None:
    tensors = base_tensors(np.float32)
    tensors.pop("lm_head.weight", None)  # tied: stored once, as the input embeddings
    write_model(tmp_path / "base", tensors)
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["lm_head"])
    write_adapter(tmp_path / "adapter", config, {"lm_head": AdapterModule(
        "lm_head", "linear", np.ones((1, HIDDEN), np.float32), np.ones((VOCAB, 1), np.float32), 1, 1.0, 1.0)})
    with pytest.raises(nplora.AdapterMismatchError, match="has no base weight 'lm_head.weight' "
                                                          r"\(tied to the input embeddings\?"):
        merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)


KILL_SCRIPT = r"""
import os, signal, sys
from nplora import merge_cli
from nplora.safetensors_write import SafetensorsWriter

write_rows, calls = SafetensorsWriter.write_rows, [0]


def dying(self, name, array):
    calls[0] += 1
    if calls[0] == 12:
        os.kill(os.getpid(), signal.SIGKILL)
    write_rows(self, name, array)


SafetensorsWriter.write_rows = dying
merge_cli.merge(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_merge_leaves_only_a_temporary_folder(tmp_path: Path) -> None:
    write_model(tmp_path / "base", base_tensors(np.float32))
    make_adapter(tmp_path / "adapter")
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "base"), str(tmp_path / "adapter"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert not (tmp_path / "out").exists()
    (partial,) = leftovers(tmp_path)
    assert partial.startswith("out.tmp-") and INDEX_NAME not in os.listdir(tmp_path / partial)


# ----------------------------------------------------------------------------- the command line
def test_cli_merge_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_model(tmp_path / "base", base_tensors(np.float32))
    make_adapter(tmp_path / "adapter")
    argv = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
            "--out", str(tmp_path / "out")]
    assert main(argv + ["--quiet"]) == 0
    captured = capsys.readouterr()
    assert "merged 10 tensor(s), copied 17, in 3 file(s)" in captured.out and "peak RSS" in captured.out
    assert "not copied (weights in another format): model.onnx, onnx/model.onnx, original/consolidated.00.pth" in captured.out
    assert "copied as they are (other modules' weights, not merged): 2_Dense" in captured.out
    assert captured.err == ""
    assert main(argv) == 1
    assert "nplora merge: error:" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert "merge" in capsys.readouterr().err  # the progress bar

    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    text = capsys.readouterr().out
    assert "r=4  lora_alpha=8  use_rslora=False" in text
    assert "rank_pattern={'up_proj': 2}" in text
    row = next(line for line in text.splitlines() if "model.layers.0.mlp.up_proj" in line)
    assert row.split() == ["linear", "model.layers.0.mlp.up_proj", "(2,", "16)", "(32,", "2)", "2", "8", "4", "96"]
    row = next(line for line in text.splitlines() if line.startswith("embedding "))
    assert row.split()[0] == "embedding" and row.split()[-1] == f"{4 * VOCAB + HIDDEN * 4}"
    assert "total: 10 module(s) (9 linear, 1 embedding), 1,280 parameters" in text
    assert main(["inspect", str(tmp_path / "nothing")]) == 1
    assert "nplora inspect: error: no adapter directory" in capsys.readouterr().err


def test_inspect_reports_patterns_matching_no_module(tmp_path: Path) -> None:
    config = LoraConfig(r=2, target_modules=["q"], rank_pattern={"nowhere": 3})
    rng = np.random.default_rng(0)
    write_adapter(tmp_path, config, {"layers.0.q": AdapterModule("layers.0.q", "linear", rng.random((2, 3)),
                                                                 rng.random((3, 2)), 2, 8.0, 4.0)})
    text = merge_cli.inspect_adapter(tmp_path)
    assert "note: rank_pattern keys that match no module: ['nowhere']" in text


# ----------------------------------------------------------------------------- PEFT parity
PEFT_SCRIPT = r'''
import sys
import torch
from torch import nn
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

root = sys.argv[1]
torch.manual_seed(0)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = Attention(), nn.ModuleDict({"up_proj": nn.Linear(16, 32, bias=False)})


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(Layer() for _ in range(3))
        self.norm = nn.LayerNorm(16)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.model, self.lm_head = Inner(), nn.Linear(16, 50, bias=False)


model = Model()
state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
names = sorted(state)
save_file({k: state[k] for k in names[:9]}, f"{root}/base/model-00001-of-00002.safetensors", {"format": "pt"})
save_file({k: state[k] for k in names[9:]}, f"{root}/base/model-00002-of-00002.safetensors", {"format": "pt"})
import json
weight_map = {k: f"model-0000{1 if i < 9 else 2}-of-00002.safetensors" for i, k in enumerate(names)}
with open(f"{root}/base/model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
                    rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3.0}, use_rslora=sys.argv[2] == "1",
                    init_lora_weights=False)
peft_model = get_peft_model(model, config)
peft_model.save_pretrained(f"{root}/adapter")
merged = peft_model.merge_and_unload()
save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()}, f"{root}/reference.safetensors")
'''


def oracle_python() -> str | None:
    if importlib.util.find_spec("torch") and importlib.util.find_spec("peft"):
        return sys.executable
    return os.environ.get("NPLORA_ORACLE_PYTHON")  # a separate interpreter with torch and peft


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_matches_peft_merge_and_unload(tmp_path: Path, use_rslora: bool) -> None:
    python = oracle_python()
    if python is None:
        pytest.skip("needs torch and peft (or NPLORA_ORACLE_PYTHON naming an interpreter that has them)")
    (tmp_path / "base").mkdir()
    (tmp_path / "script.py").write_text(PEFT_SCRIPT)
    done = subprocess.run([python, str(tmp_path / "script.py"), str(tmp_path), str(int(use_rslora))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = merge_cli.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert report.merged == 10
    with open_weights(tmp_path / "reference.safetensors") as reference, open_weights(tmp_path / "out") as ours:
        assert set(ours) == set(reference)
        for name in reference:
            np.testing.assert_allclose(ours[name], reference[name], rtol=1e-5, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- memory on a 1 GiB model
def write_big_model(folder: Path, shards: int, per_shard: int, size: int) -> None:
    folder.mkdir()
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        names = [f"model.layers.{s}.self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")]
        names += [f"model.layers.{s}.mlp.{p}_proj.weight" for p in ("gate", "up", "down", "extra")][:per_shard - 4]
        with SafetensorsWriter(folder / shard, dict.fromkeys(names, (np.float32, (size, size))),
                               {"format": "pt"}) as writer:
            for t, name in enumerate(names):
                rng = np.random.default_rng(s * 100 + t)
                writer.write(name, rng.standard_normal((size, size), dtype=np.float32))
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": shards * per_shard * size * size * 4}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.skipif(os.environ.get("NPLORA_SKIP_BIG") == "1", reason="NPLORA_SKIP_BIG=1")
@pytest.mark.skipif(sys.platform == "win32", reason="needs resource.getrusage for the child's peak RSS")
def test_merge_of_a_1gib_model_streams_in_little_memory(tmp_path: Path) -> None:
    shards, per_shard, size = 8, 8, 2048
    total = shards * per_shard * size * size * 4  # 1 GiB
    work = tmp_path / "big"
    work.mkdir()
    try:
        started = time.perf_counter()
        write_big_model(work / "base", shards, per_shard, size)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        rng = np.random.default_rng(7)
        modules = {f"model.layers.{s}.self_attn.{p}_proj": AdapterModule(
            f"model.layers.{s}.self_attn.{p}_proj", "linear", rng.standard_normal((16, size)).astype(np.float32),
            rng.standard_normal((size, 16)).astype(np.float32), 16, 32.0, 2.0)
            for s in range(shards) for p in ("q", "v")}
        write_adapter(work / "adapter", config, modules)
        generated = time.perf_counter() - started

        # The merge runs under a small intermediate Python process: a child's ru_maxrss starts from
        # the peak of whoever forked it, and this pytest process may itself hold hundreds of MB.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        measure = ("import resource, subprocess, sys\n"
                   "code = subprocess.call(sys.argv[2:])\n"
                   "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
                   "sys.exit(code)\n")
        with open(work / "stdout", "wb") as stdout, open(work / "stderr", "wb") as stderr:
            started = time.perf_counter()
            child = subprocess.run([sys.executable, "-c", measure, str(work / "peak"), sys.executable, "-m",
                                    "nplora", "merge", "--base", str(work / "base"), "--adapter",
                                    str(work / "adapter"), "--out", str(work / "out"), "--quiet"],
                                   stdout=stdout, stderr=stderr, env=env)
            seconds = time.perf_counter() - started
        output = (work / "stdout").read_text() + (work / "stderr").read_text()
        assert child.returncode == 0, output
        peak = int((work / "peak").read_text()) * (1 if sys.platform == "darwin" else 1024)
        print(f"\n1 GiB merge ({shards} shards x {per_shard} tensors of {size}x{size} float32, "
              f"{len(modules)} adapted): peak RSS {peak / 2**20:.0f} MiB, {seconds:.1f} s "
              f"(generating the model took {generated:.1f} s)\n{output}")
        assert peak < total / 2
        assert "merged 16 tensor(s), copied 48, in 8 file(s)" in output
        with open_weights(work / "out") as merged:
            assert merged.nbytes == total
            module = modules["model.layers.3.self_attn.v_proj"]
            base = np.random.default_rng(3 * 100 + 2).standard_normal((size, size), dtype=np.float32)
            want = base + 2.0 * (module.lora_B @ module.lora_A)
            np.testing.assert_allclose(merged["model.layers.3.self_attn.v_proj.weight"], want, rtol=1e-5, atol=1e-4)
            base = np.random.default_rng(5 * 100 + 1).standard_normal((size, size), dtype=np.float32)
            assert np.array_equal(merged["model.layers.5.self_attn.k_proj.weight"], base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
