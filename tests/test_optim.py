"""AdamW and SGD against PyTorch's update rules, written out in NumPy (and torch itself if present)."""

from __future__ import annotations

import numpy as np
import pytest

import nplora


def adamw_reference(p, grads, lr, betas, eps, wd):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr / (1 - betas[0] ** t) * m / (np.sqrt(v) / np.sqrt(1 - betas[1] ** t) + eps)
    return p


def sgd_reference(p, grads, lr, momentum, dampening, wd, nesterov):
    buf = None
    for g in grads:
        d = g + wd * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


def run_optimizer(make_optimizer, dtype, rng, steps=4):
    param = rng.standard_normal((3, 4)).astype(dtype)
    grad = np.zeros_like(param)
    start = param.copy()
    grads = [rng.standard_normal(param.shape).astype(dtype) for _ in range(steps)]
    optimizer = make_optimizer([(param, grad)])
    for g in grads:
        grad[...] = g
        optimizer.step()
    return start, grads, param


def test_adamw_matches_pytorch_rule(dtype, rng):
    start, grads, result = run_optimizer(
        lambda p: nplora.AdamW(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), dtype, rng)
    expected = adamw_reference(start.astype(np.float64), grads, 0.05, (0.8, 0.95), 1e-6, 0.1)
    np.testing.assert_allclose(result, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("momentum,dampening,wd,nesterov",
                         [(0.0, 0.0, 0.0, False), (0.9, 0.0, 0.01, False), (0.9, 0.1, 0.0, False),
                          (0.9, 0.0, 0.05, True)])
def test_sgd_matches_pytorch_rule(dtype, rng, momentum, dampening, wd, nesterov):
    start, grads, result = run_optimizer(
        lambda p: nplora.SGD(p, lr=0.1, momentum=momentum, dampening=dampening, weight_decay=wd,
                             nesterov=nesterov), dtype, rng)
    expected = sgd_reference(start.astype(np.float64), grads, 0.1, momentum, dampening, wd, nesterov)
    np.testing.assert_allclose(result, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_adamw_and_sgd_match_torch_when_installed(rng):
    torch = pytest.importorskip("torch")
    for make_ours, make_theirs in [
        (lambda p: nplora.AdamW(p, lr=0.01, weight_decay=0.05),
         lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05)),
        (lambda p: nplora.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
         lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True)),
    ]:
        start, grads, ours = run_optimizer(make_ours, np.float64, rng)
        tensor = torch.nn.Parameter(torch.from_numpy(start.copy()))
        optimizer = make_theirs([tensor])
        for g in grads:
            tensor.grad = torch.from_numpy(g)
            optimizer.step()
        np.testing.assert_allclose(ours, tensor.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_optimizers_take_layers_and_lists(rng):
    one = nplora.LoraLinear(rng.standard_normal((4, 3)), r=2, init_lora_weights=False, seed=1)
    two = nplora.LoraEmbedding(rng.standard_normal((5, 3)), r=2, init_lora_weights=False, seed=2)
    assert len(nplora.AdamW(one).params) == 2
    optimizer = nplora.SGD([one, two], lr=1.0)
    assert len(optimizer.params) == 4
    one.lora_A_grad[...] = 1.0
    before = one.lora_A.copy()
    optimizer.step()
    np.testing.assert_allclose(one.lora_A, before - 1.0)  # updated in place, in the layer
    optimizer.zero_grad()
    assert not one.lora_A_grad.any()
    with pytest.raises(TypeError, match="params must be"):
        nplora.AdamW(42)
    with pytest.raises(ValueError, match="no parameters"):
        nplora.AdamW([])
    with pytest.raises(ValueError, match="lr must be finite"):
        nplora.AdamW(one, lr=float("nan"))
    # Refused when built, as PyTorch does (these waited for the first step).
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\), got 1.0"):
        nplora.AdamW(one, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        nplora.AdamW(one, eps=-1.0)
    with pytest.raises(ValueError, match="momentum must be >= 0, got -0.5"):
        nplora.SGD(one, momentum=-0.5)
    with pytest.raises(ValueError, match="lr must be >= 0, got -1"):
        nplora.SGD(one, lr=-1.0)
    with pytest.raises(ValueError, match=r"given twice \(the same layer listed twice\?\)"):
        nplora.SGD([one, two, one])
    fortran = np.asfortranarray(np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"C-contiguous, got a pair of shape \(3, 2\)"):
        nplora.SGD([(fortran, np.zeros_like(fortran))])  # was refused only at the first step


def test_training_fits_a_low_rank_target(rng):
    # The frozen weight is off by a rank-2 matrix; LoRA with r=2 must learn it.
    in_features, out_features = 12, 10
    target = rng.standard_normal((out_features, in_features))
    low_rank = rng.standard_normal((out_features, 2)) @ rng.standard_normal((2, in_features))
    layer = nplora.LoraLinear(target - low_rank, r=2, lora_alpha=2, seed=0)
    optimizer = nplora.AdamW(layer, lr=0.02, weight_decay=0.0)
    x = rng.standard_normal((256, in_features))
    y = x @ target.T
    losses = []
    for _ in range(600):
        optimizer.zero_grad()
        err = layer(x) - y
        losses.append(float(np.mean(err**2)))
        layer.backward(2 * err / err.size)
        optimizer.step()
    assert losses[-1] < 1e-3 * losses[0]
    np.testing.assert_allclose(layer.delta_weight(), low_rank, atol=0.05)


def test_edge_values_as_torch_computes_them(dtype):
    # AdamW's moment is torch's lerp, taken from the nearer end: with beta1 = 0 it is the new
    # gradient exactly (an old moment of 1e8 cancelled the new gradient's 1 to 0).
    param = np.ones((1, 1), dtype)
    grad = np.zeros_like(param)
    optimizer = nplora.AdamW([(param, grad)], lr=0.1, betas=(0.0, 0.0), weight_decay=0.0)
    for g in (1e8 if dtype == np.float32 else 1e20, 1.0):
        grad[...] = g
        optimizer.step()
    np.testing.assert_array_equal(optimizer.state[0][0], [[1.0]])
    np.testing.assert_allclose(param, [[0.8]], rtol=1e-6)
    # SGD without weight decay adds no decay term: 0 * inf made an infinite parameter NaN.
    param = np.array([[np.inf, -np.inf, 1.0]], dtype)
    grad = np.ones_like(param)
    nplora.SGD([(param, grad)], lr=0.1).step()
    np.testing.assert_array_equal(param, np.array([[np.inf, -np.inf, 0.9]], dtype))


def train_steps(layer, optimizer, rng, steps=3):
    for _ in range(steps):
        x = rng.standard_normal((4, layer.in_features))
        layer(x)
        optimizer.zero_grad()
        layer.backward(np.ones((4, layer.out_features)))
        optimizer.step()


@pytest.mark.parametrize("make", [lambda p: nplora.AdamW(p, lr=0.05),
                                  lambda p: nplora.SGD(p, lr=0.05, momentum=0.9)])
def test_a_pickled_or_copied_optimizer_trains_its_copied_layers(make):
    # Pickling raised "cannot pickle '_thread.lock'"; a copy over raw pairs trained orphan arrays.
    import copy
    import pickle

    for copy_of in (copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
        layer = nplora.LoraLinear(np.random.default_rng(0).standard_normal((5, 6)), r=2, seed=0)
        optimizer = make(layer)
        train_steps(layer, optimizer, np.random.default_rng(1))
        layer2, optimizer2 = copy_of((layer, optimizer))
        assert np.shares_memory(optimizer2.params[0][0], layer2.lora_A)
        assert not np.shares_memory(optimizer2.params[0][0], layer.lora_A)
        before = layer2.lora_A.copy()
        # The copy and the original, stepped alike, stay alike: moments and step count came along.
        train_steps(layer2, optimizer2, np.random.default_rng(2))
        train_steps(layer, optimizer, np.random.default_rng(2))
        assert not np.array_equal(layer2.lora_A, before)
        np.testing.assert_array_equal(layer2.lora_A, layer.lora_A)
        np.testing.assert_array_equal(layer2.lora_B, layer.lora_B)
    model = nplora.LoraModel({"q_proj.weight": np.ones((4, 3))},
                             nplora.LoraConfig(r=2, target_modules=["q_proj"]), seed=0)
    model2, optimizer2 = copy.deepcopy((model, make(model)))
    assert np.shares_memory(optimizer2.params[0][0], model2["q_proj"].lora_A)
    pairs = make([(layer.lora_A, layer.lora_A_grad)])
    with pytest.raises(TypeError, match="over raw \\(param, grad\\) arrays cannot be pickled"):
        pickle.dumps(pairs)


def test_state_dict_resumes_training_exactly():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((5, 6))
    layer = nplora.LoraLinear(weight, r=2, seed=0)
    optimizer = nplora.AdamW(layer, lr=0.05, betas=(0.8, 0.9))
    train_steps(layer, optimizer, np.random.default_rng(1))
    state = optimizer.state_dict()
    resumed_layer = nplora.LoraLinear(weight.copy(), r=2, seed=5)
    resumed_layer.lora_A, resumed_layer.lora_B = layer.lora_A, layer.lora_B
    resumed = nplora.AdamW(resumed_layer, lr=1.0)
    resumed.load_state_dict(state)
    assert resumed.lr == 0.05 and resumed.betas == (0.8, 0.9) and resumed.step_count == 3
    train_steps(layer, optimizer, np.random.default_rng(2))
    train_steps(resumed_layer, resumed, np.random.default_rng(2))
    np.testing.assert_array_equal(resumed_layer.lora_A, layer.lora_A)
    state["state"][0][0][...] = 7  # a copy: the optimizer's own moments are untouched
    assert not (optimizer.state[0][0] == 7).any()
    with pytest.raises(ValueError, match="not a SGD state_dict: type 'AdamW'"):
        nplora.SGD(layer).load_state_dict(state)
    other = nplora.AdamW(nplora.LoraLinear(weight, r=3, seed=0))
    with pytest.raises(ValueError, match=r"parameter 0: the state_dict's state has shapes \[\(2, 6\), \(2, 6\)\]"):
        other.load_state_dict(state)


def test_a_step_between_forward_and_backward_leaves_no_forward_to_pair():
    # The backward then read the stepped A and B beside the kept x A^T of the old ones: its
    # gradients were of neither (PyTorch: "modified by an inplace operation").
    layer = nplora.LoraLinear(np.ones((5, 6)), r=2, init_lora_weights=False, seed=0)
    optimizer = nplora.SGD(layer, lr=0.1)
    pairs = nplora.SGD([(layer.lora_A, layer.lora_A_grad)], lr=0.1)  # its layer found through A
    for step in (optimizer.step, pairs.step):
        layer(np.ones((2, 6)))
        step()
        with pytest.raises(RuntimeError, match="needs a forward"):
            layer.backward(np.ones((2, 5)))
