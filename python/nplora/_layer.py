"""What LoraLinear and LoraEmbedding share: modes, merging, parameters and their gradients."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np

from ._arrays import byte_range
from ._guard import LayerGuard, _buffer_of


_Layer = TypeVar("_Layer", bound="LoraLayerBase")  # train()/eval() return the subclass itself


class LoraWarning(UserWarning):
    """Warnings from nplora (a second merge, an unmerge with nothing merged, ...)."""


# Backward's message when nothing is kept for it, for both layers.
NO_KEPT_FORWARD = ("backward() needs a forward() in training mode first: nothing is kept (each "
                   "forward serves one backward unless retain_graph=True; optimizer steps, merges, "
                   "assigning lora_A or lora_B and mixed batches drop what a forward kept)")


def parameter_property(name: str, doc: str) -> property:
    """A layer attribute over the core's array `name` (A, B or a gradient), which shares the
    layer's memory; assigning a whole array copies it in.

    Assigning takes the layer to itself (no eval forward reads A while it is written). A new A or
    B also drops what the last training-mode forward kept: its backward would mix the old values
    (kept x A^T) with the new ones, as PyTorch refuses after an in-place change. Complex, string
    or object arrays are a TypeError (NumPy's cast would drop an imaginary part with a warning).
    """
    def get(self: LoraLayerBase) -> np.ndarray:
        return getattr(self._core, name)

    def assign(self: LoraLayerBase, value: Any) -> None:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be real numbers, got dtype {array.dtype}")
        with self._guard.writing_layer(f"assign {name}"):
            setattr(self._core, name, array)
            if not name.endswith("_grad"):
                self._drop_kept()

    return property(get, assign, doc=doc)


class LoraLayerBase:
    """Base of the LoRA layers: a frozen weight, a low-rank pair (A, B) and their gradients.

    Subclasses set ``_core`` (the C++ layer), ``_param_names`` (names of A and B) and
    ``_weight``/``_bias``, then call ``_init_guard()``.

    Threads: eval-mode forward may run on a layer from many threads at once; calls that change
    it (merge, unmerge, backward, zero_grad, train/eval, training-mode forward, optimizer steps)
    raise RuntimeError when another thread is using it, instead of racing (see ``_guard``).

    Pickling (and ``copy.copy``/``deepcopy``, ``multiprocessing``) carries the weight, so a
    restored layer owns its copy of the weight; A, B, their gradients and the merged, training
    and adapter_enabled flags come back too. What a training-mode forward kept for backward does
    not (run a forward again), and the dropout stream restarts at the layer's seed.
    """

    _param_names: tuple[str, str]
    _kept_shape_attr: str  # the batch shape of the forward a backward would use, or None
    _core: Any
    _weight: np.ndarray
    _bias: np.ndarray | None
    _guard: LayerGuard

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

    def _init_guard(self) -> None:
        self._guard = LayerGuard(self._weight, f"{type(self).__name__} over a weight of shape "
                                               f"{self._weight.shape}", owner=self, core=self._core)

    @property
    def training(self) -> bool:
        """Training mode; assigning it is ``train(mode)`` (leaving it frees what backward kept)."""
        return self._training

    @training.setter
    def training(self, mode: bool) -> None:
        self.train(mode)

    def train(self: _Layer, mode: bool = True) -> _Layer:
        """Set training mode (dropout on, activations kept for backward).

        Parameters
        ----------
        mode : bool
            True for training, False for evaluation (what ``eval()`` does).

        Returns
        -------
        LoraLinear or LoraEmbedding
            The layer itself, so that ``layer = LoraLinear(...).eval()`` works.
        """
        with self._guard.writing_layer("change training mode"):
            self._training = bool(mode)
            if not self._training:
                self._core.clear_cache()
        return self

    def eval(self: _Layer) -> _Layer:
        """Set evaluation mode (no dropout, nothing kept for backward).

        Returns
        -------
        LoraLinear or LoraEmbedding
            The layer itself.
        """
        return self.train(False)

    @property
    def adapter_enabled(self) -> bool:
        """False runs the base layer alone (PEFT's ``disable_adapters``); disabling unmerges first."""
        return bool(self._core.adapter_enabled)

    @adapter_enabled.setter
    def adapter_enabled(self, enabled: bool) -> None:
        unmerge = not enabled and self.merged
        with (self._guard.writing_weight if unmerge else self._guard.writing_layer)(
                "change adapter_enabled"):
            if unmerge:
                warnings.warn("Disabling a merged adapter: unmerging it first.", LoraWarning,
                              stacklevel=2)
                self._core.unmerge()
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
        with self._guard.writing_weight("merge"):
            if self.merged:
                warnings.warn("Already merged. Nothing to do.", LoraWarning, stacklevel=2)
                return
            if safe_merge:
                candidate = self._merged_copy()
                if not np.isfinite(candidate).all():
                    raise ValueError("NaNs or infinities detected in the merged weights: the "
                                     "adapter seems to be broken; the weight was left unchanged")
            self._core.merge()

    def merged_weight(self) -> np.ndarray:
        """``weight + scaling * B @ A`` as a new array (the weight itself is not touched).

        Works on read-only (memory-mapped) weights, where ``merge()`` cannot.

        Returns
        -------
        ndarray, shape of ``weight``
            In the layer's dtype; transposed like the weight when ``fan_in_fan_out``.
        """
        with self._guard:
            return self._merged_copy()

    def _merged_copy(self) -> np.ndarray:
        if self.merged:
            return self._weight.copy()
        target = np.array(self._weight, dtype=self.dtype, order="C", copy=True)
        self._core.add_delta_to(target, 1.0)
        return target

    def unmerge(self) -> None:
        """Subtract scaling * B @ A from the weight again; warns if nothing is merged."""
        with self._guard.writing_weight("unmerge"):
            unmerged = self._core.unmerge()
        if not unmerged:
            warnings.warn("Already unmerged. Nothing to do.", LoraWarning, stacklevel=2)

    def delta_weight(self) -> np.ndarray:
        """The update ``scaling * B @ A`` as a new array.

        Returns
        -------
        ndarray, shape of ``weight``
            (out_features, in_features), or (in_features, out_features) when ``fan_in_fan_out``;
            (num_embeddings, embedding_dim) for an embedding.
        """
        out = np.empty(self._weight.shape, dtype=self.dtype)
        with self._guard:
            self._core.delta_weight(out)
        return out

    def _check_out(self, out: np.ndarray) -> None:
        """ValueError if ``out=`` overlaps what the layer reads or keeps (weight, bias, A, B, the
        gradients), which the kernels read while they write `out`."""
        cached = self.__dict__.get("_owned_cache")
        if cached is None:
            # Found once: the arrays never move (assigning A copies into it); making their views
            # on every call doubled the cost of a small forward with out=.
            arrays = [self._weight] + [a for _, a in self.named_parameters()] + [
                g for _, g in self.named_grads()] + ([] if self._bias is None else [self._bias])
            cached = (frozenset(id(_buffer_of(a)) for a in arrays),
                      tuple(byte_range(a) + (a.shape,) for a in arrays))
            self.__dict__["_owned_cache"] = cached
        owners, ranges = cached
        root = _buffer_of(out)
        if isinstance(root, np.ndarray) and id(root) not in owners:
            return  # memory of an array of its own (np.empty): no overlap to look for
        start, end = byte_range(out)
        for owned_start, owned_end, shape in ranges:
            if start < owned_end and owned_start < end and out.nbytes:
                raise ValueError(f"out must not overlap the layer's own arrays (weight, bias, "
                                 f"parameters, gradients): it shares memory with one of shape "
                                 f"{shape}")

    def _forget_forward(self) -> None:
        """Drop what the last training-mode forward kept (backward then raises until the next)."""
        with self._guard.writing_layer("run a forward"):
            self._drop_kept()

    def _drop_kept(self) -> None:
        """``_forget_forward`` for a caller that holds the layer already (an optimizer step)."""
        self._core.clear_cache()
        setattr(self, self._kept_shape_attr, None)

    def zero_grad(self) -> None:
        """Set the gradients of A and B to zero."""
        with self._guard.writing_layer("zero_grad"):
            self._core.zero_grad()

    def named_parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        """The trainable arrays, which share the layer's memory (write into them to change A, B).

        Yields
        ------
        (str, ndarray)
            ``("lora_A", A)`` then ``("lora_B", B)``, shapes (r, in_features) and
            (out_features, r); for an embedding ``lora_embedding_A`` (r, num_embeddings) and
            ``lora_embedding_B`` (embedding_dim, r).
        """
        for name in self._param_names:
            yield name, getattr(self._core, name)

    def named_grads(self) -> Iterator[tuple[str, np.ndarray]]:
        """The gradient of each trainable array, in the order of ``named_parameters()``.

        Yields
        ------
        (str, ndarray)
            ``("lora_A", grad)``, ...: same names and shapes as ``named_parameters()``.
        """
        for name in self._param_names:
            yield name, getattr(self._core, name + "_grad")

    def stats(self) -> dict[str, int]:
        """Parameter counts of the layer.

        Returns
        -------
        dict
            ``{"trainable_params": A.size + B.size, "frozen_params": weight.size + bias.size,
            "total_params": their sum}``.
        """
        trainable = sum(p.size for _, p in self.named_parameters())
        frozen = self._weight.size + (0 if self._bias is None else self._bias.size)
        return {
            "trainable_params": int(trainable),
            "frozen_params": int(frozen),
            "total_params": int(trainable + frozen),
        }

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return self.forward(*args, **kwargs)  # type: ignore[attr-defined]

    # ----------------------------------------------------------------- pickle, copy.deepcopy
    def _init_args(self) -> dict[str, Any]:
        """The constructor's arguments that rebuild this layer (weight included)."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        with self._guard:
            state = {k: v for k, v in self.__dict__.items()
                     if k not in ("_core", "_guard", "_owned_cache")}  # addresses: not carried
            state["_init_args"] = self._init_args()
            state["_arrays"] = {attr: np.array(getattr(self._core, attr))
                                for name in self._param_names for attr in (name, name + "_grad")}
            state["_merged"], state["_adapter_enabled"] = self.merged, self.adapter_enabled
        return state

    def __copy__(self) -> LoraLayerBase:
        # A shallow copy would share the weight while each copy tracks its own merged flag.
        return copy.deepcopy(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        arrays, merged = state.pop("_arrays"), state.pop("_merged")
        enabled = state.pop("_adapter_enabled")
        type(self).__init__(self, **state.pop("_init_args"))  # owns the unpickled weight
        training = state.pop("_training", True)
        # What __init__ set is rebuilt from the same arguments; anything else is restored.
        self.__dict__.update({k: v for k, v in state.items() if k not in self.__dict__})
        core = self._core
        if merged:  # the weight holds the merged values already: set the flag, adding zeros
            for name in self._param_names:
                getattr(core, name).fill(0)
            core.merge()
        for name, array in arrays.items():
            setattr(core, name, array)
        core.adapter_enabled = enabled
        self.train(training)

    def _repr_html_(self) -> str:
        from .display import layer_html

        return layer_html(self)
