"""What LoraLinear and LoraEmbedding share: modes, merging, parameters and their gradients."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np


class LoraWarning(UserWarning):
    """Warnings from nplora (a second merge, an unmerge with nothing merged, ...)."""


class LoraLayerBase:
    """Base of the LoRA layers: a frozen weight, a low-rank pair (A, B) and their gradients.

    Subclasses set ``_core`` (the C++ layer), ``_param_names`` (names of A and B) and
    ``_weight``/``_bias``.
    """

    _param_names: tuple[str, str]
    _core: Any
    _weight: np.ndarray
    _bias: np.ndarray | None

    training: bool

    @property
    def weight(self) -> np.ndarray:
        """The frozen base weight, the caller's array when it was C-contiguous float32/float64."""
        return self._weight

    @property
    def dtype(self) -> np.dtype:
        """The layer's dtype (the weight's): float32 or float64."""
        return self._weight.dtype

    @property
    def r(self) -> int:
        """The rank of the update."""
        return int(self._core.r)

    @property
    def scaling(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return float(self._core.scaling)

    @property
    def merged(self) -> bool:
        """Whether scaling * B @ A is currently added into the weight."""
        return bool(self._core.merged)

    def train(self, mode: bool = True) -> LoraLayerBase:
        """Set training mode (dropout on, activations kept for backward); returns self."""
        self.training = bool(mode)
        if not self.training:
            self._core.clear_cache()
        return self

    def eval(self) -> LoraLayerBase:
        """Set evaluation mode (no dropout, nothing kept); returns self."""
        return self.train(False)

    def merge(self) -> None:
        """Add scaling * B @ A into the weight in place (one pass, no weight-sized temporary).

        A second merge warns (LoraWarning) and changes nothing. A read-only weight (memory-mapped)
        raises ValueError.
        """
        if not self._core.merge():
            warnings.warn("Already merged. Nothing to do.", LoraWarning, stacklevel=2)

    def unmerge(self) -> None:
        """Subtract scaling * B @ A from the weight again; warns if nothing is merged."""
        if not self._core.unmerge():
            warnings.warn("Already unmerged. Nothing to do.", LoraWarning, stacklevel=2)

    def delta_weight(self) -> np.ndarray:
        """scaling * B @ A as a new array of the weight's shape and layout."""
        out = np.empty(self._weight.shape, dtype=self.dtype)
        self._core.delta_weight(out)
        return out

    def zero_grad(self) -> None:
        """Set the gradients of A and B to zero."""
        self._core.zero_grad()

    def named_parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        """The trainable arrays, ``(name, array)``; the arrays share the layer's memory."""
        for name in self._param_names:
            yield name, getattr(self._core, name)

    def named_grads(self) -> Iterator[tuple[str, np.ndarray]]:
        """The gradient of each trainable array, in the order of named_parameters()."""
        for name in self._param_names:
            yield name, getattr(self._core, name + "_grad")

    def stats(self) -> dict[str, int]:
        """Parameter counts: ``trainable_params`` (A, B), ``frozen_params`` (weight, bias), total."""
        trainable = sum(p.size for _, p in self.named_parameters())
        frozen = self._weight.size + (0 if self._bias is None else self._bias.size)
        return {
            "trainable_params": int(trainable),
            "frozen_params": int(frozen),
            "total_params": int(trainable + frozen),
        }

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return self.forward(*args, **kwargs)  # type: ignore[attr-defined]
