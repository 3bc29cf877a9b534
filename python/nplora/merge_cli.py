"""``nplora merge`` (fold an adapter into a safetensors model, streaming) and ``nplora inspect``.

The merge reads the base model through memory maps a block of rows at a time and writes each output
file with ``SafetensorsWriter``, so its memory stays near one block whatever the model's size. All of
the output goes to a temporary sibling folder that is renamed into place only when complete: a merge
that fails or is killed part-way leaves nothing that looks like a finished model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .adapters import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterModule,
    adapter_directory,
    read_adapter,
)
from .config import LoraConfig
from .safetensors_io import INDEX_NAME, SINGLE_NAME, LazyWeights, open_weights
from .safetensors_write import SafetensorsWriter
from .targets import missing_weight_hint

OUTPUT_DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
BLOCK_BYTES = 32 << 20  # rows merged/copied per step: about this many bytes of the compute dtype
# Files of a model folder that hold (unmerged) weights in other formats: not copied to the output.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")
# Sub-folders whose weight files are the base model again, unmerged: Meta's checkpoint in Llama
# snapshots, and ONNX / OpenVINO exports (served from the output folder, they would run the model
# without the adapter).
_BASE_COPY_FOLDERS = ("original", "onnx", "openvino")
_EXPORT_SUFFIXES = _WEIGHT_SUFFIXES + (".onnx", ".onnx_data", ".xml")
# Exports at the top of the folder (where optimum writes them), besides _WEIGHT_SUFFIXES.
_TOP_EXPORT_SUFFIXES = (".onnx", ".onnx_data", "openvino_model.xml")


def _float_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
            "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


@dataclass
class MergeReport:
    """What ``merge`` did: counts, sizes, time and the process's peak resident memory."""

    out: str
    merged: int = 0
    copied: int = 0
    files: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    skipped_files: list[str] = field(default_factory=list)
    copied_weight_files: list[str] = field(default_factory=list)  # in sub-folders, not merged

    def summary(self) -> str:
        lines = [f"merged {self.merged} tensor(s), copied {self.copied}, in {self.files} file(s) -> {self.out}",
                 f"{_size(self.bytes_written)} written in {self.seconds:.1f} s; peak RSS {_size(self.peak_rss)}"]
        if self.skipped_files:
            lines.append(f"not copied (weights in another format): {', '.join(self.skipped_files)}")
        if self.copied_weight_files:
            lines.append("copied as they are (other modules' weights, not merged): "
                         f"{', '.join(self.copied_weight_files)}")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_paths(base: str, adapter: str, out: str, overwrite: bool) -> None:
    real_base, real_out, real_adapter = (os.path.realpath(p) for p in (base, out, adapter))
    if _inside(real_base, real_out) or (os.path.isdir(real_base) and _inside(real_out, real_base)):
        raise ValueError(f"--out {out} would overwrite the base model {base}; choose another output")
    if _inside(real_adapter, real_out):
        raise ValueError(f"--out {out} would overwrite the adapter {adapter}; choose another output")
    if os.path.lexists(out) and not overwrite:
        if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
            return
        raise ValueError(f"{out} exists; pass --overwrite to replace it")


def _plan(weights: LazyWeights, modules: dict[str, AdapterModule], config: LoraConfig) -> dict[str, AdapterModule]:
    """``{base tensor name: module}``, after checking every module against its base weight."""
    floats = set(_float_dtypes().values())
    problems, plan = [], {}
    for path, module in modules.items():
        key = f"{path}.weight"
        expected = module.base_shape(config.fan_in_fan_out) if module.kind == "linear" else module.base_shape()
        if key not in weights:
            problems.append(f"adapter module {path!r} ({module.kind}) has no base weight {key!r}"
                            + missing_weight_hint(path))
        elif weights.shape_of(key) != expected:
            problems.append(f"{key}: the base weight has shape {weights.shape_of(key)}, the adapter "
                            f"({module.kind}, lora_A {module.lora_A.shape}, lora_B {module.lora_B.shape}) "
                            f"needs {expected}"
                            + module.orientation_hint(weights.shape_of(key), config.fan_in_fan_out))
        elif weights.dtype_of(key) not in floats:
            problems.append(f"{key}: dtype {weights.dtype_of(key)} cannot be merged into (needs a float dtype)")
        else:
            plan[key] = module
    if problems:
        raise AdapterMismatchError("the adapter does not fit the base model: " + "; ".join(problems))
    return plan


def _blocks(rows: int, row_elements: int) -> Iterator[tuple[int, int]]:
    step = max(1, BLOCK_BYTES // max(1, row_elements * 8))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _cast(array: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    if array.dtype == dtype:
        return array
    def overflow() -> ValueError:
        return ValueError(f"{name}: values overflow {dtype} (largest |value| "
                          f"{float(np.nanmax(np.abs(array.astype(np.float64)))):g})")

    with np.errstate(over="raise", invalid="ignore"):
        try:
            cast = array.astype(dtype)
        except FloatingPointError:
            raise overflow() from None
    # bfloat16 -> float16 (ml_dtypes' cast) gives inf without NumPy's overflow error: an inf
    # that was finite before is the same overflow.
    # (ml_dtypes' bfloat16 is kind "V", and NumPy's float -> bfloat16 cast does not raise either.)
    if cast.dtype in _float_dtypes().values() and not np.isfinite(cast).all() and (
            np.isfinite(cast) != np.isfinite(array.astype(np.float64))).any():
        raise overflow()
    return cast


def _merge_block(block: np.ndarray, module: AdapterModule, config: LoraConfig, rows: slice,
                 compute: np.dtype) -> np.ndarray:
    """``block`` (rows ``rows`` of the base weight) plus those rows of scaling * delta, via nplora's merge."""
    from . import LoraEmbedding, LoraLinear

    weight = np.array(block, dtype=compute, order="C")
    a, b = module.lora_A.astype(compute), module.lora_B.astype(compute)
    common: dict[str, Any] = {"r": module.r, "lora_alpha": module.lora_alpha,
                              "use_rslora": config.use_rslora, "seed": 0}
    layer: LoraEmbedding | LoraLinear
    if module.kind == "embedding":  # rows are embedding ids: columns of A
        layer = LoraEmbedding(weight, **common)
        layer.lora_embedding_A, layer.lora_embedding_B = a[:, rows], b
    elif config.fan_in_fan_out:  # weight [in, out]: rows are input features, columns of A
        layer = LoraLinear(weight, fan_in_fan_out=True, **common)
        layer.lora_A, layer.lora_B = a[:, rows], b
    else:  # weight [out, in]: rows are output features, rows of B
        layer = LoraLinear(weight, **common)
        layer.lora_A, layer.lora_B = a, b[rows]
    if not math.isclose(layer.scaling, module.scaling, rel_tol=1e-12):
        raise RuntimeError(f"{module.path}: layer scaling {layer.scaling} differs from the adapter's "
                           f"{module.scaling}")
    layer.merge()
    merged = layer.weight
    if not np.isfinite(merged).all() and (~np.isfinite(merged) & np.isfinite(block.astype(compute))).any():
        raise AdapterFormatError(f"{module.path}: merging gives NaN or infinite values (scaling * B @ A "
                                 f"overflows {compute}): the adapter seems broken")
    return merged


def _write_file(weights: LazyWeights, shard: str, path: str, plan: dict[str, AdapterModule],
                config: LoraConfig, target: np.dtype | None, report: MergeReport, bar) -> None:
    floats = set(_float_dtypes().values())

    def out_dtype(name: str) -> np.dtype:
        dtype = weights.dtype_of(name)
        return target if target is not None and dtype in floats else dtype

    names = weights.tensors_in(shard)
    header = {name: (out_dtype(name), weights.shape_of(name)) for name in names}
    with SafetensorsWriter(path, header, weights.file_metadata(shard)) as writer:
        for name in names:
            shape, dtype = weights.shape_of(name), out_dtype(name)
            module = plan.get(name)
            if not shape or 0 in shape:  # a scalar, or no elements: no rows to step through
                writer.write(name, _cast(np.asarray(weights[name]).reshape(shape), dtype, name))
            else:
                wide = np.dtype(np.float64 if np.float64 in (weights.dtype_of(name), dtype) else np.float32)
                for start, stop in _blocks(shape[0], math.prod(shape[1:])):
                    block = weights.slice_rows(name, start, stop)
                    if module is not None:
                        block = _merge_block(block, module, config, slice(start, stop), wide)
                    writer.write_rows(name, _cast(block, dtype, name))
                    del block  # unmaps these rows before the next are mapped
            if module is None:
                report.copied += 1
            else:
                report.merged += 1
            bar.update(1)
    report.bytes_written += writer.nbytes
    report.files += 1


def _copy_extras(base: str, shards: list[str], dest: str, report: MergeReport) -> None:
    """Copy the model folder's other files (config.json, tokenizer files, ...) next to the output."""
    for entry in sorted(os.listdir(base)):
        source = os.path.join(base, entry)
        if entry in shards or entry in (INDEX_NAME, SINGLE_NAME) or entry.startswith("."):
            continue
        if os.path.isdir(source):
            # Sub-folders whole: their weights are usually other modules' (a sentence-transformers
            # snapshot's 2_Dense/model.safetensors), which the output needs as they are. Except
            # Meta's original/ folder in Llama snapshots: its consolidated.*.pth (16 GB and more)
            # is the unmerged base model again, in another format.
            def skip_weights(folder: str, names: list[str]) -> set[str]:
                export = entry in _BASE_COPY_FOLDERS
                weights = {n for n in names if n.endswith(_EXPORT_SUFFIXES if export else _WEIGHT_SUFFIXES)
                           and not os.path.isdir(os.path.join(folder, n))}
                listed = [os.path.relpath(os.path.join(folder, n), base) for n in sorted(weights)]
                if export:
                    report.skipped_files.extend(listed)
                    return weights
                report.copied_weight_files.extend(listed)
                return set()

            shutil.copytree(source, os.path.join(dest, entry), ignore=skip_weights)
        elif entry.endswith(_WEIGHT_SUFFIXES + _TOP_EXPORT_SUFFIXES):
            report.skipped_files.append(entry)
        else:
            shutil.copy2(source, os.path.join(dest, entry))


def _write_index(weights: LazyWeights, base: str, dest: str, report: MergeReport) -> None:
    with open(os.path.join(base, INDEX_NAME), encoding="utf-8") as f:
        index = json.load(f)
    if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"] and \
            report.bytes_written != weights.nbytes:  # a --dtype change: the sizes are new
        index["metadata"]["total_size"] = report.bytes_written
        with open(os.path.join(dest, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    else:
        shutil.copy2(os.path.join(base, INDEX_NAME), os.path.join(dest, INDEX_NAME))


def _move_into_place(tmp: str, out: str) -> None:
    if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
        os.rmdir(out)
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
    os.rename(out, os.path.join(old, "previous"))
    try:
        os.rename(tmp, out)
    except BaseException:  # (Ctrl-C too) the previous output goes back where it was
        os.rename(os.path.join(old, "previous"), out)
        os.rmdir(old)
        raise
    shutil.rmtree(old)


def merge(base: str | os.PathLike[str], adapter: str | os.PathLike[str], out: str | os.PathLike[str], *,
          adapter_name: str | None = None, dtype: str = "auto", overwrite: bool = False,
          progress: bool = True) -> MergeReport:
    """Fold a LoRA adapter into a safetensors model: ``W += scaling * B @ A`` for every adapted module.

    Parameters
    ----------
    base : path
        A ``.safetensors`` file, or a folder with ``model.safetensors`` or shards and
        ``model.safetensors.index.json``.
    adapter : path
        A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    out : path
        The output folder, laid out as ``base`` (same file names, index and other files). With a
        file as ``base``, an ``out`` ending in ``.safetensors`` is written as that file instead.
    adapter_name : str, optional
        Read the adapter from ``adapter/adapter_name``.
    dtype : {"auto", "float32", "float16", "bfloat16", "float64"}
        dtype of the floating-point output tensors; "auto" keeps each tensor's. Merging is done in
        float32 (float64 when the base or the output is float64).
    overwrite : bool
        Replace an existing non-empty ``out``.
    progress : bool
        Show a progress bar over tensors on stderr.

    Returns
    -------
    MergeReport
    """
    started = time.perf_counter()
    base, adapter, out = os.path.abspath(base), os.path.abspath(adapter), os.path.abspath(out)
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {list(OUTPUT_DTYPES)}, got {dtype!r}")
    target = None if dtype == "auto" else _float_dtypes()[dtype]
    _check_paths(base, os.fspath(adapter_directory(adapter, adapter_name)), out, overwrite)
    config, modules = read_adapter(adapter, adapter_name)
    report = MergeReport(out=out)
    with open_weights(base) as weights:
        plan = _plan(weights, modules, config)
        as_file = os.path.isfile(base) and out.endswith(".safetensors")
        made = _make_parents(os.path.dirname(out))
        try:
            _write_output(weights, base, out, as_file, plan, config, target, report, progress)
        except BaseException:
            for folder in made:  # the deepest first; only if nothing else went in meanwhile
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            raise
    report.seconds = time.perf_counter() - started
    report.peak_rss = peak_rss()
    return report


def _make_parents(folder: str) -> list[str]:
    """``os.makedirs(folder)``; returns the folders it made, deepest first (a failed merge removes
    them again rather than leave empty folders behind)."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if missing:
        os.makedirs(missing[0], exist_ok=True)
    return missing


def _set_config_dtype(path: str, dtype: np.dtype) -> None:
    """Name the output's dtype in its copied config.json (``dtype``, and ``torch_dtype`` as older
    transformers wrote it), as PEFT's merge and save_pretrained do: otherwise
    ``from_pretrained(out, dtype="auto")`` loads it in the base's dtype."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError:
            return  # not ours to judge: copied as it was
    if not isinstance(config, dict):
        return
    name = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32",
            "float64": "float64"}[str(dtype)]
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = name
    with open(path, "w", encoding="utf-8") as f:  # inside the temporary output folder
        json.dump(config, f, indent=2, sort_keys=False)
        f.write("\n")


def _write_output(weights: LazyWeights, base: str, out: str, as_file: bool,
                  plan: dict[str, AdapterModule], config: LoraConfig, target: np.dtype | None,
                  report: MergeReport, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=len(weights), unit="tensor", desc="merge", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        if as_file:
            _write_file(weights, weights.shards[0], out, plan, config, target, report, bar)
        else:
            tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
            try:
                umask = os.umask(0o022)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the output's mode
                for shard in weights.shards:
                    _write_file(weights, shard, os.path.join(tmp, shard), plan, config, target, report, bar)
                if os.path.isdir(base):
                    if weights.is_sharded:
                        _write_index(weights, base, tmp, report)
                    _copy_extras(base, weights.shards, tmp, report)
                    if target is not None:
                        _set_config_dtype(os.path.join(tmp, "config.json"), target)
                _move_into_place(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise


def inspect_adapter(directory: str | os.PathLike[str], adapter_name: str | None = None) -> str:
    """A text summary of an adapter: its config and a table of its modules, with totals."""
    config, modules = read_adapter(directory, adapter_name)
    lines = [f"adapter: {adapter_directory(directory, adapter_name)}",
             f"r={config.r}  lora_alpha={config.lora_alpha:g}  use_rslora={config.use_rslora}  "
             f"fan_in_fan_out={config.fan_in_fan_out}  target_modules={config.target_modules!r}"]
    for name in ("rank_pattern", "alpha_pattern"):
        if getattr(config, name):
            lines.append(f"{name}={getattr(config, name)!r}")
    if config.base_model_name_or_path:
        lines.append(f"base_model_name_or_path={config.base_model_name_or_path}")
    rows = [("kind", "module", "lora_A", "lora_B", "rank", "alpha", "scaling", "params")]
    total = 0
    for path, module in modules.items():
        params = module.lora_A.size + module.lora_B.size
        total += params
        rows.append((module.kind, path, str(module.lora_A.shape), str(module.lora_B.shape), str(module.r),
                     f"{module.lora_alpha:g}", f"{module.scaling:.6g}", f"{params:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {4, 5, 6, 7}
    for row in rows:
        lines.append("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    kinds = {kind: sum(m.kind == kind for m in modules.values()) for kind in ("linear", "embedding")}
    lines.append(f"total: {len(modules)} module(s) ({kinds['linear']} linear, {kinds['embedding']} embedding), "
                 f"{total:,} parameters")
    unmatched = config.unmatched_pattern_keys(modules)
    for name, keys in unmatched.items():
        if keys:
            lines.append(f"note: {name} keys that match no module: {keys}")
    return "\n".join(lines)


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nplora merge``."""
    parser.add_argument("--base", required=True, metavar="PATH",
                        help="base model: a .safetensors file, or a folder with model.safetensors or shards "
                             "and model.safetensors.index.json")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="PEFT/nplora adapter folder")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder, laid out as the base (a .safetensors path for a file base)")
    parser.add_argument("--adapter-name", metavar="NAME", help="read the adapter from DIR/NAME")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES, default="auto",
                        help="dtype of the floating-point outputs (default: auto = as the base); "
                             "8-bit float tensors, quantized with scales of their own, stay as they are")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_merge)


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nplora inspect``."""
    parser.add_argument("directory", metavar="DIR", help="adapter folder")
    parser.add_argument("--adapter-name", metavar="NAME", help="read the adapter from DIR/NAME")
    parser.set_defaults(run=_run_inspect)


def _run_merge(args: argparse.Namespace) -> int:
    report = merge(args.base, args.adapter, args.out, adapter_name=args.adapter_name, dtype=args.dtype,
                   overwrite=args.overwrite, progress=not args.quiet)
    print(report.summary())
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    print(inspect_adapter(args.directory, args.adapter_name))
    return 0
