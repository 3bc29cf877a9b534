"""LoraLinear: a frozen linear layer with a trainable low-rank update, on NumPy arrays."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from . import _core
from ._arrays import (
    as_input,
    as_vector,
    adapter_memory_error,
    as_weight,
    check_dropout,
    check_rank,
    check_real,
    init_mode,
    output_array,
    resolve_seed,
)
from ._guard import writing_all
from ._layer import NO_KEPT_FORWARD, LoraLayerBase, parameter_property

_CORE_LINEAR = {np.dtype(np.float32): _core.LoraLinear_float32, np.dtype(np.float64): _core.LoraLinear_float64}


class LoraLinear(LoraLayerBase):
    """A frozen linear layer plus a trainable low-rank update (PEFT's LoRA ``Linear``).

    ``y = x @ W.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T``

    Parameters
    ----------
    weight : array_like, shape (out_features, in_features), or (in_features, out_features) when
        ``fan_in_fan_out`` is True
        The frozen base weight. A C-contiguous float32/float64 array is used in place (not copied):
        ``merge()`` writes into it. Other layouts are copied; the layer's dtype is the weight's.
    bias : array_like, shape (out_features,), optional
        Frozen bias, cast to the weight's dtype.
    r : int
        Rank of the update (>= 1; may exceed min(in, out), as in PEFT).
    lora_alpha : float
        Scale numerator: scaling = lora_alpha / r (or / sqrt(r) with ``use_rslora``).
    lora_dropout : float
        Dropout probability on the LoRA branch's input in training mode, in [0, 1).
    use_rslora : bool
        Rank-stabilised scaling lora_alpha / sqrt(r).
    init_lora_weights : True, False or "gaussian"
        As PEFT: True = A kaiming-uniform (bound 1/sqrt(in)), B zeros; "gaussian" = A ~ N(0, 1/r^2),
        B zeros; False = both random (the update is non-zero from the start).
    fan_in_fan_out : bool
        The weight is stored as (in_features, out_features) (GPT-2's Conv1D).
    seed : int, optional
        Seeds the initialisation and the dropout stream; None draws fresh entropy.

    Attributes
    ----------
    lora_A : ndarray, shape (r, in_features)
    lora_B : ndarray, shape (out_features, r)
    lora_A_grad, lora_B_grad : ndarray, same shapes
        Writable arrays sharing the layer's memory; assigning a whole array copies it in after
        checking its shape.
    """

    _param_names = ("lora_A", "lora_B")
    _kept_shape_attr = "_batch_shape"

    def __init__(self, weight: Any, bias: Any = None, *, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights: bool | Literal["gaussian"] = True, fan_in_fan_out: bool = False,
                 seed: int | None = None) -> None:
        weight = as_weight(weight)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        out_features = weight.shape[1] if self.fan_in_fan_out else weight.shape[0]
        if bias is not None:
            bias = as_vector(bias, weight.dtype, out_features, "bias")
        self.lora_alpha = check_real("lora_alpha", lora_alpha)
        self.lora_dropout = check_dropout(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.init_lora_weights = init_lora_weights
        self._weight = weight
        self._bias = bias
        in_features = weight.shape[0] if self.fan_in_fan_out else weight.shape[1]
        r = check_rank(r, in_features, out_features, weight.dtype)
        try:
            self._core = _CORE_LINEAR[weight.dtype](
                weight, bias, self.fan_in_fan_out, r, self.lora_alpha, self.lora_dropout,
                self.use_rslora, init_mode(init_lora_weights), resolve_seed(seed))
        except MemoryError:  # C++'s bad_alloc, which says nothing of the sizes
            raise adapter_memory_error(r, in_features, out_features, weight.dtype) from None
        self._init_guard()
        self.training = True
        self._batch_shape: tuple[int, ...] | None = None

    @property
    def bias(self) -> np.ndarray | None:
        """The frozen bias, shape (out_features,), or None."""
        return self._bias

    @property
    def in_features(self) -> int:
        """Width of the input."""
        return int(self._core.in_features)

    @property
    def out_features(self) -> int:
        """Width of the output."""
        return int(self._core.out_features)

    lora_A = parameter_property("lora_A", "Trainable A, shape (r, in_features), sharing the "
                                          "layer's memory.")
    lora_B = parameter_property("lora_B", "Trainable B, shape (out_features, r), sharing the "
                                          "layer's memory.")
    lora_A_grad = parameter_property("lora_A_grad", "Accumulated gradient of lora_A, shape "
                                                    "(r, in_features).")
    lora_B_grad = parameter_property("lora_B_grad", "Accumulated gradient of lora_B, shape "
                                                    "(out_features, r).")

    def forward(self, x: Any, *, out: np.ndarray | None = None) -> np.ndarray:
        """Apply the layer.

        Parameters
        ----------
        x : array_like, shape (..., in_features)
            Inputs of another real dtype are cast to the layer's dtype.
        out : ndarray, shape (..., out_features), optional
            C-contiguous array of the layer's dtype to write the result into.

        Returns
        -------
        ndarray, shape (..., out_features)
        """
        x = as_input(x, self.dtype, self.in_features)
        batch_shape = x.shape[:-1]
        y = output_array(out, batch_shape + (self.out_features,), self.dtype, (x,))
        if out is not None:
            self._check_out(out)
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        if self._training:  # keeps activations and draws dropout: the layer's own state
            with self._guard.writing_layer("run a training-mode forward"):
                self._core.forward(x2, y2, True)
                self._batch_shape = batch_shape
        else:
            with self._guard:
                self._core.forward(x2, y2, False)
            self._batch_shape = None
        return y

    def backward(self, grad_y: Any, *, retain_graph: bool = False) -> np.ndarray:
        """Back-propagate through the last training-mode forward.

        Adds to ``lora_A_grad`` and ``lora_B_grad`` (call ``zero_grad()`` between steps). Each
        forward serves one backward: what it kept is freed here, unless ``retain_graph``.

        Parameters
        ----------
        grad_y : array_like, shape (..., out_features)
            Gradient of the loss with respect to the last output.
        retain_graph : bool
            Keep what the forward kept, for another backward on the same forward (PyTorch's
            ``retain_graph``): backward is linear in ``grad_y``, so two calls add up to one with
            their sum (two losses on one output, a Jacobian row by row).

        Returns
        -------
        ndarray, shape (..., in_features)
            Gradient of the loss with respect to the last input.
        """
        with self._guard.writing_layer("run backward"):
            if self._batch_shape is None:
                raise RuntimeError(NO_KEPT_FORWARD)
            grad_y = as_input(grad_y, self.dtype, self.out_features, "grad_y")
            expected = self._batch_shape + (self.out_features,)
            if grad_y.shape != expected:
                raise ValueError(f"grad_y must have shape {expected}, got {grad_y.shape}")
            grad_x = np.empty(self._batch_shape + (self.in_features,), dtype=self.dtype)
            self._core.backward(grad_y.reshape(-1, self.out_features),
                                grad_x.reshape(-1, self.in_features))
            # What the forward kept is used up unless asked for again: a second backward would
            # add the same gradients again by mistake (PyTorch raises there too), and the memory
            # is free for the next forward.
            if not retain_graph:
                self._core.clear_cache()
                self._batch_shape = None
        return grad_x

    def _init_args(self) -> dict[str, Any]:
        return dict(weight=self._weight, bias=self._bias, r=self.r, lora_alpha=self.lora_alpha,
                    lora_dropout=self.lora_dropout, use_rslora=self.use_rslora,
                    init_lora_weights=self.init_lora_weights, fan_in_fan_out=self.fan_in_fan_out,
                    seed=int(self._core.seed))

    def __repr__(self) -> str:
        stats = self.stats()
        extra = f", lora_dropout={self.lora_dropout:g}" if self.lora_dropout else ""
        extra += ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        extra += "" if self.adapter_enabled else ", adapter_enabled=False"
        return (f"LoraLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}{extra}, "
                f"dtype={self.dtype}, merged={self.merged}, training={self.training}, "
                f"trainable={stats['trainable_params']}, frozen={stats['frozen_params']})")


def swap_adapters(merged: LoraLinear, new: LoraLinear) -> None:
    """Replace the merged adapter `merged` by `new` in one pass over their shared weight.

    Both layers must wrap the same weight array; afterwards `merged` is unmerged and `new` merged:
    ``W += s_new B_new A_new - s_old B_old A_old`` as a single rank-(r_old + r_new) update.

    Parameters
    ----------
    merged : LoraLinear
        A merged layer over the weight W, shape (out_features, in_features).
    new : LoraLinear
        An unmerged layer over the same W and of the same dtype (its rank may differ).
    """
    if not isinstance(merged, LoraLinear) or not isinstance(new, LoraLinear):
        raise TypeError("swap_adapters takes two LoraLinear layers")
    if merged.dtype != new.dtype:
        raise TypeError(f"swap_adapters: dtypes differ ({merged.dtype} and {new.dtype})")
    with writing_all([merged._guard, new._guard], "swap adapters", weight=True):
        _core.swap_merged(merged._core, new._core)
