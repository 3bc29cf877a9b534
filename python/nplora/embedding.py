"""LoraEmbedding: a frozen embedding table with a trainable low-rank update, on NumPy arrays."""

from __future__ import annotations

import numbers
from typing import Any, Literal

import numpy as np

from . import _core
from ._arrays import (
    adapter_memory_error,
    aligned,
    as_input,
    as_weight,
    check_int,
    check_rank,
    check_real,
    init_mode,
    output_array,
    resolve_seed,
)
from ._layer import NO_KEPT_FORWARD, LoraLayerBase, parameter_property

_CORE_EMBEDDING = {np.dtype(np.float32): _core.LoraEmbedding_float32,
                   np.dtype(np.float64): _core.LoraEmbedding_float64}


def as_ids(ids: Any, num_embeddings: int) -> np.ndarray:
    """`ids` as a C-contiguous int64 array; TypeError unless they are integers.

    Ids beyond int64 (uint64 values from 2**63, Python ints NumPy keeps as objects) are an
    IndexError naming the id as given: cast first, 2**64 - 1 would be reported as -1.
    """
    array = np.asarray(ids)
    if array.dtype.kind == "f" and not isinstance(ids, np.ndarray):
        # A list mixing int64 and uint64 values becomes float64 (2**64 - 1 rounded): as objects,
        # integers stay exact and get the range check below.
        exact = np.asarray(ids, dtype=object)
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in exact.reshape(-1)):
            array = exact
    flat = array.reshape(-1)
    if array.dtype.kind == "O" and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                       for v in flat):
        beyond = [i for i, v in enumerate(flat) if not _INT64_MIN <= v <= _INT64_MAX]
        if not beyond:
            array = array.astype(np.int64)
        else:
            raise _id_error(int(flat[beyond[0]]), beyond[0], num_embeddings)
    if array.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got dtype {array.dtype}")
    if array.dtype.kind == "u" and flat.size and int(flat.max()) > _INT64_MAX:
        position = int(np.argmax(flat > _INT64_MAX))
        raise _id_error(int(flat[position]), position, num_embeddings)
    return aligned(np.asarray(array, dtype=np.int64, order="C"))  # (ascontiguousarray: 0-D -> 1-D)


_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def _id_error(value: int, position: int, num_embeddings: int) -> IndexError:
    # The core's message for the ids it checks itself (lora_embedding.cpp).
    return IndexError(f"index {value} at position {position} is out of range for "
                      f"{num_embeddings} embeddings")


class LoraEmbedding(LoraLayerBase):
    """A frozen embedding table plus a trainable low-rank update (PEFT's LoRA ``Embedding``).

    ``out = weight[ids] + scaling * lora_embedding_A.T[ids] @ lora_embedding_B.T``

    Parameters
    ----------
    weight : array_like, shape (num_embeddings, embedding_dim)
        The frozen table; a C-contiguous float32/float64 array is used in place (merge writes into it).
    r : int
        Rank of the update (>= 1).
    lora_alpha : float
        scaling = lora_alpha / r (or / sqrt(r) with ``use_rslora``).
    padding_idx : int, optional
        This id's column of lora_embedding_A never receives a gradient (as torch's padding_idx).
    use_rslora : bool
        Rank-stabilised scaling.
    init_lora_weights : True, False or "gaussian"
        As PEFT: True/"gaussian" = A zeros, B ~ N(0, 1); False = both ~ N(0, 1).
    seed : int, optional
        Seeds the initialisation; None draws fresh entropy.

    Attributes
    ----------
    lora_embedding_A : ndarray, shape (r, num_embeddings)
    lora_embedding_B : ndarray, shape (embedding_dim, r)
    lora_embedding_A_grad, lora_embedding_B_grad : ndarray, same shapes
    """

    _param_names = ("lora_embedding_A", "lora_embedding_B")
    _kept_shape_attr = "_ids_shape"

    def __init__(self, weight: Any, *, r: int = 8, lora_alpha: float = 8,
                 padding_idx: int | None = None, use_rslora: bool = False,
                 init_lora_weights: bool | Literal["gaussian"] = True,
                 seed: int | None = None) -> None:
        weight = as_weight(weight)
        num_embeddings = weight.shape[0]
        if padding_idx is not None:
            padding_idx = check_int("padding_idx", padding_idx, -num_embeddings)
            if padding_idx >= num_embeddings:
                raise ValueError(f"padding_idx must be < num_embeddings ({num_embeddings}), "
                                 f"got {padding_idx}")
            padding_idx %= num_embeddings  # torch accepts a negative padding_idx
        self._padding_idx = padding_idx
        self.lora_alpha = check_real("lora_alpha", lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.init_lora_weights = init_lora_weights
        self._weight = weight
        self._bias = None
        r = check_rank(r, num_embeddings, weight.shape[1], weight.dtype)
        try:
            self._core = _CORE_EMBEDDING[weight.dtype](
                weight, -1 if padding_idx is None else padding_idx, r, self.lora_alpha,
                self.use_rslora, init_mode(init_lora_weights), resolve_seed(seed))
        except MemoryError:  # C++'s bad_alloc, which says nothing of the sizes
            raise adapter_memory_error(r, num_embeddings, weight.shape[1], weight.dtype) from None
        self._init_guard()
        self.training = True
        self._ids_shape: tuple[int, ...] | None = None

    @property
    def num_embeddings(self) -> int:
        """Rows of the table."""
        return int(self._core.num_embeddings)

    @property
    def padding_idx(self) -> int | None:
        """The id whose column of lora_embedding_A gets no gradient, or None (fixed at construction)."""
        return self._padding_idx

    @property
    def embedding_dim(self) -> int:
        """Width of each embedding."""
        return int(self._core.embedding_dim)

    lora_embedding_A = parameter_property("lora_embedding_A", "Trainable A, shape (r, num_embeddings).")
    lora_embedding_B = parameter_property("lora_embedding_B", "Trainable B, shape (embedding_dim, r).")
    lora_embedding_A_grad = parameter_property(
        "lora_embedding_A_grad", "Accumulated gradient of lora_embedding_A, shape (r, num_embeddings).")
    lora_embedding_B_grad = parameter_property(
        "lora_embedding_B_grad", "Accumulated gradient of lora_embedding_B, shape (embedding_dim, r).")

    def forward(self, ids: Any, *, out: np.ndarray | None = None) -> np.ndarray:
        """Look up embeddings.

        Parameters
        ----------
        ids : array_like of int, any shape
            Values in [0, num_embeddings); others raise IndexError.
        out : ndarray, shape ids.shape + (embedding_dim,), optional

        Returns
        -------
        ndarray, shape ids.shape + (embedding_dim,)
        """
        ids = as_ids(ids, self.num_embeddings)
        result = output_array(out, ids.shape + (self.embedding_dim,), self.dtype, (ids,))
        if out is not None:
            self._check_out(out)
        flat_ids, flat_out = ids.reshape(-1), result.reshape(-1, self.embedding_dim)
        if self._training:  # keeps the ids for backward: the layer's own state
            with self._guard.writing_layer("run a training-mode forward"):
                self._core.forward(flat_ids, flat_out, True)
                self._ids_shape = ids.shape
        else:
            with self._guard:
                self._core.forward(flat_ids, flat_out, False)
            self._ids_shape = None
        return result

    def backward(self, grad_out: Any, *, retain_graph: bool = False) -> None:
        """Back-propagate through the last training-mode forward into both gradients.

        Adds to ``lora_embedding_A_grad`` and ``lora_embedding_B_grad`` (call ``zero_grad()``
        between steps). Ids have no gradient, so nothing is returned. Each forward serves one
        backward: what it kept is freed here.

        Parameters
        ----------
        grad_out : array_like, shape ids.shape + (embedding_dim,)
            Gradient of the loss with respect to the last output.
        retain_graph : bool
            Keep what the forward kept, for another backward on the same forward (PyTorch's
            ``retain_graph``).
        """
        with self._guard.writing_layer("run backward"):
            if self._ids_shape is None:
                raise RuntimeError(NO_KEPT_FORWARD)
            grad_out = as_input(grad_out, self.dtype, self.embedding_dim, "grad_out")
            expected = self._ids_shape + (self.embedding_dim,)
            if grad_out.shape != expected:
                raise ValueError(f"grad_out must have shape {expected}, got {grad_out.shape}")
            self._core.backward(grad_out.reshape(-1, self.embedding_dim))
            # What the forward kept is used up unless asked for again: a second backward would
            # add the same gradients again by mistake (PyTorch raises there too), and the memory
            # is free for the next forward.
            if not retain_graph:
                self._core.clear_cache()
                self._ids_shape = None

    def _init_args(self) -> dict[str, Any]:
        return dict(weight=self._weight, r=self.r, lora_alpha=self.lora_alpha,
                    padding_idx=self.padding_idx, use_rslora=self.use_rslora,
                    init_lora_weights=self.init_lora_weights, seed=int(self._core.seed))

    def __repr__(self) -> str:
        stats = self.stats()
        extra = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        extra += "" if self.adapter_enabled else ", adapter_enabled=False"
        return (f"LoraEmbedding(num_embeddings={self.num_embeddings}, "
                f"embedding_dim={self.embedding_dim}, r={self.r}, lora_alpha={self.lora_alpha:g}, "
                f"scaling={self.scaling:g}{extra}, dtype={self.dtype}, merged={self.merged}, "
                f"training={self.training}, trainable={stats['trainable_params']}, "
                f"frozen={stats['frozen_params']})")
