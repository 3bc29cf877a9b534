"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` [r, in] and ``….lora_B.weight``
[out, r] for linear layers, ``….lora_embedding_A`` [r, num] and ``….lora_embedding_B`` [dim, r]
for embeddings. The adapter name never appears in keys; a non-default adapter lives in
``<dir>/<adapter_name>/``. Everything read is checked before it is trusted.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import CONFIG_NAME, LoraConfig

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
DEFAULT_ADAPTER = "default"

# suffix -> (module kind, which matrix)
_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
_UNSUPPORTED_SUFFIXES = {
    ".lora_magnitude_vector": "DoRA (use_dora=True)",
    ".lora_B.bias": "a LoRA bias (lora_bias=True)",
}
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")  # a file name: <= 255 bytes
MAX_CONFIG_BYTES = 16 << 20  # PEFT's configs are a few KB; a stranger's may be anything


class AdapterError(ValueError):
    """An adapter file or directory nplora cannot use: the base class of nplora's adapter errors."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """The adapter directory or one of its files does not exist."""


class AdapterFormatError(AdapterError):
    """A malformed adapter: unreadable files, unknown keys, bad shapes, non-finite values."""


class AdapterMismatchError(AdapterError):
    """An adapter that disagrees with the base weights or its own config."""


@dataclass
class AdapterModule:
    """One adapted module read from a file.

    Attributes
    ----------
    path : str
        Module path, e.g. ``"model.layers.0.self_attn.q_proj"``; its base weight is ``path + ".weight"``.
    kind : {"linear", "embedding"}
    lora_A : ndarray
        linear: [r, in_features]; embedding: [r, num_embeddings].
    lora_B : ndarray
        linear: [out_features, r]; embedding: [embedding_dim, r].
    r, lora_alpha, scaling
        Rank, alpha and the resulting scale (rank/alpha patterns and rsLoRA applied).
    """

    path: str
    kind: str
    lora_A: np.ndarray
    lora_B: np.ndarray
    r: int
    lora_alpha: float
    scaling: float

    def base_shape(self, fan_in_fan_out: bool = False) -> tuple[int, int]:
        """Shape the module's base weight must have."""
        if self.kind == "embedding":
            return (self.lora_A.shape[1], self.lora_B.shape[0])
        out_features, in_features = self.lora_B.shape[0], self.lora_A.shape[1]
        return (in_features, out_features) if fan_in_fan_out else (out_features, in_features)

    def orientation_hint(self, actual: tuple[int, ...] | None, fan_in_fan_out: bool) -> str:
        """For a shape mismatch: a note when the base weight fits the other orientation."""
        if self.kind != "linear" or actual != self.base_shape(not fan_in_fan_out):
            return ""
        return (f" (it fits fan_in_fan_out={not fan_in_fan_out}: PEFT saves one fan_in_fan_out "
                "for the whole adapter, the last module's, so an adapter on both GPT-2-style "
                "Conv1D and nn.Linear modules has the wrong one for some of them; nplora uses the "
                "config's for every module)")


def check_adapter_name(name: str) -> str:
    """`name` if it is a safe adapter name (it becomes a folder name): no separators, no ``..``."""
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name) or ".." in name:
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_', '-' and '.' "
            "(it becomes a folder name, so no path separators or '..')")
    return name


def adapter_directory(directory: str | os.PathLike[str], adapter_name: str | None = None) -> Path:
    """Where an adapter lives: `directory` for the default adapter, else ``directory/adapter_name``."""
    root = Path(directory)
    if adapter_name is None or adapter_name == DEFAULT_ADAPTER:
        return root
    return root / check_adapter_name(adapter_name)


def _load_tensors(path: Path) -> Mapping[str, np.ndarray]:
    from .safetensors_io import open_weights

    try:
        return open_weights(path)
    except (OSError, ValueError) as error:
        raise AdapterFormatError(f"cannot read {path}: {error}") from error


def _as_float(array: np.ndarray, key: str) -> np.ndarray:
    if array.ndim != 2:
        raise AdapterFormatError(f"{key} must be 2-D, got shape {tuple(array.shape)}")
    kind = np.dtype(array.dtype)
    if kind == np.float64:
        result = np.array(array, dtype=np.float64)
    elif kind.kind == "f" or kind.name == "bfloat16":
        result = np.array(array, dtype=np.float32)  # float16 / bfloat16 are widened
    else:
        raise AdapterFormatError(f"{key} must hold floating-point values, got dtype {kind.name}")
    if not np.isfinite(result).all():
        raise AdapterFormatError(f"{key} holds NaN or infinite values")
    return result


def read_adapter(directory: str | os.PathLike[str], adapter_name: str | None = None
                 ) -> tuple[LoraConfig, dict[str, AdapterModule]]:
    """Read and check an adapter written by PEFT or nplora.

    Parameters
    ----------
    directory : path
        The adapter folder (holding ``adapter_config.json`` and ``adapter_model.safetensors``).
    adapter_name : str, optional
        A non-default adapter is read from ``directory/adapter_name``.

    Returns
    -------
    config : LoraConfig
    modules : dict of module path -> AdapterModule

    Raises
    ------
    AdapterError
        (or a subclass) naming the file, key and shapes at fault. Options nplora cannot honour
        raise NotImplementedError.
    """
    folder = adapter_directory(directory, adapter_name)
    config_path = folder / CONFIG_NAME
    weights_path = folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise AdapterNotFoundError(f"no adapter directory at {folder}")
    if not config_path.is_file():
        raise AdapterNotFoundError(f"no {CONFIG_NAME} in {folder}")
    if not weights_path.is_file():
        if (folder / PICKLED_WEIGHTS_NAME).is_file():
            raise AdapterFormatError(
                f"{folder} holds {PICKLED_WEIGHTS_NAME}, a pickled PyTorch file, which nplora does "
                "not load (unpickling can run arbitrary code). Re-save it with PEFT's "
                "save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors")
        raise AdapterNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{config_path} is {config_path.stat().st_size} bytes, more than "
                                 f"the {MAX_CONFIG_BYTES} an adapter config may have")
    try:
        config = LoraConfig.from_json(config_path)
    except NotImplementedError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        raise AdapterFormatError(f"{config_path}: {error}") from error
    if config.target_modules is None:
        raise AdapterFormatError(f"{config_path}: target_modules is not set (PEFT always saves it)")

    tensors = _load_tensors(weights_path)
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for key in tensors:
        if not key.startswith(KEY_PREFIX):
            raise AdapterFormatError(f"{weights_path}: key {key!r} does not start with {KEY_PREFIX!r}")
        for suffix, what in _UNSUPPORTED_SUFFIXES.items():
            if key.endswith(suffix):
                raise NotImplementedError(f"{key}: {what} is not supported by nplora")
        for suffix, (kind, which) in _SUFFIXES.items():
            if key.endswith(suffix):
                path = key[len(KEY_PREFIX):-len(suffix)]
                if not path:
                    raise AdapterFormatError(f"{weights_path}: key {key!r} names no module")
                found.setdefault(path, {})[which] = (kind, key)
                break
        else:
            if key.endswith(".base_layer.weight"):
                # PEFT saves whole embedding tables next to the adapter when embed_tokens/lm_head
                # are targeted; nplora uses the base weights it is given instead.
                continue
            raise AdapterFormatError(f"{weights_path}: unexpected key {key!r}")

    modules: dict[str, AdapterModule] = {}
    for path, parts in found.items():
        kinds = {kind for kind, _ in parts.values()}
        if len(kinds) != 1:
            raise AdapterFormatError(f"module {path!r} has both linear and embedding LoRA keys")
        if set(parts) != {"A", "B"}:
            present, missing = sorted(parts), sorted({"A", "B"} - set(parts))
            raise AdapterFormatError(
                f"module {path!r} has lora_{present[0]} but no lora_{missing[0]} in {weights_path}")
        kind = kinds.pop()
        a_key, b_key = parts["A"][1], parts["B"][1]
        a = _as_float(tensors[a_key], a_key)
        b = _as_float(tensors[b_key], b_key)
        rank = config.rank_for(path)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterMismatchError(
                f"rank of {path!r}: the config gives r={rank}, but {a_key} has shape {a.shape} "
                f"and {b_key} has shape {b.shape}")
        if a.dtype != b.dtype:
            a, b = a.astype(np.float64), b.astype(np.float64)
        modules[path] = AdapterModule(path=path, kind=kind, lora_A=a, lora_B=b, r=rank,
                                      lora_alpha=config.alpha_for(path),
                                      scaling=config.scaling_for(path))
    if not modules:
        raise AdapterFormatError(f"{weights_path} holds no LoRA tensors")
    return config, modules


def _new_temporary(target: Path, made: list[Path]) -> Path:
    """A new empty file beside `target` (recorded in `made`), with the umask's permissions (0644
    under umask 022), as PEFT's files get; mkstemp's 0600 would keep other users and serving
    processes out."""
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    made.append(temporary)
    return temporary


def write_adapter(directory: str | os.PathLike[str], config: LoraConfig,
                  modules: Mapping[str, AdapterModule], adapter_name: str | None = None) -> Path:
    """Write an adapter in PEFT's format, each file atomically (temporary file, then rename).

    Returns the folder written (``directory`` or ``directory/adapter_name``).
    """
    from safetensors.numpy import save_file

    # Serialised first: a config that cannot be written fails before any file is touched (it used
    # to fail after new weights had replaced the old ones, which then loaded with the old alpha).
    config_text = config.to_json_text()
    folder = adapter_directory(directory, adapter_name)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for path, module in modules.items():
        if module.kind == "embedding":
            names = (f"{KEY_PREFIX}{path}.lora_embedding_A", f"{KEY_PREFIX}{path}.lora_embedding_B")
        else:
            names = (f"{KEY_PREFIX}{path}.lora_A.weight", f"{KEY_PREFIX}{path}.lora_B.weight")
        tensors[names[0]] = np.ascontiguousarray(module.lora_A)
        tensors[names[1]] = np.ascontiguousarray(module.lora_B)
    # Both files written in full beside their targets, then renamed weights first: a reader never
    # sees a config naming tensors not yet there, and a failure before the renames leaves the
    # previous adapter as it was.
    temporaries: list[Path] = []
    try:
        weights_tmp = _new_temporary(folder / WEIGHTS_NAME, temporaries)
        config_tmp = _new_temporary(folder / CONFIG_NAME, temporaries)
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        # safetensors makes its file 0600 whatever was there: give it the config's mode.
        os.chmod(weights_tmp, config_tmp.stat().st_mode & 0o777)
        with open(config_tmp, "w", encoding="utf-8") as fh:
            fh.write(config_text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(weights_tmp, folder / WEIGHTS_NAME)
        os.replace(config_tmp, folder / CONFIG_NAME)
    except BaseException:
        for temporary in temporaries:
            if temporary.exists():
                temporary.unlink()
        raise
    return folder
