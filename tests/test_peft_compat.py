"""PEFT as the oracle: adapters cross between PEFT and nplora in both directions and agree to 1e-5.

Skipped where torch or peft is not installed (.ci/run installs both).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import nplora  # noqa: E402

HIDDEN, VOCAB = 16, 40
TOL = {"rtol": 1e-5, "atol": 1e-5}


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(HIDDEN, HIDDEN, bias=True)
        self.v_proj = torch.nn.Linear(HIDDEN, 8, bias=False)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = torch.nn.Linear(HIDDEN, 24, bias=True)
        self.down_proj = torch.nn.Linear(24, HIDDEN, bias=False)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = MLP()


class Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(VOCAB, HIDDEN)
        self.layers = torch.nn.ModuleList([Block() for _ in range(3)])


class Toy(torch.nn.Module):
    """A model with Hugging Face-style module names."""

    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)


CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "patterns+rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                            rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6},
                            alpha_pattern={"v_proj": 3}),
    "embedding+biases": dict(r=3, lora_alpha=5, target_modules=["embed_tokens", "q_proj", "up_proj"]),
    "layers+lm_head": dict(r=2, lora_alpha=4, target_modules=["down_proj", "lm_head"],
                           layers_to_transform=[0, 2]),
    "regex": dict(r=2, lora_alpha=2, target_modules=r".*\.layers\.[01]\.mlp\.(up|down)_proj"),
}


def base_model(seed):
    torch.manual_seed(seed)
    return Toy().eval()


def numpy_state(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def module_inputs(path, rng):
    if path.endswith("embed_tokens"):
        return rng.integers(0, VOCAB, size=(3, 5))
    width = 24 if path.endswith("down_proj") else HIDDEN
    return rng.standard_normal((3, 5, width)).astype(np.float32)


def torch_output(peft_model, path, x):
    module = peft_model.base_model.model.get_submodule(path)
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def randomise_peft(peft_model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_into_nplora(case, tmp_path):
    base = base_model(0)
    weights = numpy_state(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(base, peft.LoraConfig(**CASES[case]))
        randomise_peft(peft_model, 1)
        peft_model.eval()
        peft_model.save_pretrained(tmp_path, save_embedding_layers=False)

    model = nplora.load_adapter(tmp_path, weights)
    rng = np.random.default_rng(2)
    expected_targets = {name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                        for name, _ in peft_model.named_parameters() if "lora_" in name}
    assert set(model.targets) == expected_targets
    for path in model.targets:
        x = module_inputs(path, rng)
        np.testing.assert_allclose(model.forward(path, x), torch_output(peft_model, path, x), **TOL)

    ours = model.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = numpy_state(peft_model.merge_and_unload())
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], err_msg=key, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_nplora_adapter_loads_into_peft(case, tmp_path):
    weights = numpy_state(base_model(0))
    config = nplora.LoraConfig(init_lora_weights=False, **CASES[case])
    model = nplora.LoraModel(weights, config, seed=3,
                             embedding_modules=["model.embed_tokens"])
    for _, array in model.named_parameters():  # visible, non-trivial updates
        array *= 3.0
    model.save_adapter(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(base_model(0), tmp_path).eval()
    rng = np.random.default_rng(4)
    for path in model.targets:
        x = module_inputs(path, rng)
        np.testing.assert_allclose(torch_output(peft_model, path, x), model.forward(path, x), **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = numpy_state(peft_model.merge_and_unload())
    ours = model.merge_and_unload()
    for key in theirs:
        np.testing.assert_allclose(theirs[key], ours[key], err_msg=key, **TOL)


def test_linear_layer_matches_peft_forward_backward():
    """One LoRA Linear with dropout off, against PEFT's layer: output, dA, dB, dX."""
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(12, 10)
    holder = holder.double()
    base = holder.proj
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(holder, peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    layer = peft_model.base_model.model.proj
    base = layer.base_layer
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    ours = nplora.LoraLinear(base.weight.detach().numpy().astype(np.float64),
                             base.bias.detach().numpy().astype(np.float64), r=4, lora_alpha=8)
    ours.lora_A = a.detach().numpy()
    ours.lora_B = b.detach().numpy()
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    np.testing.assert_allclose(ours(x.detach().numpy()), y.detach().numpy(), rtol=1e-6, atol=1e-6)
    grad_x = ours.backward(grad.numpy())
    np.testing.assert_allclose(grad_x, x.grad.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.lora_A_grad, layer.lora_A["default"].weight.grad.numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.lora_B_grad, layer.lora_B["default"].weight.grad.numpy(),
                               rtol=1e-6, atol=1e-6)


def tiny_transformers_models():
    transformers = pytest.importorskip("transformers")
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "vocab_size": 40, "tie_word_embeddings": False}
    yield "llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(**small)), False
    yield "gpt-neox", transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**small)), False
    yield "bert-mlm", transformers.BertForMaskedLM(transformers.BertConfig(**small)), False
    yield "roberta-mlm", transformers.RobertaForMaskedLM(transformers.RobertaConfig(**small)), False
    yield "t5", transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=40,
        tie_word_embeddings=False)), False
    yield "gpt2", transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=40, tie_word_embeddings=False)), True
    # Output layers and embedding tables by other names (all adapted as linear layers before).
    t = transformers
    yield "distilbert-mlm", t.DistilBertForMaskedLM(t.DistilBertConfig(
        vocab_size=40, dim=16, hidden_dim=32, n_layers=1, n_heads=2)), False
    yield "albert-mlm", t.AlbertForMaskedLM(t.AlbertConfig(
        vocab_size=40, embedding_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2)), False
    yield "clip-text", t.CLIPTextModel(t.CLIPTextConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)), False
    yield "deberta-v2-mlm", t.DebertaV2ForMaskedLM(t.DebertaV2Config(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, relative_attention=True, position_buckets=8,
        max_relative_positions=16)), False
    yield "xlnet-lm", t.XLNetLMHeadModel(t.XLNetConfig(
        vocab_size=40, d_model=16, d_inner=32, n_layer=1, n_head=2)), False
    yield "xlm-lm", t.XLMWithLMHeadModel(t.XLMConfig(vocab_size=40, emb_dim=16, n_layers=1, n_heads=2)), False


def test_all_linear_targets_what_peft_targets():
    # PEFT leaves out the model's output layer (get_output_embeddings()); nplora, with no model to
    # ask, knows those layers' names. It used to adapt BERT's cls.predictions.decoder, GPT-NeoX's
    # embed_out, RoBERTa's lm_head.decoder and T5's relative_attention_bias (an embedding), then
    # DistilBERT's vocab_projector, CLIP's token_embedding and the like.
    torch.manual_seed(0)
    for name, model, fan_in_fan_out in tiny_transformers_models():
        weights = {k: v.detach().numpy() for k, v in model.state_dict().items()
                   if k.endswith((".weight", ".bias")) and v.ndim <= 2 and v.is_floating_point()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = nplora.LoraModel(weights, nplora.LoraConfig(
                r=2, target_modules="all-linear", fan_in_fan_out=fan_in_fan_out)).targets
            wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
        theirs = [n for n, m in wrapped.base_model.model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)]
        assert sorted(ours) == sorted(theirs), name


def test_an_all_linear_adapter_is_saved_as_its_module_list(tmp_path):
    # PEFT saves "all-linear" resolved to the modules it took; a file that said "all-linear" was
    # resolved again by PEFT, which dropped DistilBERT's vocab_projector tensors without a word.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        vocab_size=40, dim=16, hidden_dim=32, n_layers=1, n_heads=2)).eval()
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
               if v.ndim <= 2 and v.is_floating_point()}
    ours = nplora.LoraModel(weights, nplora.LoraConfig(r=2, target_modules="all-linear",
                                                      init_lora_weights=False), seed=0)
    ours.save_adapter(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert saved == sorted(ours.targets) and ours.peft_config["default"].target_modules == "all-linear"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(model, tmp_path)
    rng = np.random.default_rng(0)
    for path in ours.targets:  # each module computes what PEFT's does with the loaded tensors
        x = rng.standard_normal((3, ours[path].in_features)).astype(np.float32)
        with torch.no_grad():
            want = theirs.base_model.model.get_submodule(path)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours[path](x), want, rtol=1e-4, atol=1e-5)
    assert sorted(n for n, m in theirs.base_model.model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)) == sorted(ours.targets)


def test_model_embedding_padding_idx_matches_peft():
    # PEFT reads padding_idx from the torch module; a dict of weights does not hold it, so the
    # model takes it as an argument. Without it the pad column of A got a gradient (PEFT: none).
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.embed_tokens = torch.nn.Embedding(6, 4, padding_idx=0).double()
    weights = {k: v.detach().numpy().copy() for k, v in holder.state_dict().items()}
    options = dict(r=2, lora_alpha=2, target_modules=["embed_tokens"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_layer = peft.get_peft_model(holder, peft.LoraConfig(**options)).base_model.model.embed_tokens
    model = nplora.LoraModel(weights, nplora.LoraConfig(**options), seed=0,
                             padding_idx={"embed_tokens": 0})
    layer = model["embed_tokens"]
    layer.lora_embedding_A = peft_layer.lora_embedding_A["default"].detach().numpy()
    layer.lora_embedding_B = peft_layer.lora_embedding_B["default"].detach().numpy()
    ids, grad = np.array([0, 2, 0, 5]), np.random.default_rng(1).standard_normal((4, 4))
    out = peft_layer(torch.tensor(ids))
    np.testing.assert_allclose(layer(ids), out.detach().numpy(), rtol=1e-12)
    out.backward(torch.tensor(grad))
    layer.backward(grad)
    np.testing.assert_allclose(layer.lora_embedding_A_grad,
                               peft_layer.lora_embedding_A["default"].grad.numpy(), rtol=1e-12, atol=1e-14)
    assert not layer.lora_embedding_A_grad[:, 0].any()
