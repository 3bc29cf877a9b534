"""Memory stays flat over 10,000 create/forward/backward/merge/destroy cycles of the layers.

Each cycle builds a LoraLinear and a LoraEmbedding on fresh weights, runs training and eval
forwards, backward, an optimizer step, merge/unmerge, drops them, and every 1,000 cycles the
process's resident memory is sampled. A layer leaking its matrices (about 40 KB a cycle here) would
add 400 MB; the test allows 4 MB of drift after the first 2,000 cycles (allocator warm-up).
"""

from __future__ import annotations

import gc
import os
import pickle
import sys

import numpy as np
import pytest

import nplora
from nplora import _guard

CYCLES, EVERY, WARMUP = 10_000, 1_000, 2_000
ALLOWED_GROWTH = 4 << 20


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cycle(k: int, x: np.ndarray, ids: np.ndarray, grad: np.ndarray) -> None:
    weight = np.full((64, 64), 0.01 * (k % 7), np.float32)
    layer = nplora.LoraLinear(weight, np.zeros(64, np.float32), r=8, lora_dropout=0.1, seed=k)
    optimizer = nplora.AdamW(layer)
    layer(x)
    layer.backward(grad)
    optimizer.step()
    layer.eval()
    layer(x)
    layer.merge()
    layer.unmerge()
    embedding = nplora.LoraEmbedding(np.ones((100, 32)), r=4, padding_idx=0, seed=k)
    embedding(ids)
    embedding.backward(np.ones((ids.size, 32)))
    embedding.merge()
    if k % 100 == 0:
        pickle.loads(pickle.dumps(layer))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_is_flat_over_10000_cycles(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    grad = np.ones((16, 64), np.float32)
    ids = rng.integers(0, 100, 24)
    gc.collect()
    guards_before = len(_guard._WEIGHT_GUARDS)  # layers other tests keep alive are not ours to count
    samples = []
    for k in range(1, CYCLES + 1):
        cycle(k, x, ids, grad)
        if k % EVERY == 0:
            gc.collect()
            samples.append(resident_bytes())
    growth = max(samples[WARMUP // EVERY:]) - samples[WARMUP // EVERY - 1]
    with capsys.disabled():
        print(f"\nRSS every {EVERY} cycles (MiB): " + " ".join(f"{s / 2**20:.1f}" for s in samples)
              + f"; growth after warm-up {growth / 2**10:.0f} KiB")
    assert growth < ALLOWED_GROWTH, [s / 2**20 for s in samples]
    assert len(_guard._WEIGHT_GUARDS) - guards_before < 50  # the guards of dead layers are gone too
