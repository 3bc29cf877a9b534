"""What LoraLinear and LoraEmbedding share: modes, merging, parameters and their gradients."""

from __future__ import annotations

import math
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
    lora_alpha: float
    use_rslora: bool

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
        """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (the kernels use it in the layer's dtype)."""
        r = self.r
        return self.lora_alpha / (math.sqrt(r) if self.use_rslora else r)

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

    @property
    def adapter_enabled(self) -> bool:
        """False runs the base layer alone (PEFT's ``disable_adapters``); disabling unmerges first."""
        return bool(self._core.adapter_enabled)

    @adapter_enabled.setter
    def adapter_enabled(self, enabled: bool) -> None:
        if not enabled and self.merged:
            warnings.warn("Disabling a merged adapter: unmerging it first.", LoraWarning, stacklevel=2)
            self.unmerge()
        self._core.adapter_enabled = bool(enabled)

    def merge(self, safe_merge: bool = False) -> None:
        """Add scaling * B @ A into the weight in place (one pass, no weight-sized temporary).

        Parameters
        ----------
        safe_merge : bool
            As PEFT: merge into a copy first and commit only if every value is finite (NaN/Inf
            raise ValueError and leave the weight untouched). Costs one copy of the weight.

        A second merge warns (LoraWarning) and changes nothing. A read-only weight (memory-mapped)
        raises ValueError.
        """
        if self.merged:
            warnings.warn("Already merged. Nothing to do.", LoraWarning, stacklevel=2)
            return
        if safe_merge:
            candidate = self.merged_weight()
            if not np.isfinite(candidate).all():
                raise ValueError("NaNs or infinities detected in the merged weights: the adapter "
                                 "seems to be broken; the weight was left unchanged")
        self._core.merge()

    def merged_weight(self) -> np.ndarray:
        """weight + scaling * B @ A as a new array (the weight itself is not touched)."""
        if self.merged:
            return self._weight.copy()
        target = np.array(self._weight, dtype=self.dtype, order="C", copy=True)
        self._core.add_delta_to(target, 1.0)
        return target

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
