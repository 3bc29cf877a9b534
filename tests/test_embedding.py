"""LoraEmbedding against a NumPy reference and finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import nplora


def make_embedding(rng, dtype, num=11, dim=6, r=3, **kwargs):
    table = rng.standard_normal((num, dim)).astype(dtype)
    kwargs.setdefault("init_lora_weights", False)
    kwargs.setdefault("seed", 0)
    return nplora.LoraEmbedding(table, r=r, lora_alpha=6, **kwargs), table


def reference(emb, table, ids):
    return table[ids] + emb.scaling * (emb.lora_embedding_A.T[ids] @ emb.lora_embedding_B.T)


@pytest.mark.parametrize("ids_shape", [(5,), (2, 4), (), (0,)])
def test_forward_matches_numpy(rng, dtype, tol, backend, ids_shape):
    emb, table = make_embedding(rng, dtype)
    ids = rng.integers(0, 11, size=ids_shape)
    out = emb(ids)
    assert out.shape == ids_shape + (6,) and out.dtype == dtype
    np.testing.assert_allclose(out, reference(emb, table, ids), **tol)


def test_backward_matches_reference_and_finite_differences(rng, backend):
    emb, table = make_embedding(rng, np.float64, padding_idx=2)
    ids = np.array([[1, 2, 1], [7, 0, 2]])
    probe = rng.standard_normal((2, 3, 6))
    emb(ids)
    assert emb.backward(probe) is None
    s, A, B = emb.scaling, emb.lora_embedding_A, emb.lora_embedding_B
    flat_ids, flat_probe = ids.reshape(-1), probe.reshape(-1, 6)
    np.testing.assert_allclose(emb.lora_embedding_B_grad, s * flat_probe.T @ A.T[flat_ids], atol=1e-12)
    expected_a = np.zeros_like(A)
    for i, idx in enumerate(flat_ids):
        if idx != 2:  # padding_idx gets no gradient
            expected_a[:, idx] += s * flat_probe[i] @ B
    np.testing.assert_allclose(emb.lora_embedding_A_grad, expected_a, atol=1e-12)
    assert not emb.lora_embedding_A_grad[:, [2, 3, 4, 5, 6, 8, 9, 10]].any()

    # finite differences on B (A's padding column is excluded on purpose, so check A's others)
    def loss():
        emb.eval()
        value = float(np.sum(probe * emb(ids)))
        emb.train()
        return value

    h = 1e-6
    for matrix, grad in ((B, emb.lora_embedding_B_grad), (A, emb.lora_embedding_A_grad)):
        numeric = np.zeros_like(matrix)
        for index in np.ndindex(matrix.shape):
            keep = matrix[index]
            matrix[index] = keep + h
            up = loss()
            matrix[index] = keep - h
            down = loss()
            matrix[index] = keep
            numeric[index] = (up - down) / (2 * h)
        if matrix is A:
            numeric[:, 2] = 0.0
        np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_merge_unmerge_round_trip(rng, dtype, tol, backend):
    emb, table = make_embedding(rng, dtype)
    original = table.copy()
    ids = np.arange(11)
    emb.eval()
    before = emb(ids)
    np.testing.assert_allclose(emb.delta_weight(),
                               emb.scaling * (emb.lora_embedding_B @ emb.lora_embedding_A).T, **tol)
    emb.merge()
    loose = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    np.testing.assert_allclose(emb(ids), before, **loose)
    np.testing.assert_allclose(table, original + emb.delta_weight(), **loose)
    with pytest.warns(nplora.LoraWarning):
        emb.merge()
    emb.unmerge()
    np.testing.assert_allclose(table, original, **loose)
    emb.train()
    emb.merge()
    emb(ids)
    with pytest.raises(RuntimeError, match="merged"):
        emb.backward(np.ones((11, 6), dtype))


def test_disabled_adapter_merged_afterwards_still_gives_the_base_rows(rng, dtype, tol):
    emb, table = make_embedding(rng, dtype)
    base = table.copy()
    ids = np.array([3, 0, 10, 3])
    emb.adapter_enabled = False
    emb.merge()
    for training in (False, True):
        emb.train(training)
        np.testing.assert_allclose(emb(ids), base[ids], **tol)
    with pytest.raises(RuntimeError, match="disabled"):
        emb.backward(np.ones((4, 6), dtype))
    emb.adapter_enabled = True
    np.testing.assert_allclose(emb(ids), reference(emb, base, ids), **tol)


def test_initialisation_follows_peft():
    table = np.zeros((500, 64))
    default = nplora.LoraEmbedding(table, r=8, seed=5)
    assert not default.lora_embedding_A.any()
    assert abs(default.lora_embedding_B.std() - 1.0) < 0.1
    random = nplora.LoraEmbedding(table, r=8, seed=5, init_lora_weights=False)
    assert abs(random.lora_embedding_A.std() - 1.0) < 0.05
    assert default.lora_embedding_A.shape == (8, 500) and default.lora_embedding_B.shape == (64, 8)
    assert np.shares_memory(default.lora_embedding_B, default.lora_embedding_B)


def test_bad_ids(rng):
    emb, _ = make_embedding(rng, np.float32)
    with pytest.raises(IndexError, match="index 11 at position 1 is out of range for 11 embeddings"):
        emb(np.array([0, 11]))
    with pytest.raises(IndexError, match="-1"):
        emb([-1])
    with pytest.raises(TypeError, match="ids must be integers, got dtype float64"):
        emb(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="padding_idx"):
        make_embedding(rng, np.float32, padding_idx=11)


def test_stats(rng):
    emb, _ = make_embedding(rng, np.float32)
    assert emb.stats() == {"trainable_params": 3 * 11 + 6 * 3, "frozen_params": 66,
                           "total_params": 3 * 11 + 6 * 3 + 66}


def test_each_forward_serves_one_backward_unless_retained(rng):
    emb, _ = make_embedding(rng, np.float64)
    ids = np.array([1, 4, 4])
    g, h = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    emb(ids)
    emb.backward(g + h)
    summed = emb.lora_embedding_B_grad.copy()
    emb.zero_grad()
    emb(ids)
    emb.backward(g, retain_graph=True)
    emb.backward(h)
    np.testing.assert_allclose(emb.lora_embedding_B_grad, summed, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="each forward serves one backward"):
        emb.backward(g)


def test_merge_and_unmerge_drop_what_the_forward_kept(rng):
    # One rule with LoraLinear: a forward before a merge or unmerge serves no backward after it.
    emb, _ = make_embedding(rng, np.float64)
    for change in ("merge", "unmerge"):
        emb(np.array([1, 2]))
        getattr(emb, change)()
        with pytest.raises(RuntimeError, match="merge and unmerge drop what the last one kept"):
            emb.backward(np.ones((2, 6)))


def test_ids_beyond_int64_name_the_id_as_given():
    # They were cast to int64 first: uint64 2**64 - 1 was reported as index -1, and a Python int
    # of 2**64 as "ids must be integers, got dtype object".
    emb = nplora.LoraEmbedding(np.ones((5, 3)), r=2)
    for ids, value, position in ((np.array([1, 2**64 - 1], np.uint64), 2**64 - 1, 1),
                                 (np.array([2**63 + 5], np.uint64), 2**63 + 5, 0),
                                 ([1, 2**64], 2**64, 1), ([-(2**64)], -(2**64), 0)):
        with pytest.raises(IndexError, match=f"index {value} at position {position} is out of range "
                                             "for 5 embeddings"):
            emb(ids)
    np.testing.assert_array_equal(emb(np.array([4], np.uint64)), emb([4]))
    # A list mixing int64 and uint64 values, which NumPy makes float64 (2**64 - 1 rounded).
    with pytest.raises(IndexError, match=f"index {2**64 - 1} at position 1 is out of range"):
        emb([1, 2**64 - 1])
