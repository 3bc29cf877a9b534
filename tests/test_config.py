from __future__ import annotations

import enum
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pytest

from nplora.config import CONFIG_NAME, LoraConfig

# The fields nplora models and their defaults, as in PEFT's LoraConfig.
DEFAULTS: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "use_dora": False,
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
}

# What PEFT 0.21.2 writes for LoraConfig(r=4, target_modules=["q"]).save_pretrained(d).
PEFT_SAVED: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": False,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": "0.21.2",
    "qalora_group_size": 16,
    "r": 4,
    "rank_pattern": {},
    "revision": None,
    "target_modules": ["q"],
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}


def test_defaults() -> None:
    cfg = LoraConfig()
    for name, value in DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    assert cfg.extra == {}


def test_defaults_equal_peft() -> None:
    peft = pytest.importorskip("peft")
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in DEFAULTS:
        assert getattr(ours, name) == getattr(theirs, name), name


def test_default_fields_are_peft_fields() -> None:
    peft = pytest.importorskip("peft")
    assert set(LoraConfig().to_dict()) <= set(peft.LoraConfig().to_dict())


def test_mutable_defaults_not_shared() -> None:
    a, b = LoraConfig(), LoraConfig()
    a.rank_pattern["x"] = 2
    a.extra["k"] = 1
    assert b.rank_pattern == {} and b.extra == {}


def test_to_dict_has_no_extra_key_and_copies() -> None:
    cfg = LoraConfig(target_modules=["q"], extra={"loftq_config": {"a": [1]}})
    d = cfg.to_dict()
    assert "extra" not in d
    assert d["loftq_config"] == {"a": [1]}
    d["loftq_config"]["a"].append(2)
    d["target_modules"].append("v")
    assert cfg.extra["loftq_config"] == {"a": [1]}
    assert cfg.target_modules == ["q"]


def test_dict_round_trip() -> None:
    cfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        exclude_modules="lm_head",
        fan_in_fan_out=True,
        use_rslora=True,
        init_lora_weights="gaussian",
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        rank_pattern={"q_proj": 4},
        alpha_pattern={"v_proj": 2.5},
        task_type="CAUSAL_LM",
        base_model_name_or_path="gpt2",
        revision="main",
        inference_mode=True,
        extra={"peft_version": "0.21.2"},
    )
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg


def test_json_round_trip_keeps_every_peft_key(tmp_path: Path) -> None:
    cfg = LoraConfig.from_dict(PEFT_SAVED)
    assert cfg.r == 4 and cfg.target_modules == ["q"]
    assert set(cfg.extra) == set(PEFT_SAVED) - set(DEFAULTS)
    cfg.save_pretrained(tmp_path)
    written = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert written == PEFT_SAVED
    assert LoraConfig.from_pretrained(tmp_path) == cfg


def test_unknown_future_keys_are_kept(tmp_path: Path) -> None:
    d = {"r": 2, "some_future_field": {"nested": [1, 2]}, "auto_mapping": {"base_model_class": "X"}}
    cfg = LoraConfig.from_dict(d)
    assert cfg.extra == {"some_future_field": {"nested": [1, 2]}, "auto_mapping": {"base_model_class": "X"}}
    cfg.to_json(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["some_future_field"] == {"nested": [1, 2]}


def test_json_is_sorted_and_indented_like_peft(tmp_path: Path) -> None:
    LoraConfig(r=4).to_json(tmp_path / "c.json")
    text = (tmp_path / "c.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_from_pretrained_subfolder(tmp_path: Path) -> None:
    cfg = LoraConfig(r=3)
    cfg.save_pretrained(tmp_path / "other")
    assert LoraConfig.from_pretrained(tmp_path, subfolder="other") == cfg


def test_from_json_rejects_non_object(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        LoraConfig.from_json(tmp_path / "c.json")


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(TypeError, match="config"):
        LoraConfig.from_dict([("r", 4)])  # type: ignore[arg-type]


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    LoraConfig(r=4).save_pretrained(tmp_path)
    LoraConfig(r=5).save_pretrained(tmp_path)  # overwrite in place
    assert os.listdir(tmp_path) == [CONFIG_NAME]
    assert LoraConfig.from_pretrained(tmp_path).r == 5


def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    LoraConfig(r=4).save_pretrained(tmp_path)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        LoraConfig(r=5).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [CONFIG_NAME]
    assert LoraConfig.from_pretrained(tmp_path).r == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r must be"),
        ({"r": -3}, "r must be"),
        ({"lora_alpha": math.nan}, "lora_alpha"),
        ({"lora_alpha": math.inf}, "lora_alpha"),
        ({"lora_alpha": -math.inf}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_dropout": math.nan}, "lora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"init_lora_weights": "uniform"}, "init_lora_weights"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"rank_pattern": {"q(": 2}}, "rank_pattern"),
        ({"alpha_pattern": {"q": math.nan}}, "alpha_pattern"),
        ({"alpha_pattern": {"q[": 1.0}}, "alpha_pattern"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"peft_type": "lora"}, "peft_type"),
        ({"task_type": "TRANSLATION"}, "task_type"),
        ({"layers_to_transform": -1}, "layers_to_transform"),
        ({"layers_to_transform": [0, -2]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"target_modules": ".*q", "layers_to_transform": 0}, "layers_to_transform"),
        ({"target_modules": ".*q", "layers_pattern": "h"}, "layers_pattern"),
        ({"extra": {"r": 4}}, "extra"),
    ],
)
def test_value_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": True}, "r must be"),
        ({"r": 4.0}, "r must be"),
        ({"r": "4"}, "r must be"),
        ({"lora_alpha": "16"}, "lora_alpha"),
        ({"lora_alpha": True}, "lora_alpha"),
        ({"lora_dropout": None}, "lora_dropout"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"use_dora": 0}, "use_dora"),
        ({"inference_mode": None}, "inference_mode"),
        ({"init_lora_weights": 1}, "init_lora_weights"),
        ({"init_lora_weights": None}, "init_lora_weights"),
        ({"target_modules": 3}, "target_modules"),
        ({"target_modules": ["q", 3]}, "target_modules"),
        ({"target_modules": {"q": 1}}, "target_modules"),
        ({"exclude_modules": 1.5}, "exclude_modules"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
        ({"layers_to_transform": "0"}, "layers_to_transform"),
        ({"layers_to_transform": [0, 1.0]}, "layers_to_transform"),
        ({"layers_to_transform": True}, "layers_to_transform"),
        ({"layers_pattern": 3, "layers_to_transform": 0}, "layers_pattern"),
        ({"rank_pattern": [("q", 2)]}, "rank_pattern"),
        ({"rank_pattern": {"q": 2.0}}, "rank_pattern"),
        ({"rank_pattern": {1: 2}}, "rank_pattern"),
        ({"alpha_pattern": {"q": "2"}}, "alpha_pattern"),
        ({"task_type": 3}, "task_type"),
        ({"base_model_name_or_path": 3}, "base_model_name_or_path"),
        ({"revision": 1}, "revision"),
        ({"extra": [("k", 1)]}, "extra"),
        ({"extra": {1: 2}}, "extra"),
        ({"extra": {"target_parameters": "experts.down_proj"}}, "target_parameters"),
    ],
)
def test_type_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        LoraConfig(**kwargs)


def test_validation_also_runs_on_save(tmp_path: Path) -> None:
    cfg = LoraConfig()
    cfg.r = 0
    with pytest.raises(ValueError, match="r must be"):
        cfg.save_pretrained(tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"bias": "lora_only"}, "bias"),
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"init_lora_weights": "pissa_niter_4"}, "pissa_niter_4"),
        ({"init_lora_weights": "olora"}, "olora"),
        ({"init_lora_weights": "loftq"}, "loftq"),
        ({"init_lora_weights": "corda"}, "corda"),
        ({"init_lora_weights": "mica"}, "mica"),
        ({"init_lora_weights": "lora_ga"}, "lora_ga"),
        ({"extra": {"lora_bias": True}}, "lora_bias"),
        ({"extra": {"target_parameters": ["experts.down_proj"]}}, "target_parameters"),
        ({"extra": {"trainable_token_indices": [1, 2]}}, "trainable_token_indices"),
        ({"extra": {"trainable_token_indices": {"embed_tokens": [1]}}}, "trainable_token_indices"),
        ({"extra": {"use_qalora": True}}, "use_qalora"),
        ({"extra": {"layer_replication": [[0, 2], [1, 3]]}}, "layer_replication"),
        ({"extra": {"alora_invocation_tokens": [5, 6]}}, "alora_invocation_tokens"),
        ({"extra": {"velora_config": {"num_groups": 4}}}, "velora_config"),
        ({"extra": {"monteclora_config": {"num_samples": 2}}}, "monteclora_config"),
        ({"extra": {"use_bdlora": {"nblocks": 2}}}, "use_bdlora"),
        ({"extra": {"arrow_config": {"top_k": 2}}}, "arrow_config"),
        ({"extra": {"kasa_config": {"beta": 0.1}}}, "kasa_config"),
        # {} is on in PEFT: it becomes the sub-config's defaults (it loaded as plain LoRA here).
        ({"extra": {"kasa_config": {}}}, "kasa_config"),
        ({"extra": {"arrow_config": {}}}, "arrow_config"),
        ({"extra": {"use_bdlora": {}}}, "use_bdlora"),
        ({"extra": {"velora_config": {}}}, "velora_config"),
        ({"extra": {"monteclora_config": {}}}, "monteclora_config"),
        ({"extra": {"ensure_weight_tying": True}}, "ensure_weight_tying"),
    ],
)
def test_not_implemented(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(NotImplementedError, match=match):
        LoraConfig(**kwargs)


def test_not_implemented_on_load() -> None:
    with pytest.raises(NotImplementedError, match="lora_bias"):
        LoraConfig.from_dict({**PEFT_SAVED, "lora_bias": True})


@pytest.mark.parametrize(
    "extra",
    [
        {"lora_bias": False, "target_parameters": [], "trainable_token_indices": None, "layer_replication": []},
        {"megatron_core": "my.megatron", "revision_note": "x", "qalora_group_size": 32, "loftq_config": {}},
        {"eva_config": None, "corda_config": None, "runtime_config": {"ephemeral_gpu_offload": False}},
    ],
)
def test_neutral_or_default_extras_are_accepted(extra: dict[str, Any]) -> None:
    assert LoraConfig(extra=extra).extra == extra


def test_empty_modules_to_save_is_accepted() -> None:
    assert LoraConfig(modules_to_save=[]).modules_to_save == []


@pytest.mark.parametrize("init", [True, False, "gaussian", "Gaussian"])
def test_supported_inits(init: bool | str) -> None:
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


def test_negative_and_zero_alpha_are_allowed_like_peft() -> None:
    assert LoraConfig(lora_alpha=-4).scaling_for("x") == -0.5
    assert LoraConfig(lora_alpha=0).scaling_for("x") == 0.0


def test_layer_selectors_accept_peft_forms() -> None:
    assert LoraConfig(layers_to_transform=3).layers_to_transform == 3
    assert LoraConfig(layers_to_transform=(0, 1)).layers_to_transform == [0, 1]
    cfg = LoraConfig(target_modules=["q"], layers_to_transform=[1], layers_pattern=["layers", "h"])
    assert cfg.layers_pattern == ["layers", "h"]


def test_set_target_modules_become_a_sorted_list() -> None:
    # peft.LoraConfig holds target_modules as a set; a config copied from one must still serialise.
    assert LoraConfig(target_modules={"v", "q"}).target_modules == ["q", "v"]
    assert LoraConfig(target_modules=".*(q|v)$").target_modules == ".*(q|v)$"


def test_str_enum_task_type_is_stored_as_plain_str() -> None:
    class TaskType(str, enum.Enum):
        CAUSAL_LM = "CAUSAL_LM"

    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM)  # type: ignore[arg-type]
    assert type(cfg.task_type) is str and cfg.task_type == "CAUSAL_LM"
    assert json.loads(json.dumps(cfg.to_dict()))["task_type"] == "CAUSAL_LM"


def test_numpy_scalars_are_stored_as_python_numbers() -> None:
    np = pytest.importorskip("numpy")
    cfg = LoraConfig(
        r=np.int64(4),
        lora_alpha=np.float32(8.0),
        layers_to_transform=np.arange(2),
        target_modules=["q"],
        rank_pattern={"q": np.int32(2)},
    )
    assert type(cfg.r) is int and type(cfg.lora_alpha) is float
    assert cfg.layers_to_transform == [0, 1] and type(cfg.rank_pattern["q"]) is int
    json.dumps(cfg.to_dict())


def test_int_alpha_stays_int_in_json() -> None:
    assert json.dumps(LoraConfig(lora_alpha=16).to_dict()["lora_alpha"]) == "16"


def test_rank_and_alpha_patterns() -> None:
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 2})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.rank_for("q_proj") == 4
    assert cfg.alpha_for("model.layers.0.self_attn.q_proj") == 2.0
    # the (.*\.)? anchor: a key matches a whole dotted component at the end, not a substring
    assert cfg.rank_for("model.layers.0.self_attn.xq_proj") == 8
    assert cfg.rank_for("model.layers.0.self_attn.q_proj.inner") == 8
    assert cfg.alpha_for("model.xq_proj") == 16.0
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 0.5
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == 2.0


def test_pattern_keys_are_regexes_with_dotted_tails() -> None:
    cfg = LoraConfig(rank_pattern={r"layers\.1\..*_proj": 2, "^model.layers.0.mlp.up": 6})
    assert cfg.rank_for("model.layers.1.self_attn.k_proj") == 2
    assert cfg.rank_for("model.layers.10.self_attn.k_proj") == 8
    # re.match anchors at the start, so "^" is harmless and a full-path key works
    assert cfg.rank_for("model.layers.0.mlp.up") == 6


def test_pattern_first_match_wins_in_dict_order() -> None:
    name = "model.layers.0.self_attn.q_proj"
    assert LoraConfig(rank_pattern={"q_proj": 2, r"self_attn\.q_proj": 4}).rank_for(name) == 2
    assert LoraConfig(rank_pattern={r"self_attn\.q_proj": 4, "q_proj": 2}).rank_for(name) == 4


def test_patterns_agree_with_peft_get_pattern_key() -> None:
    pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key

    pattern = {"q_proj": 2, r"layers\.1\..*": 3, "^model.layers.2.mlp.down_proj": 5, "0.mlp.up_proj": 7}
    cfg = LoraConfig(rank_pattern=pattern)
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.10.mlp.up_proj",
        "xq_proj",
    ]
    for name in names:
        assert cfg.rank_for(name) == pattern.get(get_pattern_key(pattern.keys(), name), 8), name


def test_rslora_scaling() -> None:
    cfg = LoraConfig(r=16, lora_alpha=8, use_rslora=True, rank_pattern={"k": 4})
    assert cfg.scaling_for("a.q") == pytest.approx(2.0)
    assert cfg.scaling_for("a.k") == pytest.approx(4.0)
    assert LoraConfig(r=16, lora_alpha=8).scaling_for("a.q") == 0.5


def test_unmatched_pattern_keys() -> None:
    cfg = LoraConfig(rank_pattern={"q_proj": 2, "nothing": 3}, alpha_pattern={"v_proj": 1, "zz": 2})
    names = ["m.l.0.q_proj", "m.l.0.v_proj"]
    assert cfg.unmatched_pattern_keys(names) == {"rank_pattern": ["nothing"], "alpha_pattern": ["zz"]}
    assert LoraConfig().unmatched_pattern_keys(names) == {"rank_pattern": [], "alpha_pattern": []}


def test_repr_shows_only_non_defaults() -> None:
    assert repr(LoraConfig()) == "LoraConfig(r=8, lora_alpha=8)"
    text = repr(LoraConfig(lora_alpha=16, target_modules=["q_proj", "v_proj"], extra={"peft_version": "x"}))
    assert text == "LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'], extra=<1 keys>)"


# ----------------------------------------------------------------------------- PEFT interop


def test_nplora_file_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    cfg = LoraConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["lm_head"],
        use_rslora=True,
        init_lora_weights="gaussian",
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
        task_type="CAUSAL_LM",
        base_model_name_or_path="some/model",
        revision="abc",
        inference_mode=True,
    )
    cfg.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns on keys it does not know
        theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    for name in DEFAULTS:
        value = getattr(theirs, name)
        if isinstance(value, set):
            value = sorted(value)
        assert value == getattr(cfg, name), name


def test_peft_file_loads_in_nplora_without_loss(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    peft.LoraConfig(
        r=4,
        lora_alpha=32,
        target_modules=["q"],
        rank_pattern={"q": 2},
        use_rslora=True,
        task_type="SEQ_CLS",
    ).save_pretrained(str(tmp_path))
    original = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg = LoraConfig.from_pretrained(tmp_path)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.task_type) == (4, 32, ["q"], "SEQ_CLS")
    assert cfg.to_dict() == original
    cfg.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text()) == original
