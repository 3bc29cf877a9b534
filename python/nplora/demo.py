"""`nplora demo`: pre-train an MLP on scikit-learn's digits, then LoRA-adapt it to rotated digits.

Task A is the digits as they are; task B is the same digits rotated by 90 degrees, which the frozen
model cannot read. Rank-4 adapters on both layers (about an eighth of the parameters) learn task B;
merging folds them into the weights, unmerging gives the task-A model back. Offline: the data ship
inside scikit-learn.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, TextIO, cast

import numpy as np

from ._arrays import FLOAT_DTYPES, check_int
from .linear import LoraLinear
from .optim import AdamW

INSTALL_HINT = 'the demo needs scikit-learn: pip install "nplora[demo]"'
TASK_A = "read the handwritten digits as they are"
TASK_B = "read the same digits rotated 90 degrees counter-clockwise"
HIDDEN = 128
TEST_SHARE = 0.25
BATCH_SIZE = 32
PRETRAIN_EPOCHS = 30
PRETRAIN_LR = 1e-3
LORA_LR = 1e-2
DEFAULT_EPOCHS = 20
DEFAULT_RANK = 4

Params = list[tuple[np.ndarray, np.ndarray]]  # (weight (out, in), bias (out,)) per layer


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images, shape (1797, 8, 8), pixels 0..16, and labels, shape (1797,).

    Raises ImportError naming the install command when scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    digits = load_digits()
    return digits.images, digits.target


def rotate(images: np.ndarray) -> np.ndarray:
    """Task B's inputs: images (n, 8, 8) rotated 90 degrees counter-clockwise."""
    return np.rot90(images, k=1, axes=(1, 2))


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of logits (n, classes) against labels (n,), and its gradient (n, classes)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    grad = np.exp(log_probs)
    grad[rows, labels] -= 1
    grad /= len(labels)
    return float(-log_probs[rows, labels].mean()), grad


def mlp_logits(params: Params, x: np.ndarray) -> np.ndarray:
    """Plain NumPy forward of the MLP: x (n, in) -> logits (n, classes), ReLU between layers."""
    for index, (weight, bias) in enumerate(params):
        if index:
            x = np.maximum(x, 0)
        x = x @ weight.T + bias
    return x


def lora_logits(layers: list[LoraLinear], x: np.ndarray) -> np.ndarray:
    """The same forward through the LoRA layers (in whatever mode they are in)."""
    for index, layer in enumerate(layers):
        if index:
            x = np.maximum(x, 0)
        x = layer.forward(x)
    return x


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose largest logit is at the label."""
    return float(np.mean(logits.argmax(axis=1) == labels))


def pretrain_mlp(x: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 epochs: int = PRETRAIN_EPOCHS, lr: float = PRETRAIN_LR) -> Params:
    """Train a (in -> HIDDEN -> 10) ReLU MLP with Adam, in NumPy.

    Parameters
    ----------
    x : ndarray, shape (n, in_features)
        Inputs; the weights get their dtype.
    labels : ndarray of int, shape (n,)
    rng : numpy.random.Generator
        Draws the initial weights and the batch order.

    Returns
    -------
    list of (weight (out, in), bias (out,)), one pair per layer
    """
    sizes = [x.shape[1], HIDDEN, int(labels.max()) + 1]
    params = [((rng.standard_normal((n_out, n_in)) * math.sqrt(2 / n_in)).astype(x.dtype),
               np.zeros(n_out, dtype=x.dtype)) for n_in, n_out in zip(sizes, sizes[1:])]
    arrays = [array for pair in params for array in pair]
    moments = [(np.zeros_like(a), np.zeros_like(a)) for a in arrays]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            (w1, b1), (w2, b2) = params
            pre = x[batch] @ w1.T + b1
            hidden = np.maximum(pre, 0)
            _, grad_logits = softmax_cross_entropy(hidden @ w2.T + b2, labels[batch])
            grad_hidden = grad_logits @ w2
            grad_hidden[pre <= 0] = 0
            grads = [grad_hidden.T @ x[batch], grad_hidden.sum(axis=0),
                     grad_logits.T @ hidden, grad_logits.sum(axis=0)]
            step += 1
            for array, grad, (mean, square) in zip(arrays, grads, moments):
                mean += (1 - beta1) * (grad - mean)
                square += (1 - beta2) * (grad * grad - square)
                array -= lr / (1 - beta1**step) * mean / (np.sqrt(square / (1 - beta2**step)) + eps)
    return params


def finetune_lora(layers: list[LoraLinear], x: np.ndarray, labels: np.ndarray, epochs: int,
                  rng: np.random.Generator, progress: bool = True) -> list[float]:
    """Train only the adapters (lora_A, lora_B) with AdamW and a cosine learning-rate decay.

    Parameters
    ----------
    layers : list of LoraLinear
        The MLP's layers, ReLU between them; their weights stay frozen.
    x : ndarray, shape (n, in_features)
    labels : ndarray of int, shape (n,)
    epochs : int
    rng : numpy.random.Generator
        Draws the batch order.
    progress : bool
        Show a tqdm bar over the steps with the running loss.

    Returns
    -------
    list of float
        The mean training loss of each epoch.
    """
    from tqdm import tqdm

    optimizer = AdamW(layers, lr=LORA_LR)
    steps_per_epoch = math.ceil(len(x) / BATCH_SIZE)
    total = epochs * steps_per_epoch
    epoch_losses = []
    running = None
    step = 0
    for layer in layers:
        layer.train()
    with tqdm(total=total, desc="LoRA fine-tuning", unit="step", disable=not progress,
              leave=False) as bar:
        for _ in range(epochs):
            order = rng.permutation(len(x))
            losses = []
            for start in range(0, len(x), BATCH_SIZE):
                batch = order[start:start + BATCH_SIZE]
                # Our own step count: a disabled tqdm bar does not count.
                optimizer.lr = LORA_LR * 0.5 * (1 + math.cos(math.pi * step / total))
                step += 1
                optimizer.zero_grad()
                pre = layers[0].forward(x[batch])
                loss, grad = softmax_cross_entropy(layers[1].forward(np.maximum(pre, 0)),
                                                   labels[batch])
                grad_hidden = layers[1].backward(grad)
                grad_hidden[pre <= 0] = 0
                layers[0].backward(grad_hidden)
                optimizer.step()
                losses.append(loss)
                running = loss if running is None else 0.9 * running + 0.1 * loss
                bar.set_postfix(loss=f"{running:.3f}", refresh=False)
                bar.update()
            epoch_losses.append(float(np.mean(losses)))
    for layer in layers:
        layer.eval()
    return epoch_losses


def run_demo(seed: int = 0, epochs: int = DEFAULT_EPOCHS, rank: int = DEFAULT_RANK,
             dtype: Any = np.float32, progress: bool = True,
             out: TextIO | None = None) -> dict[str, Any]:
    """Pre-train on task A, LoRA-adapt to task B, merge and unmerge; print and return the numbers.

    Parameters
    ----------
    seed : int
        Seeds the split, the pre-training, the adapters' initialisation and the batch order: the
        same seed gives the same numbers (the timings aside).
    epochs : int
        Epochs of LoRA fine-tuning.
    rank : int
        Rank of the adapters on both layers (lora_alpha = 2 * rank).
    dtype : float32 or float64
    progress : bool
        Show a progress bar (on stderr) during fine-tuning.
    out : text stream, optional
        Where the report goes (sys.stdout by default).

    Returns
    -------
    dict
        Accuracies (0..1) on the test split, parameter counts, losses, merge checks, and
        ``seconds`` per phase.
    """
    out = sys.stdout if out is None else out
    epochs = check_int("epochs", epochs, 1)
    rank = check_int("rank", rank, 1)
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    rng = np.random.default_rng(seed)
    seconds: dict[str, float] = {}

    def say(*lines: str) -> None:
        print(*lines, sep="\n", file=out, flush=True)

    started = clock = time.perf_counter()
    images, labels = load_digits_images()
    order = rng.permutation(len(images))
    n_test = round(TEST_SHARE * len(images))
    test, train = order[:n_test], order[n_test:]
    # One scalar mean and scale for every pixel, from the training images: unlike per-pixel
    # statistics, it means the same thing for rotated images.
    mean, scale = images[train].mean(), images[train].std()

    def features(imgs: np.ndarray) -> np.ndarray:
        return ((imgs.reshape(len(imgs), -1) - mean) / scale).astype(dtype)

    x_a_train, x_a_test = features(images[train]), features(images[test])
    x_b_train, x_b_test = features(rotate(images[train])), features(rotate(images[test]))
    y_train, y_test = labels[train], labels[test]
    seconds["load"] = time.perf_counter() - clock
    say(f"nplora demo: LoRA on scikit-learn's handwritten digits (seed {seed}, {dtype.name})",
        f"  data     {len(images)} images of 8x8 pixels: {len(train)} to train, {len(test)} to test"
        f"  [{seconds['load']:.2f} s]")

    clock = time.perf_counter()
    params = pretrain_mlp(x_a_train, y_train, rng)
    pretrained = [(weight.copy(), bias.copy()) for weight, bias in params]
    acc_a = accuracy(mlp_logits(params, x_a_test), y_test)
    acc_b_frozen = accuracy(mlp_logits(params, x_b_test), y_test)
    seconds["pretrain"] = time.perf_counter() - clock
    say(f"  task A   {TASK_A}",
        f"  pretrain MLP {x_a_train.shape[1]} -> {HIDDEN} -> {len(params[1][1])} (ReLU), Adam in NumPy, {PRETRAIN_EPOCHS} epochs"
        f"  [{seconds['pretrain']:.2f} s]",
        f"           test accuracy on task A: {acc_a:6.1%}",
        f"  task B   {TASK_B}",
        f"           frozen model on task B:  {acc_b_frozen:6.1%}")

    clock = time.perf_counter()
    layers = [LoraLinear(weight, bias, r=rank, lora_alpha=2 * rank,
                         seed=int(rng.integers(2**63)))
              for weight, bias in params]
    stats = [layer.stats() for layer in layers]
    trainable = sum(s["trainable_params"] for s in stats)
    frozen = sum(s["frozen_params"] for s in stats)
    losses = finetune_lora(layers, x_b_train, y_train, epochs, rng, progress)
    unmerged_logits = lora_logits(layers, x_b_test)
    acc_b_lora = accuracy(unmerged_logits, y_test)
    seconds["lora"] = time.perf_counter() - clock
    say(f"  LoRA     rank {rank} (lora_alpha {2 * rank}) on both layers, AdamW lr {LORA_LR:g} "
        f"(cosine), {epochs} epochs  [{seconds['lora']:.2f} s]",
        f"           trainable params: {trainable:,} || frozen params: {frozen:,} || "
        f"trainable%: {100 * trainable / (trainable + frozen):.2f}",
        f"           training loss: {losses[0]:.3f} (epoch 1) -> {losses[-1]:.3f} (epoch {epochs})",
        f"           after LoRA on task B:    {acc_b_lora:6.1%}  (frozen: {acc_b_frozen:.1%})")

    clock = time.perf_counter()
    for layer in layers:
        layer.merge()
    merged_logits = lora_logits(layers, x_b_test)
    merge_diff = float(np.abs(merged_logits - unmerged_logits).max())
    acc_b_merged = accuracy(merged_logits, y_test)
    acc_a_merged = accuracy(lora_logits(layers, x_a_test), y_test)
    for layer in layers:
        layer.unmerge()
    restored = cast(Params, [(layer.weight, layer.bias) for layer in layers])  # all have a bias
    unmerge_diff = max(float(np.abs(weight - original).max())
                       for (weight, _), (original, _) in zip(restored, pretrained))
    acc_a_unmerged = accuracy(mlp_logits(restored, x_a_test), y_test)
    seconds["merge"] = time.perf_counter() - clock
    seconds["total"] = time.perf_counter() - started
    say(f"  merge    adapters folded into the weights  [{seconds['merge']:.3f} s]",
        f"           merged vs unmerged logits: max |diff| = {merge_diff:.2g}",
        f"           merged model on task B:  {acc_b_merged:6.1%}",
        f"           merged model on task A:  {acc_a_merged:6.1%}  (the adapters are for task B)",
        f"  unmerge  weights back to the pre-trained ones: max |diff| = {unmerge_diff:.2g}",
        f"           base model on task A:    {acc_a_unmerged:6.1%}  (pre-trained: {acc_a:.1%})",
        f"  total    {seconds['total']:.2f} s")
    return {
        "seed": seed, "epochs": epochs, "rank": rank, "dtype": dtype.name, "task": TASK_B,
        "n_train": len(train), "n_test": len(test),
        "accuracy_a_pretrained": acc_a,
        "accuracy_b_frozen": acc_b_frozen,
        "accuracy_b_lora": acc_b_lora,
        "accuracy_b_merged": acc_b_merged,
        "accuracy_a_merged": acc_a_merged,
        "accuracy_a_unmerged": acc_a_unmerged,
        "trainable_params": trainable,
        "frozen_params": frozen,
        "trainable_share": trainable / (trainable + frozen),
        "epoch_losses": losses,
        "merge_max_abs_diff": merge_diff,
        "unmerge_max_abs_diff": unmerge_diff,
        "seconds": seconds,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to its subcommand parser."""
    parser.add_argument("--seed", type=int, default=0, help="seeds everything (default: 0)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"epochs of LoRA fine-tuning (default: {DEFAULT_EPOCHS})")
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK,
                        help=f"rank of the adapters (default: {DEFAULT_RANK})")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="dtype of the model (default: float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; returns the exit status."""
    try:
        run_demo(seed=args.seed, epochs=args.epochs, rank=args.rank, dtype=args.dtype,
                 progress=not args.quiet)
    except ImportError as error:
        print(f"nplora demo: error: {error}", file=sys.stderr)
        return 1
    return 0
