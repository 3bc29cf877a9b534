"""repr and _repr_html_ of layers, models, configs and optimizers: short, complete, no arrays."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import nplora
from nplora.display import MAX_MODULE_ROWS

MARKER = 123.456  # a value that must never appear in a summary: arrays are not printed


def text_of(html: str) -> str:
    """The visible text of a summary, checked to be well-formed markup on the way."""
    root = ET.fromstring(html)
    assert root.tag == "div" and root.get("class") == "nplora-repr"
    return " ".join(" ".join(root.itertext()).split())


def rows_of(html: str) -> dict[str, str]:
    """The first table's key -> value rows."""
    table = ET.fromstring(html).find("table")
    assert table is not None
    return {row[0].text or "": row[1].text or "" for row in table.findall("tr")}


@pytest.fixture
def linear(dtype):
    weight = np.full((24, 40), MARKER, dtype=dtype)
    return nplora.LoraLinear(weight, np.zeros(24, dtype), r=4, lora_alpha=16, lora_dropout=0.1,
                             seed=0)


def test_linear_html_shows_shapes_settings_state_and_counts(linear, dtype):
    html = linear._repr_html_()
    rows = rows_of(html)
    assert rows["dtype"] == np.dtype(dtype).name
    assert rows["weight"].startswith("(24, 40)")
    assert rows["bias"] == "(24,)"
    assert rows["lora_A"] == "(4, 40)" and rows["lora_B"] == "(24, 4)"
    assert rows["r"] == "4" and rows["lora_alpha"] == "16"
    assert rows["scaling"].startswith("4 (lora_alpha / r)")
    assert rows["lora_dropout"] == "0.1"
    assert rows["state"] == "training · unmerged"
    trainable, frozen = 4 * 40 + 24 * 4, 24 * 40 + 24
    assert rows["parameters"].startswith(f"{trainable:,} trainable · {frozen:,} frozen · "
                                         f"{trainable + frozen:,} total")
    assert "LoraLinear" in text_of(html) and "40 → 24" in text_of(html)
    assert str(MARKER) not in html


def test_linear_html_follows_the_state(linear):
    linear.eval()
    linear.merge()
    assert rows_of(linear._repr_html_())["state"] == "eval · merged"
    with pytest.warns(nplora.LoraWarning, match="unmerging"):
        linear.adapter_enabled = False
    assert rows_of(linear._repr_html_())["state"] == "eval · unmerged · adapter disabled"


def test_linear_repr_is_one_short_line(linear):
    linear.adapter_enabled = False
    text = repr(linear)
    assert "\n" not in text and len(text) < 300
    for part in ("in_features=40", "out_features=24", "r=4", "lora_alpha=16", "scaling=4",
                 "lora_dropout=0.1", "merged=False", "training=True", "trainable=256",
                 "frozen=984", "adapter_enabled=False"):
        assert part in text
    assert str(MARKER) not in text


def test_rslora_and_fan_in_fan_out_are_shown(rng):
    layer = nplora.LoraLinear(rng.standard_normal((6, 3)), r=4, use_rslora=True,
                              fan_in_fan_out=True)
    rows = rows_of(layer._repr_html_())
    assert "fan_in_fan_out" in rows["weight"] and rows["bias"] == "none"
    assert rows["scaling"] == "4 (lora_alpha / sqrt(r), rsLoRA)"
    assert rows["lora_A"] == "(4, 6)" and rows["lora_B"] == "(3, 4)"
    assert "fan_in_fan_out=True" in repr(layer)


def test_embedding_html_and_repr(dtype):
    layer = nplora.LoraEmbedding(np.full((50, 8), MARKER, dtype), r=2, padding_idx=0, seed=0)
    html = layer._repr_html_()
    rows = rows_of(html)
    assert rows["lora_embedding_A"] == "(2, 50)" and rows["lora_embedding_B"] == "(8, 2)"
    assert rows["padding_idx"] == "0" and rows["weight"].startswith("(50, 8)")
    assert rows["parameters"].startswith("116 trainable · 400 frozen")
    assert "LoraEmbedding" in text_of(html) and str(MARKER) not in html
    text = repr(layer)
    assert "num_embeddings=50" in text and "padding_idx=0" in text and "trainable=116" in text


def test_read_only_weight_is_marked(rng, tmp_path):
    np.save(tmp_path / "w.npy", rng.standard_normal((4, 3)))
    layer = nplora.LoraLinear(np.load(tmp_path / "w.npy", mmap_mode="r"), r=1)
    assert "read-only" in rows_of(layer._repr_html_())["weight"]


def make_model(rng, layers=3, dtype=np.float32, **config):
    base = {}
    for i in range(layers):
        for name in ("q_proj", "v_proj"):
            base[f"model.layers.{i}.self_attn.{name}.weight"] = np.full((16, 8), MARKER, dtype)
    base["model.embed_tokens.weight"] = rng.standard_normal((30, 8)).astype(dtype)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    return nplora.LoraModel(base, nplora.LoraConfig(**config), seed=0)


def test_model_html_shows_adapters_state_counts_and_modules(rng):
    model = make_model(rng, layers=2)
    model.add_adapter("other", nplora.LoraConfig(r=2, target_modules=["q_proj"]))
    html = model._repr_html_()
    text = text_of(html)
    rows = rows_of(html)
    assert rows["active adapter"] == "'default'"
    assert rows["state"] == "training" and rows["dtype"] == "float32"
    trainable, total = model.get_nb_trainable_parameters()
    assert rows["parameters"].startswith(f"{trainable:,} trainable (active adapter) · {total:,} total")
    assert "4 adapted modules, 2 adapter(s)" in text
    tables = ET.fromstring(html).findall("table")
    adapters = [[cell.text or "" for cell in row] for row in tables[1].findall("tr")[1:]]
    assert adapters == [["default", "4", "4", "8", f"{trainable:,}", "active"],
                        ["other", "2", "2", "8", "96", ""]]
    modules = [[cell.text or "" for cell in row] for row in tables[2].findall("tr")[1:]]
    assert modules[0] == ["model.layers.0.self_attn.q_proj", "linear", "(16, 8)", "(4, 8)",
                          "(16, 4)", "2", "no"]
    assert str(MARKER) not in html


def test_model_html_is_short_for_large_models(rng):
    model = make_model(rng, layers=40)
    html = model._repr_html_()
    modules = ET.fromstring(html).findall("table")[2].findall("tr")[1:]
    assert len(modules) == MAX_MODULE_ROWS
    assert f"… and {80 - MAX_MODULE_ROWS} more module(s)" in text_of(html)
    assert len(html) < 10_000


def test_model_html_and_repr_follow_merges_and_disabling(rng):
    model = make_model(rng)
    model.eval()
    model.merge_adapter()
    html = model._repr_html_()
    assert rows_of(html)["state"] == "eval"
    assert "active, merged in 6/6 modules" in text_of(html)
    assert "merged=True" in repr(model)
    with model.disable_adapter():
        assert rows_of(model._repr_html_())["state"] == "eval · adapters disabled"
        assert "adapters_disabled=True" in repr(model)
    model.layers()["model.layers.0.self_attn.q_proj"].train()
    assert rows_of(model._repr_html_())["state"] == "mixed train/eval"


def test_model_html_escapes_module_names(rng):
    base = {"a<b>&c.fc1.weight": rng.standard_normal((3, 3))}
    model = nplora.LoraModel(base, nplora.LoraConfig(r=1, target_modules=["fc1"]))
    html = model._repr_html_()
    assert "a&lt;b&gt;&amp;c.fc1" in html
    assert "a<b>&c.fc1" in text_of(html)


def test_model_over_memory_mapped_weights_displays(rng, tmp_path):
    nplora.save_weights(tmp_path / "model.safetensors",
                        {"fc.weight": rng.standard_normal((6, 4)).astype(np.float32)})
    model = nplora.LoraModel(nplora.open_weights(tmp_path / "model.safetensors"),
                             nplora.LoraConfig(r=2, target_modules=["fc"]))
    assert "read-only" in model["fc"]._repr_html_()
    html = model._repr_html_()
    assert "1 adapted modules" in text_of(html)
    assert ["fc", "linear", "(6, 4) read-only"] == [
        cell.text for cell in ET.fromstring(html).findall("table")[2].findall("tr")[1]][:3]


def test_config_html_shows_non_defaults_and_scaling():
    config = nplora.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                               lora_dropout=0.05, extra={"peft_version": "0.13.0"})
    html = config._repr_html_()
    rows = rows_of(html)
    assert rows["r"] == "16" and rows["lora_alpha"] == "32"
    assert rows["scaling"] == "2 (lora_alpha / r)"
    assert rows["target_modules"] == "['q_proj', 'v_proj']" and rows["lora_dropout"] == "0.05"
    assert rows["extra"] == "1 kept key(s): peft_version"
    assert "fan_in_fan_out" not in rows  # defaults are left out
    rows = rows_of(nplora.LoraConfig(r=16, lora_alpha=8, use_rslora=True,
                                     rank_pattern={"q": 4})._repr_html_())
    assert rows["scaling"].startswith("2 (lora_alpha / sqrt(r), rsLoRA); per module")


def test_optimizer_html_and_repr(rng):
    layer = nplora.LoraLinear(rng.standard_normal((6, 5)).astype(np.float32), r=2)
    adamw = nplora.AdamW(layer, lr=1e-3)
    rows = rows_of(adamw._repr_html_())
    assert rows == {"lr": "0.001", "betas": "(0.9, 0.999)", "eps": "1e-08", "weight_decay": "0.01",
                    "parameters": "2 arrays, 22 values, float32", "steps": "0"}
    layer(rng.standard_normal((3, 5)))
    layer.backward(np.ones((3, 6)))
    adamw.step()
    assert rows_of(adamw._repr_html_())["steps"] == "1" and "steps=1" in repr(adamw)
    sgd = nplora.SGD(layer, lr=0.1, momentum=0.9, nesterov=True)
    rows = rows_of(sgd._repr_html_())
    assert rows["momentum"] == "0.9" and rows["nesterov"] == "True"
    assert re.fullmatch(r"SGD\(.*\)", repr(sgd))


def test_optimizer_html_with_betas_assigned_a_list():
    layer = nplora.LoraLinear(np.ones((3, 4), np.float32), r=1)
    optimizer = nplora.AdamW(layer)
    optimizer.betas = [0.8, 0.9]  # step() takes a list too; the display raised TypeError
    assert "(0.8, 0.9)" in optimizer._repr_html_()
