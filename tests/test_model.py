"""LoraModel over a dict of Hugging Face-named weights: matching, adapters, files, mixed batches."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

import nplora
from nplora import LoraConfig, LoraModel

HIDDEN, VOCAB, LAYERS = 8, 20, 3


def toy_weights(rng, dtype=np.float32):
    weights = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(dtype)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}"
        for name, shape in [("self_attn.q_proj", (HIDDEN, HIDDEN)), ("self_attn.v_proj", (4, HIDDEN)),
                            ("mlp.up_proj", (12, HIDDEN)), ("mlp.down_proj", (HIDDEN, 12))]:
            weights[f"{prefix}.{name}.weight"] = rng.standard_normal(shape).astype(dtype)
        weights[f"{prefix}.self_attn.q_proj.bias"] = rng.standard_normal(HIDDEN).astype(dtype)
        weights[f"{prefix}.input_layernorm.weight"] = np.ones(HIDDEN, dtype)
    weights["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN)).astype(dtype)
    return weights


def randomise(model, rng):
    for _, array in model.named_parameters():
        array[...] = rng.standard_normal(array.shape) * 0.1


def test_target_matching_follows_peft(rng):
    weights = toy_weights(rng)
    model = LoraModel(weights, LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert sorted(model.targets) == sorted(f"model.layers.{i}.self_attn.{m}" for i in range(3)
                                           for m in ("q_proj", "v_proj"))
    regex = LoraModel(weights, LoraConfig(target_modules=r".*\.mlp\.(up|down)_proj"))
    assert len(regex.targets) == 6
    layered = LoraModel(weights, LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 2]))
    assert layered.targets == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    excluded = LoraModel(weights, LoraConfig(target_modules=["q_proj"],
                                             exclude_modules=["model.layers.1.self_attn.q_proj"]))
    assert "model.layers.1.self_attn.q_proj" not in excluded.targets and len(excluded.targets) == 2
    everything = LoraModel(weights, LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in everything.targets and "model.embed_tokens" not in everything.targets
    assert len(everything.targets) == 12  # 1-D layernorm weights are not modules
    with pytest.raises(ValueError, match="matched none"):
        LoraModel(weights, LoraConfig(target_modules=["nope"]))
    with pytest.warns(nplora.LoraWarning, match="'nope' adapts nothing: it matched no module") as caught:
        model = LoraModel(weights, LoraConfig(target_modules=["q_proj", "nope"]))
    with pytest.warns(nplora.LoraWarning, match="'nada' adapts nothing: it matched no module") as caught_too:
        model.add_adapter("second", LoraConfig(target_modules=["q_proj", "nada"]))
    # Matched, then all excluded: the warning said "matched no module", which was not so.
    with pytest.warns(nplora.LoraWarning,
                      match="'v_proj' adapts nothing: its 3 module.s. are all left out by exclude_modules"):
        LoraModel(weights, LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]))
    # Both point at the line that asked, not into nplora.
    assert [w.filename for w in [*caught, *caught_too]] == [__file__, __file__]


def test_rank_and_alpha_patterns(rng):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6},
                        alpha_pattern={"q_proj": 3})
    model = LoraModel(toy_weights(rng), config)
    assert model["model.layers.0.self_attn.q_proj"].r == 2
    assert model["model.layers.1.self_attn.q_proj"].r == 4
    assert model["model.layers.1.self_attn.v_proj"].r == 6
    assert model["model.layers.1.self_attn.q_proj"].scaling == 3 / 4
    assert model["model.layers.1.self_attn.v_proj"].scaling == 8 / 6
    with pytest.warns(nplora.LoraWarning, match="'k_proj' matched no targeted module"):
        LoraModel(toy_weights(rng), LoraConfig(target_modules=["q_proj"], rank_pattern={"k_proj": 2}))


def test_layers_are_over_the_base_weights_and_embeddings_are_recognised(rng):
    weights = toy_weights(rng)
    model = LoraModel(weights, LoraConfig(target_modules=["q_proj", "embed_tokens"]), seed=0)
    q = model["model.layers.0.self_attn.q_proj"]
    assert isinstance(q, nplora.LoraLinear) and q.weight is weights["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q.bias, weights["model.layers.0.self_attn.q_proj.bias"])
    emb = model["model.embed_tokens"]
    assert isinstance(emb, nplora.LoraEmbedding)
    custom = LoraModel(weights, LoraConfig(target_modules=["lm_head"]), embedding_modules=["lm_head"])
    assert isinstance(custom["lm_head"], nplora.LoraEmbedding)
    with pytest.raises(KeyError, match="has no adapter"):
        model["model.layers.0.mlp.up_proj"]


def test_trainable_parameters(rng, capsys):
    weights = toy_weights(rng)
    model = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 3 * 2 * (HIDDEN + HIDDEN)
    assert total == sum(w.size for w in weights.values()) + trainable
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out


def test_save_and_load_round_trip(rng, tmp_path):
    weights = toy_weights(rng)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "embed_tokens"], use_rslora=True,
                        rank_pattern={"layers.2.self_attn.q_proj": 5})
    model = LoraModel(weights, config, seed=1)
    randomise(model, rng)
    model.save_adapter(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 3 and saved["use_rslora"] is True and saved["peft_type"] == "LORA"
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"].shape == (5, HIDDEN)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (3, VOCAB)

    loaded = nplora.load_adapter(tmp_path, weights)
    x = rng.standard_normal((4, HIDDEN)).astype(np.float32)
    ids = np.array([[1, 5], [19, 0]])
    for path in model.targets:
        inputs = ids if "embed" in path else x
        np.testing.assert_allclose(loaded.forward(path, inputs), model.forward(path, inputs), rtol=1e-6)


def test_several_adapters(rng, tmp_path):
    weights = toy_weights(rng)
    model = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj"]), seed=0)
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=1)
    randomise(model, rng)
    model.set_adapter("other")
    randomise(model, rng)
    assert model.adapter_names == ["default", "other"]
    path = "model.layers.1.self_attn.q_proj"
    x = rng.standard_normal((5, HIDDEN)).astype(np.float32)
    w, b = weights[path + ".weight"], weights[path + ".bias"]
    base = x @ w.T + b
    other = model[path]
    assert other.r == 4
    # float32 sums in another order than NumPy's: an output near zero after cancellation differs
    # by a few ulps of the row's scale, not of its own size (atol).
    np.testing.assert_allclose(model.forward(path, x),
                               base + other.scaling * x @ other.lora_A.T @ other.lora_B.T,
                               rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        np.testing.assert_allclose(model.forward(path, x), base, rtol=1e-5, atol=1e-5)
    assert model[path].adapter_enabled

    model.save_adapter(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    fresh = nplora.load_adapter(tmp_path, weights)
    fresh.load_adapter(tmp_path, "other")
    fresh.set_adapter("other")
    np.testing.assert_allclose(fresh.forward(path, x), model.forward(path, x), rtol=1e-6)

    model.delete_adapter("other")
    assert model.adapter_names == ["default"] and model.active_adapter == "default"
    with pytest.raises(KeyError, match="no adapter 'other'"):
        model.set_adapter("other")


def test_mixed_batch_matches_per_row_reference(rng):
    weights = toy_weights(rng)
    model = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), seed=0)
    for name, seed in (("b", 1), ("c", 2)):
        model.add_adapter(name, LoraConfig(r=3, target_modules=["q_proj", "embed_tokens"]), seed=seed)
    for name in model.adapter_names:
        model.set_adapter(name)
        randomise(model, rng)
    path = "model.layers.0.self_attn.q_proj"
    x = rng.standard_normal((7, HIDDEN)).astype(np.float32)
    ids = ["b", None, "default", "c", "c", "__base__", "b"]
    y = model.forward(path, x, adapter_ids=ids)
    for row, name in enumerate(ids):
        if name in (None, "__base__"):
            with model.disable_adapter():
                expected = model.forward(path, x[row])
        else:
            model.set_adapter(name)
            expected = model.forward(path, x[row])
        np.testing.assert_allclose(y[row], expected, rtol=1e-5, atol=1e-6)
    as_ints = model.forward(path, x, adapter_ids=[1, -1, 0, 2, 2, -1, 1])
    np.testing.assert_allclose(as_ints, y)
    tokens = np.array([3, 3, 7])
    emb = model.forward("model.embed_tokens", tokens, adapter_ids=["c", -1, "default"])
    model.set_adapter("c")
    np.testing.assert_allclose(emb[0], model.forward("model.embed_tokens", tokens)[0], rtol=1e-6)
    np.testing.assert_allclose(emb[1], weights["model.embed_tokens.weight"][3])
    with pytest.raises(ValueError, match=r"adapter_ids must have shape \(7,\)"):
        model.forward(path, x, adapter_ids=[0, 1])
    with pytest.raises(KeyError, match="no adapter 'zzz'"):
        model.forward(path, x, adapter_ids=["zzz"] * 7)
    with pytest.raises(IndexError, match="out of range"):
        model.forward(path, x, adapter_ids=[5] * 7)


def test_mixed_batch_follows_disabled_adapters_and_checks_every_id(rng):
    weights = toy_weights(rng)
    weights["model.layers.0.self_attn.q_proj.bias"] = weights[
        "model.layers.0.self_attn.q_proj.bias"].astype(np.float64)  # not the weight's dtype
    config = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    model = LoraModel(weights, config, seed=0)
    path, table = "model.layers.0.self_attn.q_proj", weights["model.embed_tokens.weight"]
    w, b = weights[path + ".weight"], weights[path + ".bias"]
    x = rng.standard_normal((3, HIDDEN)).astype(np.float32)
    tokens = np.array([1, 2, 3])
    with_adapter = model.forward(path, x, adapter_ids=[0, 0, -1])
    assert not np.allclose(with_adapter[0], x[0] @ w.T + b, rtol=1e-4)
    np.testing.assert_allclose(with_adapter[2], x[2] @ w.T + b, rtol=1e-5, atol=1e-6)
    with model.disable_adapter():  # as PEFT: disabled adapters leave every row to the base
        np.testing.assert_allclose(model.forward(path, x, adapter_ids=[0, 0, -1]), x @ w.T + b,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            model.forward("model.embed_tokens", tokens, adapter_ids=[0, 0, 0]), table[tokens])
    # An id the plain forward rejects is rejected here too (NumPy's table[-1] is the last row).
    for bad in (-1, VOCAB):
        with pytest.raises(IndexError, match=f"index {bad} at position 1 is out of range"):
            model.forward("model.embed_tokens", np.array([0, bad]), adapter_ids=[0, 0])
    # An unsigned 2**64 - 1 is not -1 (the base model).
    with pytest.raises(IndexError, match="18446744073709551615 is out of range"):
        model.forward(path, x, adapter_ids=np.array([0, 0, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(IndexError, match="18446744073709551616 is out of range"):
        model.forward(path, x, adapter_ids=[0, "default", 2**64])  # a list: Python ints
    with pytest.raises(IndexError, match="index 18446744073709551615 at position 1 is out of range"):
        model.forward("model.embed_tokens", np.array([0, 2**64 - 1], np.uint64), adapter_ids=[0, 0])
    # NumPy's arithmetic in the mixed embedding path follows the layer's: inf, not an error.
    huge = LoraModel({"model.embed_tokens.weight": np.ones((4, 2), np.float32)},
                     LoraConfig(r=1, target_modules=["embed_tokens"]), seed=0)
    emb = huge["model.embed_tokens"]
    emb.lora_embedding_A, emb.lora_embedding_B = np.full((1, 4), 1e30), np.full((2, 1), 1e30)
    with np.errstate(all="raise"):  # 1e60 overflows float32
        assert np.isinf(huge.forward("model.embed_tokens", [1], adapter_ids=[0])).all()
        assert np.isinf(emb([1])).all()


def test_a_mixed_batch_in_training_mode_leaves_no_forward_for_backward(rng):
    # It keeps nothing; before, the training forward before it stayed, and a backward paired that
    # forward's input with the mixed batch's gradient (no error, gradients for the old input).
    config = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    model = LoraModel(toy_weights(rng, np.float64), config, seed=0).train()
    path = "model.layers.0.self_attn.q_proj"
    x = rng.standard_normal((3, HIDDEN))
    for module, inputs, grad in ((path, x, np.ones((3, HIDDEN))),
                                 ("model.embed_tokens", np.array([1, 2, 3]), np.ones((3, HIDDEN)))):
        model.forward(module, inputs)
        model.forward(module, inputs, adapter_ids=[0, 0, -1])
        with pytest.raises(RuntimeError, match="needs a forward"):
            model[module].backward(grad)
        model.forward(module, inputs)  # a plain training forward after it serves a backward again
        model[module].backward(grad)
    # A mixed batch that fails (an unknown adapter) drops nothing.
    model.forward(path, x)
    with pytest.raises(KeyError, match="names no adapter 'nope'"):
        model.forward(path, x, adapter_ids=[0, "nope", -1])
    model[path].backward(np.ones((3, HIDDEN)))


def test_padding_idx_reaches_the_embedding_layers(rng, tmp_path):
    weights = toy_weights(rng, np.float64)
    config = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    model = LoraModel(weights, config, seed=0, padding_idx={"model.embed_tokens": -VOCAB})
    layer = model["model.embed_tokens"]
    assert layer.padding_idx == 0
    layer(np.array([0, 1, 0]))
    layer.backward(np.ones((3, HIDDEN)))
    assert not layer.lora_embedding_A_grad[:, 0].any() and layer.lora_embedding_A_grad[:, 1].all()
    model.add_adapter("other", config, seed=1)  # later adapters get it too
    assert model.layers("other")["model.embed_tokens"].padding_idx == 0
    with pytest.raises(AttributeError):
        layer.padding_idx = 1  # fixed at construction: assigning it was accepted and ignored
    model.save_adapter(tmp_path)
    loaded = nplora.load_adapter(tmp_path, weights, padding_idx={"model.embed_tokens": 3})
    assert loaded["model.embed_tokens"].padding_idx == 3
    other = nplora.load_adapter(tmp_path, weights, "other")  # from tmp_path/other, as the method
    assert other.adapter_names == ["other"]
    for path, layer in model.layers("other").items():
        for (name, got), (_, want) in zip(other[path].named_parameters(), layer.named_parameters()):
            assert np.array_equal(got, want), (path, name)
    with pytest.raises(KeyError, match="padding_idx names 'model.nope', which has no 2-D 'model.nope.weight'"):
        LoraModel(weights, config, padding_idx={"model.nope": 0})
    with pytest.raises(ValueError, match=rf"padding_idx\['model.embed_tokens'\] must be < {VOCAB}"):
        LoraModel(weights, config, padding_idx={"model.embed_tokens": VOCAB})
    with pytest.raises(TypeError, match="padding_idx must be a mapping"):
        LoraModel(weights, config, padding_idx=0)
    path = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=f"padding_idx names '{path}', which is adapted as a linear layer"):
        LoraModel(weights, config, padding_idx={path: 0})


def test_tied_weights_are_not_merged_in_place(rng):
    # lm_head.weight is embed_tokens.weight (tie_word_embeddings): merge_adapter() added both
    # updates into the one array, silently changing both modules' outputs.
    table = rng.standard_normal((VOCAB, HIDDEN))
    weights = {"model.embed_tokens.weight": table, "lm_head.weight": table,
               "model.layers.0.mlp.up_proj.weight": rng.standard_normal((HIDDEN, HIDDEN))}
    config = LoraConfig(r=2, target_modules=["embed_tokens", "lm_head", "up_proj"],
                        init_lora_weights=False)
    with pytest.warns(nplora.LoraWarning, match="lm_head.weight and model.embed_tokens.weight "
                                                r"are one array \(tied weights\)"):
        model = LoraModel(weights, config, seed=0)
    trainable, total = model.get_nb_trainable_parameters()  # the tied table counts once
    assert total - trainable == table.size + HIDDEN * HIDDEN
    before = table.copy()
    with pytest.raises(ValueError, match="tied weights.*merge_and_unload"):
        model.merge_adapter()
    assert np.array_equal(table, before) and not model["lm_head"].merged
    merged = model.merge_and_unload()  # each module its own merged array
    np.testing.assert_allclose(merged["lm_head.weight"], model["lm_head"].merged_weight())
    np.testing.assert_allclose(merged["model.embed_tokens.weight"],
                               model["model.embed_tokens"].merged_weight())
    assert not np.allclose(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # separate arrays: no warning, and merging works
        untied = LoraModel({**weights, "lm_head.weight": table.copy()}, config, seed=0)
    untied.merge_adapter()
    assert untied["lm_head"].merged
    # Two views of one buffer, one made read-only after the model was built: merge_adapter took
    # the buffer's guard once and looked only at the first view's flag.
    buffer = np.ones((2 * HIDDEN, HIDDEN))
    views = {"a.weight": buffer[:HIDDEN], "b.weight": buffer[HIDDEN:]}
    two = LoraModel(views, LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False), seed=0)
    views["b.weight"].flags.writeable = False
    with pytest.raises(ValueError, match="weight is read-only"):
        two.merge_adapter()
    assert np.all(buffer == 1)


def test_a_loaded_model_still_knows_its_embeddings(rng, tmp_path):
    # load_adapter() used to take the file's embedding modules as the model's only ones: an
    # all-linear adapter nplora saved could not be loaded back (embed_tokens counted as a linear
    # target the file lacked), and a later add_adapter made embed_tokens a LoraLinear.
    weights = toy_weights(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nplora.LoraWarning)
        LoraModel(weights, LoraConfig(r=2, target_modules="all-linear")).save_adapter(tmp_path / "all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing extra
        loaded = nplora.load_adapter(tmp_path / "all", weights)
    assert "model.embed_tokens" not in loaded.targets and len(loaded.targets) == 4 * LAYERS
    loaded.add_adapter("emb", LoraConfig(r=2, target_modules=["embed_tokens"]))
    assert isinstance(loaded.layers("emb")["model.embed_tokens"], nplora.LoraEmbedding)


def test_inits_that_only_choose_the_start_load_but_do_not_start(rng, tmp_path):
    # EVA and orthogonal inits leave the base weight alone, so an adapter trained from them loads
    # like any other (it was refused); nplora cannot start a new one that way.
    weights = toy_weights(rng)
    trained = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), seed=0)
    trained.save_adapter(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    for init in ("eva", "orthogonal", "Gaussian"):
        config = json.loads(config_file.read_text())
        config["init_lora_weights"] = init
        config_file.write_text(json.dumps(config))
        loaded = nplora.load_adapter(tmp_path, weights)
        path = "model.layers.0.self_attn.q_proj"
        assert np.array_equal(loaded[path].lora_A, trained[path].lora_A)
        assert np.array_equal(loaded[path].lora_B, trained[path].lora_B)
    for init in ("eva", "orthogonal"):
        with pytest.raises(NotImplementedError, match=f"init_lora_weights='{init}' is not supported "
                                                      "by nplora for a new adapter"):
            LoraModel(weights, LoraConfig(target_modules=["q_proj"], init_lora_weights=init))
    # PEFT compares "gaussian" in any case: the config took "Gaussian", the layers did not.
    gaussian = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="Gaussian"))
    layer = gaussian["model.layers.0.self_attn.q_proj"]  # PEFT's gaussian: A ~ N(0, 1/r), B = 0
    assert layer.lora_A.any() and not layer.lora_B.any()
    layer = nplora.LoraLinear(np.ones((3, 4)), r=2, init_lora_weights="GAUSSIAN", seed=0)
    assert np.array_equal(layer.lora_A, nplora.LoraLinear(np.ones((3, 4)), r=2, seed=0,
                                                          init_lora_weights="gaussian").lora_A)


def test_a_regex_that_matches_a_container_is_refused_as_in_peft(rng):
    # PEFT fullmatches the regex against containers too and refuses them; nplora adapted the
    # leaves and saved a file PEFT would not load.
    weights = toy_weights(rng)
    for pattern, container in ((r"model\.layers\.0\..*", "model.layers.0.mlp"),
                               (r".*self_attn.*", "model.layers.0.self_attn"), (r".*", "model")):
        with pytest.raises(ValueError, match=f"also matches '{container}', which holds other modules"):
            LoraModel(weights, LoraConfig(target_modules=pattern))
    assert len(LoraModel(weights, LoraConfig(target_modules=r".*self_attn\.(q|v)_proj")).targets) == 2 * LAYERS
    # A container that exclude_modules leaves out is no match (PEFT checks the exclusion first).
    excluded = LoraModel(weights, LoraConfig(target_modules=r"model\.layers\.\d+\.self_attn(\.q_proj)?",
                                             exclude_modules=r"model\.layers\.\d+\.self_attn"))
    assert sorted(excluded.targets) == [f"model.layers.{i}.self_attn.q_proj" for i in range(LAYERS)]


def test_merging_under_disable_adapter_keeps_the_base_model(rng):
    weights = toy_weights(rng, np.float64)
    path = "model.layers.0.self_attn.q_proj"
    original = weights[path + ".weight"].copy()
    model = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                      seed=0)
    x = rng.standard_normal((3, HIDDEN))
    base = x @ original.T + weights[path + ".bias"]
    with model.disable_adapter():
        np.testing.assert_allclose(model.merge_and_unload()[path + ".weight"], original)
        model.merge_adapter()  # in place, into weights[...]: the adapter is merged, still disabled
        assert model[path].merged
        np.testing.assert_allclose(model.forward(path, x), base, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(model.merge_and_unload()[path + ".weight"], original,
                                   rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.merge_and_unload()[path + ".weight"],
                               original + model[path].delta_weight(), rtol=1e-12, atol=1e-12)


def test_base_weights_in_other_layouts_and_dtypes(rng):
    weights = toy_weights(rng)
    path = "model.layers.0.self_attn.q_proj"
    weights[path + ".weight"] = np.asfortranarray(weights[path + ".weight"])
    model = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                      seed=0)
    model.add_adapter("other", LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False),
                      seed=1)
    first, second = model.layers("default")[path], model.layers("other")[path]
    assert np.shares_memory(first.weight, second.weight)  # one C copy, shared by both adapters
    x = rng.standard_normal((4, HIDDEN)).astype(np.float32)
    mixed = model.forward(path, x, adapter_ids=[0, 1, -1, 0])
    np.testing.assert_allclose(mixed[1], second(x[1]), rtol=1e-5, atol=1e-6)
    model.merge_adapter()
    model.set_adapter("other")  # a swap over the shared weight
    assert second.merged and not first.merged
    want = x @ (weights[path + ".weight"] + second.delta_weight()).T + weights[path + ".bias"]
    np.testing.assert_allclose(model.forward(path, x), want, rtol=1e-5, atol=1e-5)
    # A float16 or bfloat16 base's bias is widened with its weight (a bfloat16 bias was refused).
    try:
        import ml_dtypes
        halves_of = [np.float16, ml_dtypes.bfloat16]
    except ImportError:
        halves_of = [np.float16]
    for half in halves_of:
        halves = {k: v.astype(half) for k, v in toy_weights(rng).items()}
        half_model = LoraModel(halves, LoraConfig(r=2, target_modules=["q_proj"]), seed=0)
        got = half_model.forward(path, x)
        want = x @ halves[path + ".weight"].astype(np.float32).T + halves[path + ".bias"].astype(
            np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_batch_core_takes_only_layers_of_the_weights_shape(rng):
    # The core reads each adapter's A, B and scaling from its layer: a layer of another width, a
    # None or a layer of the other dtype is refused, not read past its end.
    from nplora import _core
    weight = rng.standard_normal((6, 5)).astype(np.float32)
    good = nplora.LoraLinear(weight, r=2, init_lora_weights=False, seed=0)
    narrow = nplora.LoraLinear(rng.standard_normal((6, 4)).astype(np.float32), r=2)
    wide64 = nplora.LoraLinear(weight.astype(np.float64), r=2)
    x, y = rng.standard_normal((3, 5)).astype(np.float32), np.empty((3, 6), np.float32)
    ids = np.array([0, 1, -1])
    with pytest.raises(ValueError, match="in_features 5 and out_features 6, got 4 and 6"):
        _core.mixed_linear_forward(weight, None, False, x, y, [good._core, narrow._core], ids)
    with pytest.raises(ValueError, match="must not contain None"):
        _core.mixed_linear_forward(weight, None, False, x, y, [good._core, None], ids)
    with pytest.raises(TypeError):
        _core.mixed_linear_forward(weight, None, False, x, y, [good._core, wide64._core], ids)
    _core.mixed_linear_forward(weight, None, False, x, y, [good._core, good._core], ids)
    want = x @ weight.T + good.scaling * (x @ good.lora_A.T) @ good.lora_B.T
    np.testing.assert_allclose(y[:2], want[:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[2], x[2] @ weight.T, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_and_in_place_merge(rng):
    weights = toy_weights(rng)
    originals = {k: v.copy() for k, v in weights.items()}
    model = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), seed=0)
    randomise(model, rng)
    merged = model.merge_and_unload()
    assert set(merged) == set(weights)
    path = "model.layers.0.self_attn.q_proj"
    layer = model[path]
    np.testing.assert_allclose(merged[path + ".weight"],
                               originals[path + ".weight"] + layer.scaling * layer.lora_B @ layer.lora_A,
                               rtol=1e-5, atol=1e-6)
    emb = model["model.embed_tokens"]
    np.testing.assert_allclose(
        merged["model.embed_tokens.weight"],
        originals["model.embed_tokens.weight"]
        + emb.scaling * (emb.lora_embedding_B @ emb.lora_embedding_A).T, rtol=1e-5, atol=1e-6)
    assert merged["lm_head.weight"] is weights["lm_head.weight"]
    for key in weights:  # the model's own weights are untouched
        np.testing.assert_array_equal(weights[key], originals[key])
    model.merge_adapter()
    np.testing.assert_allclose(weights[path + ".weight"], merged[path + ".weight"], rtol=1e-6)
    model.unmerge_adapter()
    np.testing.assert_allclose(weights[path + ".weight"], originals[path + ".weight"], atol=1e-5)


def test_safe_merge_checks_the_dtype_it_returns(rng):
    # The check ran on the float32 merge, before the cast back: 65000 + 1000 came back as inf.
    weights = {"q_proj.weight": np.full((4, 4), 65000, np.float16)}
    model = LoraModel(weights, LoraConfig(r=1, target_modules=["q_proj"]), seed=0)
    model["q_proj"].lora_A, model["q_proj"].lora_B = np.ones((1, 4)), np.full((4, 1), 1000 / 8)
    with pytest.raises(ValueError, match=r"NaNs or infinities in the merged q_proj.weight \(as float16\)"):
        model.merge_and_unload(safe_merge=True)
    assert np.isinf(model.merge_and_unload()["q_proj.weight"]).all()  # unchecked, as asked


def test_half_precision_bases_are_widened(rng):
    weights = toy_weights(rng, np.float16)
    model = LoraModel(weights, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    assert model["model.layers.0.self_attn.q_proj"].dtype == np.float32
    merged = model.merge_and_unload()
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == np.float16


def error_of(function, *args):
    try:
        function(*args)
    except Exception as error:  # noqa: BLE001 - the test looks at whichever error it was
        return error
    raise AssertionError("no error")


def test_loading_checks_every_tensor(rng, tmp_path):
    weights = toy_weights(rng)
    model = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_adapter(tmp_path)
    smaller = dict(weights)
    smaller["model.layers.1.self_attn.q_proj.weight"] = np.zeros((HIDDEN, 6), np.float32)
    with pytest.raises(nplora.AdapterMismatchError,
                       match=r"model.layers.1.self_attn.q_proj.weight has shape \(8, 6\).*need \(8, 8\)"):
        nplora.load_adapter(tmp_path, smaller)
    assert "fits fan_in_fan_out" not in str(error_of(nplora.load_adapter, tmp_path, smaller))
    transposed = dict(weights)  # one v_proj stored (in, out), as a GPT-2 Conv1D weight is
    transposed["model.layers.0.self_attn.v_proj.weight"] = np.zeros((HIDDEN, 4), np.float32)
    v_model = LoraModel(weights, LoraConfig(r=2, target_modules=["v_proj"]))
    v_model.save_adapter(tmp_path / "v")
    with pytest.raises(nplora.AdapterMismatchError, match=r"need \(4, 8\) \(it fits fan_in_fan_out=True"):
        nplora.load_adapter(tmp_path / "v", transposed)
    missing = {k: v for k, v in weights.items() if not k.startswith("model.layers.2.self_attn.q_proj")}
    with pytest.raises(nplora.AdapterMismatchError, match="base weights have no"):
        nplora.load_adapter(tmp_path, missing)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(nplora.AdapterMismatchError, match="config gives r=4"):
        nplora.load_adapter(tmp_path, weights)
    config["r"] = 2
    config["target_modules"] = ["q_proj", "v_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    # Targeted but not in the file: a base with more modules than the adapter's model (BERT's
    # pooler beside a masked-LM adapter). PEFT loads it and warns of the missing keys; so does
    # nplora, adapting only the file's modules (it raised AdapterMismatchError).
    with pytest.warns(nplora.LoraWarning, match=r"targets 3 module\(s\) the adapter file has no "
                                                r"tensors for, e.g. \['model.layers.0.self_attn.v_proj'"):
        partial = nplora.load_adapter(tmp_path, weights)
    assert sorted(partial.targets) == sorted(model.targets)
    os.replace(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    with pytest.raises(nplora.AdapterFormatError, match="pickled PyTorch"):
        nplora.load_adapter(tmp_path, weights)
    with pytest.raises(nplora.AdapterNotFoundError):
        nplora.load_adapter(tmp_path / "nowhere", weights)
    with pytest.raises(nplora.AdapterError, match="not allowed"):
        model.add_adapter("../evil", LoraConfig(target_modules=["q_proj"]))


def test_set_adapter_on_a_merged_model_swaps_in_place(rng):
    weights = toy_weights(rng)
    originals = {k: v.copy() for k, v in weights.items()}
    model = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj"]), seed=0)
    model.add_adapter("other", LoraConfig(r=3, target_modules=["q_proj", "v_proj"]), seed=1)
    for name in model.adapter_names:
        model.set_adapter(name)
        randomise(model, rng)
    model.set_adapter("default")
    model.merge_adapter()
    model.set_adapter("other")
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        layer = model[path]
        assert layer.merged
        np.testing.assert_allclose(weights[path + ".weight"],
                                   originals[path + ".weight"] + layer.delta_weight(), atol=1e-5)
    model.unmerge_adapter()
    for key in weights:
        np.testing.assert_allclose(weights[key], originals[key], atol=1e-5)


def test_model_over_memory_mapped_safetensors(rng, tmp_path):
    weights = toy_weights(rng)
    nplora.save_weights(tmp_path / "model.safetensors", weights)
    lazy = nplora.open_weights(tmp_path / "model.safetensors")
    model = LoraModel(lazy, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                      seed=0)
    path = "model.layers.1.self_attn.q_proj"
    assert not model[path].weight.flags.writeable  # used in place, from the file's pages
    x = rng.standard_normal((3, HIDDEN)).astype(np.float32)
    in_memory = LoraModel(weights, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                          seed=0)
    np.testing.assert_allclose(model.forward(path, x), in_memory.forward(path, x), rtol=1e-6)
    merged = model.merge_and_unload()
    np.testing.assert_allclose(merged[path + ".weight"],
                               in_memory.merge_and_unload()[path + ".weight"], rtol=1e-6)
    with pytest.raises(ValueError, match="read-only"):
        model.merge_adapter()


def test_a_conv1d_weight_without_fan_in_fan_out_names_the_module(rng):
    weights = {"h.0.attn.c_attn.weight": rng.standard_normal((8, 24)).astype(np.float32),  # (in, out)
               "h.0.attn.c_attn.bias": np.zeros(24, np.float32)}
    with pytest.raises(ValueError, match=r"h.0.attn.c_attn: bias must have shape \(8,\), got \(24,\) "
                                         r"\(a GPT-2-style Conv1D weight.*fan_in_fan_out=True"):
        LoraModel(weights, LoraConfig(target_modules=["c_attn"]))
    model = LoraModel(weights, LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    assert model["h.0.attn.c_attn"].out_features == 24
