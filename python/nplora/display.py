"""HTML for Jupyter: short tables describing layers, models, configs and optimizers.

Each ``_repr_html_`` in the package calls one function here. They read shapes, counts and flags
only, never array values, so showing a model backed by a multi-GB memory-mapped file costs nothing.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

MAX_MODULE_ROWS = 8  # a model table shows this many modules, then "... and N more"

_TABLE = '<table style="border-collapse:collapse;margin:0.2em 0 0.4em 0">'
_KEY = '<th style="text-align:left;padding:0.1em 1em 0.1em 0;font-weight:600">'
_CELL = '<td style="text-align:left;padding:0.1em 1em 0.1em 0">'


def count(n: int) -> str:
    """`n` with thousands separators: ``6,144``."""
    return f"{int(n):,d}"


def shape(dims: Iterable[int]) -> str:
    """A shape as NumPy prints it: ``(256, 512)``, ``(256,)``."""
    dims = tuple(int(d) for d in dims)
    return f"({dims[0]},)" if len(dims) == 1 else "(" + ", ".join(map(str, dims)) + ")"


def number(value: float) -> str:
    """A float as short as it can be without losing what matters: ``2``, ``0.05``, ``1e-05``."""
    return f"{value:g}"


def percent(part: int, whole: int) -> str:
    """``part / whole`` as a percentage with 4 significant digits, ``"-"`` when whole is 0."""
    return "-" if whole == 0 else f"{100 * part / whole:.4g}%"


def key_value_table(title: str, rows: Sequence[tuple[str, str]], subtitle: str = "",
                    more_html: str = "") -> str:
    """A titled two-column table: one ``(key, value)`` per row, all text escaped.

    `more_html` (already safe HTML, e.g. a ``grid_table``) is appended inside the same block.
    """
    head = f"<strong>{html.escape(title)}</strong>"
    if subtitle:
        head += f" <span>{html.escape(subtitle)}</span>"
    body = "".join(f"<tr>{_KEY}{html.escape(k)}</th>{_CELL}{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<div class="nplora-repr">{head}{_TABLE}{body}</table>{more_html}</div>'


def grid_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table with a header row; every cell is escaped."""
    top = "".join(f"{_KEY}{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"{_CELL}{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"{_TABLE}<tr>{top}</tr>{body}</table>"


def _scaling_rule(use_rslora: bool) -> str:
    return "lora_alpha / sqrt(r), rsLoRA" if use_rslora else "lora_alpha / r"


def _state(layer: Any) -> str:
    parts = ["training" if layer.training else "eval", "merged" if layer.merged else "unmerged"]
    if not layer.adapter_enabled:
        parts.append("adapter disabled")
    return " · ".join(parts)


def _parameters(trainable: int, frozen: int) -> str:
    total = trainable + frozen
    return (f"{count(trainable)} trainable · {count(frozen)} frozen · {count(total)} total "
            f"({percent(trainable, total)} trainable)")


def layer_html(layer: Any) -> str:
    """HTML summary of a LoraLinear or LoraEmbedding: shapes, r, alpha, scaling, state, counts."""
    weight = layer.weight
    notes = ["frozen"]
    if not weight.flags.writeable:
        notes.append("read-only")
    if getattr(layer, "fan_in_fan_out", False):
        notes.append("stored [in, out] (fan_in_fan_out)")
    rows = [("dtype", str(weight.dtype)), ("weight", f"{shape(weight.shape)} " + ", ".join(notes))]
    (name_a, a), (name_b, b) = layer.named_parameters()
    if hasattr(layer, "in_features"):
        title = "LoraLinear"
        subtitle = f"{layer.in_features} → {layer.out_features}, r={layer.r}"
        bias = layer.bias
        rows.append(("bias", "none" if bias is None else shape(bias.shape)))
    else:
        title = "LoraEmbedding"
        subtitle = f"{layer.num_embeddings} × {layer.embedding_dim}, r={layer.r}"
        if layer.padding_idx is not None:
            rows.append(("padding_idx", str(layer.padding_idx)))
    rows += [
        (name_a, shape(a.shape)),
        (name_b, shape(b.shape)),
        ("r", str(layer.r)),
        ("lora_alpha", number(layer.lora_alpha)),
        ("scaling", f"{number(layer.scaling)} ({_scaling_rule(layer.use_rslora)})"),
    ]
    if getattr(layer, "lora_dropout", 0.0):
        rows.append(("lora_dropout", number(layer.lora_dropout)))
    stats = layer.stats()
    rows += [("state", _state(layer)),
             ("parameters", _parameters(stats["trainable_params"], stats["frozen_params"]))]
    return key_value_table(title, rows, subtitle)


def _range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return number(low) if low == high else f"{number(low)}–{number(high)}"


def model_html(model: Any) -> str:
    """HTML summary of a LoraModel: its adapters, state, parameter counts and adapted modules."""
    active = model.active_adapter
    adapter_rows = []
    for name in model.adapter_names:
        layers = model.layers(name)
        values = list(layers.values())
        trainable = sum(layer.stats()["trainable_params"] for layer in values)
        merged = sum(layer.merged for layer in values)
        notes = ["active"] if name == active else []
        if merged:
            notes.append(f"merged in {merged}/{len(values)} modules")
        adapter_rows.append([
            name, str(len(values)), _range([layer.r for layer in values]) if values else "-",
            _range([layer.lora_alpha for layer in values]) if values else "-", count(trainable),
            ", ".join(notes)])
    trainable, total = model.get_nb_trainable_parameters()
    modes = {layer.training for name in model.adapter_names for layer in model.layers(name).values()}
    state = "training" if modes == {True} else "eval" if modes == {False} else "mixed train/eval"
    if model._adapters_disabled:
        state += " · adapters disabled"
    layers = model.layers()
    dtypes = sorted({str(layer.dtype) for layer in layers.values()})
    rows = [
        ("active adapter", repr(active)),
        ("state", state),
        ("dtype", ", ".join(dtypes) or "-"),
        ("parameters", f"{count(trainable)} trainable (active adapter) · {count(total)} total "
                       f"({percent(trainable, total)} trainable)"),
    ]
    adapters = grid_table(["adapter", "modules", "r", "lora_alpha", "trainable", ""], adapter_rows)
    module_rows = []
    for path, layer in list(layers.items())[:MAX_MODULE_ROWS]:
        kind = "linear" if hasattr(layer, "in_features") else "embedding"
        (_, a), (_, b) = layer.named_parameters()
        weight = shape(layer.weight.shape) + ("" if layer.weight.flags.writeable else " read-only")
        module_rows.append([path, kind, weight, shape(a.shape), shape(b.shape),
                            number(layer.scaling), "yes" if layer.merged else "no"])
    modules = grid_table(["module", "kind", "weight", "A", "B", "scaling", "merged"], module_rows)
    more = len(layers) - len(module_rows)
    tail = f"<div>… and {more} more module(s)</div>" if more > 0 else ""
    subtitle = f"{len(layers)} adapted modules, {len(model.adapter_names)} adapter(s)"
    return key_value_table("LoraModel", rows, subtitle, adapters + modules + tail)


def config_html(config: Any) -> str:
    """HTML summary of a LoraConfig: r, lora_alpha, the resulting scaling and every non-default field."""
    from dataclasses import fields

    default = type(config)()
    rows = []
    for field in fields(config):
        value = getattr(config, field.name)
        if field.name == "extra" or (field.name not in ("r", "lora_alpha")
                                     and value == getattr(default, field.name)):
            continue
        rows.append((field.name, repr(value)))
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    rows.insert(2, ("scaling", f"{number(scaling)} ({_scaling_rule(config.use_rslora)})"))
    if config.rank_pattern or config.alpha_pattern:
        rows[2] = (rows[2][0], rows[2][1] + "; per module after rank/alpha patterns")
    if config.extra:
        rows.append(("extra", f"{len(config.extra)} kept key(s): " + ", ".join(sorted(config.extra))))
    return key_value_table("LoraConfig", rows, "PEFT-compatible")


_HYPERPARAMETERS = ("lr", "betas", "eps", "momentum", "dampening", "weight_decay", "nesterov")


def optimizer_html(optimizer: Any) -> str:
    """HTML summary of an optimizer: hyperparameters, what it updates, steps taken."""
    rows = []
    for name in _HYPERPARAMETERS:
        if hasattr(optimizer, name):
            value = getattr(optimizer, name)
            text = (str(value) if isinstance(value, bool) else
                    "(" + ", ".join(number(v) for v in value) + ")" if isinstance(value, (tuple, list))
                    else number(value))  # betas may have been assigned a list
            rows.append((name, text))
    values = sum(param.size for param, _ in optimizer.params)
    dtypes = sorted({str(param.dtype) for param, _ in optimizer.params})
    rows += [("parameters", f"{len(optimizer.params)} arrays, {count(values)} values, "
                            + ", ".join(dtypes)),
             ("steps", str(optimizer.step_count))]
    return key_value_table(type(optimizer).__name__, rows)
