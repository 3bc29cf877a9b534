"""``LoraConfig``: PEFT's LoRA configuration, as far as nplora can honour it.

Field names and defaults follow ``peft.LoraConfig`` (checked against PEFT 0.21.2) so an
``adapter_config.json`` moves between PEFT and nplora in both directions. Keys nplora does not
model are kept in ``extra`` and written back, so a load/save round trip drops nothing. Options that
would change the model's math in a way nplora does not implement raise ``NotImplementedError``
instead of building a silently different model.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

CONFIG_NAME = "adapter_config.json"

_BIASES = ("none", "all", "lora_only")
# PEFT's TaskType values (peft/utils/peft_types.py); PEFT rejects any other task_type.
_TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)

# Extra PEFT fields that change the adapted model when truthy. Truthiness is PEFT's own test
# (LoraLayer.resolve_lora_variant uses bool(value); layer_replication/target_parameters use `if x:`).
_MODEL_CHANGING_EXTRAS: dict[str, str] = {
    "lora_bias": "a trainable bias on lora_B",
    "target_parameters": "LoRA on raw nn.Parameters",
    "trainable_token_indices": "trainable embedding rows",
    "use_qalora": "QALoRA input pooling",
    "layer_replication": "replicated transformer layers",
    "alora_invocation_tokens": "Activated LoRA (token-dependent adapter)",
    "velora_config": "the VeLoRA variant",
    "monteclora_config": "the MonteCLoRA variant",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "the KaSA variant",
    "ensure_weight_tying": "adapters shared between tied layers",
}
# init_lora_weights values PEFT implements and nplora does not. PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ
# also rewrite the base weight, so loading such an adapter onto the original weights would be wrong.
_UNSUPPORTED_INIT_PREFIXES = ("pissa", "corda")  # "pissa_niter_16" etc.
_UNSUPPORTED_INITS = ("olora", "mica", "loftq", "lora_ga")
# Inits that only choose where training starts (the base weight is untouched): an adapter trained
# from them loads like any other, but nplora cannot start a fresh one that way.
FRESH_ONLY_INITS = ("eva", "orthogonal")
# Sub-configs PEFT turns into an object whatever their content ({} included: its defaults), so
# any value but None (or False) switches the variant on; the other extras go by truthiness.
_SUBCONFIG_EXTRAS = frozenset({"velora_config", "monteclora_config", "arrow_config", "kasa_config",
                               "use_bdlora"})


def _fail(name: str, expected: str, value: Any, exc: type[Exception] = ValueError) -> Exception:
    return exc(f"{name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but r=True is a bug, not a rank of 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_number(value: Any) -> int | float:
    # numpy scalars are accepted but stored as Python numbers so json.dumps can write them.
    return int(value) if _is_int(value) else float(value)


def _names(name: str, value: Any, *, allow_str: bool) -> list[str] | str | None:
    """Normalise a module-name selector: None, a regex string, or an iterable of strings."""
    if value is None or (allow_str and isinstance(value, str)):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or isinstance(value, Mapping):
        expected = "a list of str, a str or None" if allow_str else "a list of str or None"
        raise _fail(name, expected, value, TypeError)
    items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    for item in items:
        if not isinstance(item, str):
            raise _fail(f"{name} entries", "str", item, TypeError)
    return items


def _check_regexes(name: str, patterns: Iterable[str], template: str = "{}") -> None:
    # A regex PEFT would match module names with must compile here, not fail later in re.match.
    for pattern in patterns:
        try:
            re.compile(template.format(pattern))
        except re.error as exc:
            raise ValueError(f"{name} {pattern!r} is not a valid regex: {exc}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.load keeps the last of duplicate keys; a config saying r twice is refused instead.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _pattern_key(patterns: Iterable[str], module_name: str) -> str:
    """PEFT's ``get_pattern_key`` (peft/utils/other.py): the first key, in dict order, whose regex
    matches the whole name or a dot-separated tail of it; else the module name itself."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name


@dataclass(repr=False)
class LoraConfig:
    """Configuration of a LoRA adapter, field-compatible with ``peft.LoraConfig``.

    Parameters
    ----------
    r : int
        Rank of the update, ``>= 1``.
    lora_alpha : float
        Scale numerator: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
    lora_dropout : float
        Dropout probability on the LoRA branch's input, in ``[0, 1)``.
    target_modules : list of str or str, optional
        Module-name suffixes (``name == key`` or ``name.endswith("." + key)``) or one regex that must
        match the full name.
    exclude_modules : list of str or str, optional
        Same matching, for modules to leave alone.
    fan_in_fan_out : bool
        The base weight is stored ``[in, out]`` (GPT-2 ``Conv1D``).
    bias : {"none", "all", "lora_only"}
        Only ``"none"`` is implemented.
    use_rslora : bool
        Rank-stabilised scaling ``lora_alpha / sqrt(r)``.
    init_lora_weights : bool or "gaussian"
        ``True``: Kaiming-uniform A, zero B. ``"gaussian"``: A ~ N(0, (1/r)^2) (std 1/r), zero
        B. ``False``: random.
    layers_to_transform : int or list of int, optional
        Layer indices (``>= 0``) to adapt; only with a list ``target_modules``.
    layers_pattern : str or list of str, optional
        Name of the layer container (``"layers"``, ``"h"``); needs ``layers_to_transform``.
    rank_pattern, alpha_pattern : dict
        Module-name regex -> rank / alpha overriding ``r`` / ``lora_alpha``.
    modules_to_save : list of str, optional
        Fully trained extra modules; not implemented, must be empty.
    use_dora : bool
        DoRA; not implemented, must be False.
    peft_type : str
        Always ``"LORA"``.
    task_type, base_model_name_or_path, revision : str, optional
        Metadata, written to ``adapter_config.json``.
    inference_mode : bool
        Metadata: the adapter was saved for inference.
    extra : dict
        Every other key of a loaded config, written back verbatim by ``to_dict``.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    peft_type: str = "LORA"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()

    # ----------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        if not _is_int(self.r):
            raise _fail("r", "an int >= 1", self.r, TypeError)
        if self.r < 1:
            raise _fail("r", "an int >= 1", self.r)
        self.r = int(self.r)
        # PEFT accepts any number here, negative included; only NaN/Inf make no model at all.
        if not _is_real(self.lora_alpha):
            raise _fail("lora_alpha", "a finite real number", self.lora_alpha, TypeError)
        if not math.isfinite(self.lora_alpha):
            raise _fail("lora_alpha", "a finite real number", self.lora_alpha)
        self.lora_alpha = _as_number(self.lora_alpha)
        if not _is_real(self.lora_dropout):
            raise _fail("lora_dropout", "a number in [0, 1)", self.lora_dropout, TypeError)
        if not 0.0 <= self.lora_dropout < 1.0:  # also rejects NaN
            raise _fail("lora_dropout", "a number in [0, 1)", self.lora_dropout)
        self.lora_dropout = float(self.lora_dropout)
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "a bool", getattr(self, name), TypeError)
        for name in ("task_type", "base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise _fail(name, "a str or None", getattr(self, name), TypeError)
        if self.task_type is not None and self.task_type not in _TASK_TYPES:
            raise _fail("task_type", f"None or one of {list(_TASK_TYPES)}", self.task_type)
        if self.task_type is not None:  # a str-Enum (peft.TaskType) becomes its plain value
            self.task_type = _TASK_TYPES[_TASK_TYPES.index(self.task_type)]
        # PEFT's LoraConfig forces peft_type to LORA; a file of another type is not a LoRA adapter.
        if self.peft_type != "LORA":
            raise _fail("peft_type", "'LORA'", self.peft_type)
        self.peft_type = "LORA"
        if not isinstance(self.bias, str) or self.bias not in _BIASES:
            raise _fail("bias", f"one of {list(_BIASES)}", self.bias)
        self._validate_init()
        self.target_modules = _names("target_modules", self.target_modules, allow_str=True)
        self.exclude_modules = _names("exclude_modules", self.exclude_modules, allow_str=True)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), str):
                _check_regexes(name, [getattr(self, name)])
        self.modules_to_save = cast("list[str] | None",
                                    _names("modules_to_save", self.modules_to_save, allow_str=False))
        self._validate_layers()
        self.rank_pattern = cast("dict[str, int]",
                                 self._validate_pattern("rank_pattern", self.rank_pattern, rank=True))
        self.alpha_pattern = self._validate_pattern("alpha_pattern", self.alpha_pattern, rank=False)
        self._validate_extra()
        self._check_supported()

    def _validate_init(self) -> None:
        init = self.init_lora_weights
        if isinstance(init, bool):
            return
        if not isinstance(init, str):
            raise _fail("init_lora_weights", "True, False or 'gaussian'", init, TypeError)
        # PEFT compares "gaussian", "olora" and "mica" case-insensitively (LoraLayer.update_layer).
        if init.lower() == "gaussian" or init.lower() in FRESH_ONLY_INITS:
            return
        if init.startswith(_UNSUPPORTED_INIT_PREFIXES) or init.lower() in _UNSUPPORTED_INITS:
            raise NotImplementedError(
                f"init_lora_weights={init!r} is not supported by nplora (supported: True, False, 'gaussian')"
            )
        raise _fail("init_lora_weights", "True, False or 'gaussian'", init)

    def _validate_layers(self) -> None:
        layers: Any = self.layers_to_transform  # checked here, whatever the annotation says
        if layers is not None:
            items = [layers] if _is_int(layers) else layers
            if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
                raise _fail("layers_to_transform", "an int, a list of int or None", layers, TypeError)
            items = list(items)
            for index in items:
                if not _is_int(index):
                    raise _fail("layers_to_transform entries", "ints", index, TypeError)
                if index < 0:
                    raise _fail("layers_to_transform entries", "ints >= 0", index)
            self.layers_to_transform = int(layers) if _is_int(layers) else [int(i) for i in items]
        self.layers_pattern = _names("layers_pattern", self.layers_pattern, allow_str=True)
        _check_regexes("layers_pattern", [self.layers_pattern] if isinstance(self.layers_pattern, str)
                       else self.layers_pattern or [], r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")
        # The three rules of peft.LoraConfig.__post_init__, same order and same truthiness tests.
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a str (regex)")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("layers_pattern cannot be used when target_modules is a str (regex)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform to be set as well"
            )

    @staticmethod
    def _validate_pattern(name: str, pattern: Any, *, rank: bool) -> dict[str, int | float]:
        if pattern is None:  # PEFT's annotation allows None; it means "no overrides"
            return {}
        if not isinstance(pattern, Mapping):
            raise _fail(name, "a dict of {regex: value}", pattern, TypeError)
        checked: dict[str, int | float] = {}
        for key, value in pattern.items():
            if not isinstance(key, str):
                raise _fail(f"{name} keys", "str", key, TypeError)
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as exc:
                raise ValueError(f"{name} key {key!r} is not a valid regex: {exc}") from None
            if rank:
                if not _is_int(value):
                    raise _fail(f"{name}[{key!r}]", "an int >= 1", value, TypeError)
                if value < 1:
                    raise _fail(f"{name}[{key!r}]", "an int >= 1", value)
            else:
                if not _is_real(value):
                    raise _fail(f"{name}[{key!r}]", "a finite real number", value, TypeError)
                if not math.isfinite(value):
                    raise _fail(f"{name}[{key!r}]", "a finite real number", value)
            checked[key] = _as_number(value)
        return checked

    def _validate_extra(self) -> None:
        if not isinstance(self.extra, Mapping):
            raise _fail("extra", "a dict", self.extra, TypeError)
        modelled = {f.name for f in fields(self)}
        for key in self.extra:
            if not isinstance(key, str):
                raise _fail("extra keys", "str", key, TypeError)
            if key in modelled:
                raise ValueError(f"extra must not hold the modelled field {key!r}; set it directly")
        self.extra = dict(self.extra)
        if isinstance(self.extra.get("target_parameters"), str):  # PEFT raises the same TypeError
            raise _fail("target_parameters", "a list of str or None", self.extra["target_parameters"], TypeError)

    def _check_supported(self) -> None:
        if self.use_dora:
            raise NotImplementedError("use_dora=True (DoRA) is not supported by nplora")
        if self.bias != "none":
            raise NotImplementedError(f"bias={self.bias!r} is not supported by nplora (only 'none')")
        if self.modules_to_save:
            raise NotImplementedError(
                f"modules_to_save={self.modules_to_save!r} is not supported by nplora (must be empty)"
            )
        for key, what in _MODEL_CHANGING_EXTRAS.items():
            value = self.extra.get(key)
            if value is not None and value is not False if key in _SUBCONFIG_EXTRAS else value:
                raise NotImplementedError(f"{key}={self.extra[key]!r} ({what}) is not supported by nplora")

    # ----------------------------------------------------------------------------- patterns
    def rank_for(self, module_name: str) -> int:
        """Rank of the named module after ``rank_pattern``, by PEFT's rule.

        Parameters
        ----------
        module_name : str
            Dotted module path in the base model, e.g. ``"model.layers.0.self_attn.q_proj"``.

        Returns
        -------
        int
            The value of the first ``rank_pattern`` key matching ``(.*\\.)?(key)$``, else ``r``.
        """
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module_name), self.r)

    def alpha_for(self, module_name: str) -> float:
        """``lora_alpha`` of the named module after ``alpha_pattern``, by PEFT's rule.

        Parameters
        ----------
        module_name : str
            Dotted module path in the base model.

        Returns
        -------
        float
            The value of the first matching ``alpha_pattern`` key, else ``lora_alpha``.
        """
        return float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_name), self.lora_alpha))

    def scaling_for(self, module_name: str) -> float:
        """Scale of the LoRA branch: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.

        Parameters
        ----------
        module_name : str
            Dotted module path in the base model.

        Returns
        -------
        float
            The scaling applied to ``B @ A`` for that module.
        """
        r = self.rank_for(module_name)
        return self.alpha_for(module_name) / (math.sqrt(r) if self.use_rslora else r)

    def unmatched_pattern_keys(self, module_names: Iterable[str]) -> dict[str, list[str]]:
        """Pattern keys that match none of the given modules (PEFT only warns about these).

        Parameters
        ----------
        module_names : iterable of str
            Names of the modules that were adapted.

        Returns
        -------
        dict
            ``{"rank_pattern": [...], "alpha_pattern": [...]}``, each a sorted list, possibly empty.
        """
        names = list(module_names)
        return {
            attr: sorted(
                key
                for key in getattr(self, attr)
                if not any(re.match(rf"(.*\.)?({key})$", name) for name in names)
            )
            for attr in ("rank_pattern", "alpha_pattern")
        }

    # ----------------------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Return the config as PEFT writes it: modelled fields plus every ``extra`` key.

        Returns
        -------
        dict
            A deep copy, JSON-serialisable when ``extra`` is.
        """
        self._validate()  # fields may have been assigned since construction
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        """Build a config from a dict such as a parsed ``adapter_config.json``.

        Parameters
        ----------
        d : Mapping
            Field names to values; keys nplora does not model go to ``extra``.

        Returns
        -------
        LoraConfig
        """
        if not isinstance(d, Mapping):
            raise _fail("config", "a dict", d, TypeError)
        modelled = {f.name for f in fields(cls)} - {"extra"}
        known = {k: copy.deepcopy(v) for k, v in d.items() if k in modelled}
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in modelled}
        return cls(**known, extra=extra)

    def to_json_text(self) -> str:
        """The config as the JSON text ``to_json`` writes (validated; TypeError if ``extra`` holds
        something JSON cannot represent, e.g. a NumPy scalar).

        Returns
        -------
        str
        """
        try:
            return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        except TypeError as error:
            raise TypeError(f"the config cannot be written as JSON: {error}") from None

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON, atomically (a temp file in the same directory, then rename).

        Parameters
        ----------
        path : str or PathLike
            Destination file; a reader never sees it half-written.
        """
        path = os.fspath(path)
        text = self.to_json_text()
        directory, base = os.path.split(os.path.abspath(path))
        tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex}.tmp")
        # os.open with 0o666 keeps the umask's permissions, which mkstemp's 0o600 would not.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> LoraConfig:
        """Read a config from a JSON file.

        Parameters
        ----------
        path : str or PathLike
            An ``adapter_config.json`` written by nplora or PEFT.

        Returns
        -------
        LoraConfig
        """
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh, object_pairs_hook=_unique_keys)
            except RecursionError:
                raise ValueError(f"{os.fspath(path)}: JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError(f"{os.fspath(path)} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``<save_directory>/adapter_config.json``, creating the directory.

        Parameters
        ----------
        save_directory : str or PathLike
            Adapter directory (for a non-default adapter, ``<dir>/<adapter_name>``).
        """
        os.makedirs(save_directory, exist_ok=True)
        self.to_json(os.path.join(save_directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], subfolder: str | None = None) -> LoraConfig:
        """Read ``<directory>[/<subfolder>]/adapter_config.json``.

        Parameters
        ----------
        directory : str or PathLike
            Adapter directory written by nplora or PEFT's ``save_pretrained``.
        subfolder : str, optional
            E.g. the adapter name of a non-default adapter.

        Returns
        -------
        LoraConfig
        """
        path = os.path.join(directory, subfolder) if subfolder else os.fspath(directory)
        return cls.from_json(os.path.join(path, CONFIG_NAME))

    def _repr_html_(self) -> str:
        from .display import config_html

        return config_html(self)

    def __repr__(self) -> str:
        default = type(self)()
        shown = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name != "extra" and (f.name in ("r", "lora_alpha") or getattr(self, f.name) != getattr(default, f.name))
        ]
        if self.extra:
            shown.append(f"extra=<{len(self.extra)} keys>")
        return f"LoraConfig({', '.join(shown)})"
