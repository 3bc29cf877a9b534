"""Optimizers that update LoRA parameters in place with one fused C++ pass per array."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from . import _core
from ._arrays import check_real
from ._guard import guards_of, writing_all

ParamGrad = tuple[np.ndarray, np.ndarray]


def collect_parameters(params: Any) -> list[ParamGrad]:
    """(parameter, gradient) pairs from a layer, a model, a list of those, or of (param, grad) pairs.

    Anything with ``named_parameters()`` and ``named_grads()`` (nplora's layers and models) counts.
    """
    if hasattr(params, "named_parameters") and hasattr(params, "named_grads"):
        found = [(p, g) for (_, p), (_, g) in zip(params.named_parameters(), params.named_grads())]
    elif isinstance(params, tuple) and len(params) == 2 and all(isinstance(a, np.ndarray) for a in params):
        found = [params]
    elif isinstance(params, Iterable) and not isinstance(params, (str, bytes, np.ndarray)):
        found = [pair for item in params for pair in collect_parameters(item)]
    else:
        raise TypeError("params must be a layer, a model, or a list of layers or (param, grad) "
                        f"pairs, got {type(params).__name__}")
    seen: set[int] = set()
    for param, grad in found:
        if param.ctypes.data in seen and param.size:
            raise ValueError(f"a parameter of shape {param.shape} is given twice (the same layer "
                             "listed twice?): each step would update it twice")
        seen.add(param.ctypes.data)
        if param.shape != grad.shape or param.dtype != grad.dtype:
            raise ValueError(f"gradient {grad.shape} {grad.dtype} does not match parameter "
                             f"{param.shape} {param.dtype}")
        if param.dtype not in (np.float32, np.float64):
            raise TypeError(f"parameters must be float32 or float64, got {param.dtype}")
        if not (param.flags.aligned and grad.flags.aligned):
            raise ValueError("parameters and gradients must be aligned to their dtype")
        if not (param.flags.c_contiguous and grad.flags.c_contiguous):  # refused here, not at step()
            raise ValueError(f"parameters and gradients must be C-contiguous, got a pair of shape "
                             f"{param.shape} that is not")
        if not (param.flags.writeable and grad.flags.writeable):
            raise ValueError(f"parameters and gradients must be writable, got a pair of shape "
                             f"{param.shape} that is not")
    return found


def _layers_only(params: Any) -> list[Any] | None:
    """The layers `params` names (a layer, a model's active adapter, lists of them), or None
    when it holds raw (param, grad) arrays."""
    if hasattr(params, "named_parameters") and hasattr(params, "named_grads"):
        layers = getattr(params, "layers", None)
        return list(layers().values()) if callable(layers) else [params]
    if isinstance(params, tuple) and len(params) == 2 and all(isinstance(a, np.ndarray) for a in params):
        return None
    found: list[Any] = []
    for item in params:
        layers = _layers_only(item)
        if layers is None:
            return None
        found.extend(layers)
    return found


def _at_least(name: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value:g}")


class Optimizer:
    """Base class: holds (parameter, gradient) pairs; ``zero_grad()`` clears the gradients.

    Parameters
    ----------
    params : layer, model, or list of layers or (param, grad) pairs
        What to update: every layer's ``named_parameters()`` with its ``named_grads()``. Each
        pair is two C-contiguous float32/float64 arrays of one shape, updated in place.
    """

    step_count: int  # steps taken, set by each optimizer's __init__
    _hyperparameters: tuple[str, ...] = ()  # the names state_dict() carries besides the state

    def __init__(self, params: Any) -> None:
        if isinstance(params, Iterator):  # read three times below
            params = list(params)
        self.params = collect_parameters(params)
        if not self.params:
            raise ValueError("the optimizer got no parameters")
        self._guards = guards_of(params)  # the layers' guards: no step while another thread uses them
        # The layers, when that is all `params` names: a pickled or copied optimizer finds its
        # parameters in their copies. Raw (param, grad) arrays have no layer to be found in.
        self._layers = _layers_only(params)

    def _state_arrays(self) -> list[tuple[np.ndarray, ...]]:
        """Per parameter, in order, the optimizer's own arrays for it (moments, momentum)."""
        return [() for _ in self.params]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state as plain data (copies), for ``load_state_dict`` later.

        Returns
        -------
        dict
            ``{"type": class name, "step_count": int, "hyperparameters": {name: value},
            "state": [[array, ...] per parameter, in order]}``; picklable, and with
            ``np.savez`` the arrays save too.
        """
        return {"type": type(self).__name__, "step_count": self.step_count,
                "hyperparameters": {name: getattr(self, name) for name in self._hyperparameters},
                "state": [[a.copy() for a in arrays] for arrays in self._state_arrays()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the state ``state_dict()`` gave, checked against this optimizer's parameters.

        Parameters
        ----------
        state : dict
            From ``state_dict()`` of an optimizer of the same type over parameters of the same
            shapes, in the same order. ValueError (nothing changed) otherwise.
        """
        if not isinstance(state, dict) or state.get("type") != type(self).__name__:
            raise ValueError(f"not a {type(self).__name__} state_dict: type "
                             f"{state.get('type') if isinstance(state, dict) else type(state).__name__!r}")
        mine, theirs = self._state_arrays(), state["state"]
        if len(theirs) != len(mine):
            raise ValueError(f"the state_dict has state for {len(theirs)} parameters, this "
                             f"optimizer has {len(mine)}")
        for index, (ours, saved) in enumerate(zip(mine, theirs)):
            if len(saved) != len(ours) or any(np.shape(b) != a.shape for a, b in zip(ours, saved)):
                raise ValueError(f"parameter {index}: the state_dict's state has shapes "
                                 f"{[np.shape(b) for b in saved]}, this optimizer's "
                                 f"{[a.shape for a in ours]}")
        with writing_all(self._guards, "load an optimizer state"):
            for ours, saved in zip(mine, theirs):
                for array, values in zip(ours, saved):
                    np.copyto(array, values, casting="same_kind")
            for name, value in state["hyperparameters"].items():
                setattr(self, name, tuple(value) if isinstance(value, list) else value)
            self.step_count = int(state["step_count"])

    # ------------------------------------------------------------------ pickle, copy.deepcopy
    def __getstate__(self) -> dict[str, Any]:
        if self._layers is None:
            raise TypeError(
                f"a {type(self).__name__} over raw (param, grad) arrays cannot be pickled or copied: "
                "the copy would update copies of those arrays, not any layer. Build it over the "
                "layers or the model (and pickle them together), or save state_dict()")
        return {k: v for k, v in self.__dict__.items() if k not in ("params", "_guards")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # The (restored) layers' own arrays, in the order the state was kept in.
        self.params = collect_parameters(self._layers)
        self._guards = guards_of(self._layers)
        for (param, _), arrays in zip(self.params, self._state_arrays()):
            if any(a.shape != param.shape for a in arrays):
                raise ValueError("the optimizer's state does not fit its layers' parameters")

    def zero_grad(self) -> None:
        """Set every gradient to zero."""
        with writing_all(self._guards, "zero the gradients"):
            for _, grad in self.params:
                grad.fill(0)

    def _all_or_nothing(self, arrays: list[np.ndarray], update: Any) -> None:
        """Run ``update()``; if it raises part-way (even KeyboardInterrupt), put back `arrays`
        (parameters and optimizer state) and the step count as they were."""
        with writing_all(self._guards, "run an optimizer step"):
            saved, count = [a.copy() for a in arrays], self.step_count
            try:
                update()
            except BaseException:
                for array, before in zip(arrays, saved):
                    np.copyto(array, before)
                self.step_count = count
                raise
            # A forward kept before the step would serve a backward on the new A and B: its
            # gradients would be of neither (PyTorch refuses a backward after a step too).
            for guard in self._guards:
                layer = guard.owner()
                if layer is not None:
                    layer._drop_kept()

    def step(self) -> None:
        """Update every parameter in place from its gradient (each optimizer defines how)."""
        raise NotImplementedError

    def _repr_html_(self) -> str:
        from .display import optimizer_html

        return optimizer_html(self)


class AdamW(Optimizer):
    """AdamW with decoupled weight decay, as ``torch.optim.AdamW``, fused in C++.

    Parameters
    ----------
    params : layer, model, or list of layers or (param, grad) pairs
        What to update (lora_A and lora_B of each layer).
    lr : float
        Learning rate.
    betas : (float, float)
        Decay rates of the first and second moment.
    eps : float
        Added to the denominator.
    weight_decay : float
        Decoupled weight decay (PyTorch's default 0.01).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params)
        self.lr = check_real("lr", lr)
        self.betas = (check_real("betas[0]", betas[0]), check_real("betas[1]", betas[1]))
        self.eps = check_real("eps", eps)
        self.weight_decay = check_real("weight_decay", weight_decay)
        # PyTorch's checks, here rather than at the first step.
        _at_least("lr", self.lr, 0.0)
        _at_least("eps", self.eps, 0.0)
        _at_least("weight_decay", self.weight_decay, 0.0)
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        self.state = [(np.zeros_like(p), np.zeros_like(p)) for p, _ in self.params]
        self.step_count = 0

    _hyperparameters = ("lr", "betas", "eps", "weight_decay")

    def _state_arrays(self) -> list[tuple[np.ndarray, ...]]:
        return [tuple(pair) for pair in self.state]

    def step(self) -> None:
        """Update every parameter in place from its gradient (all of them, or none on error)."""
        def update() -> None:
            self.step_count += 1
            for (param, grad), (exp_avg, exp_avg_sq) in zip(self.params, self.state):
                _core.adamw_step(param, grad, exp_avg, exp_avg_sq, self.lr, self.betas[0],
                                 self.betas[1], self.eps, self.weight_decay, self.step_count)

        self._all_or_nothing([a for (p, _), s in zip(self.params, self.state) for a in (p, *s)],
                             update)

    def __repr__(self) -> str:
        return (f"AdamW(lr={self.lr:g}, betas={self.betas}, eps={self.eps:g}, "
                f"weight_decay={self.weight_decay:g}, params={len(self.params)}, "
                f"steps={self.step_count})")


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``, fused in C++.

    Parameters
    ----------
    params : layer, model, or list of layers or (param, grad) pairs
    lr : float
        Learning rate.
    momentum : float
        Momentum factor (0 disables it).
    dampening : float
        Dampening of the momentum.
    weight_decay : float
        L2 penalty added to the gradient.
    nesterov : bool
        Nesterov momentum (needs momentum > 0 and dampening 0).
    """

    def __init__(self, params: Any, lr: float = 1e-2, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(params)
        self.lr = check_real("lr", lr)
        self.momentum = check_real("momentum", momentum)
        self.dampening = check_real("dampening", dampening)
        self.weight_decay = check_real("weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        for name in ("lr", "momentum", "weight_decay"):
            _at_least(name, getattr(self, name), 0.0)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening == 0")
        self.momentum_buffers = [np.zeros_like(p) for p, _ in self.params]
        self.step_count = 0

    _hyperparameters = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def _state_arrays(self) -> list[tuple[np.ndarray, ...]]:
        return [(buffer,) for buffer in self.momentum_buffers]

    def step(self) -> None:
        """Update every parameter in place from its gradient (all of them, or none on error)."""
        def update() -> None:
            first = self.step_count == 0
            self.step_count += 1
            for (param, grad), buf in zip(self.params, self.momentum_buffers):
                _core.sgd_step(param, grad, buf, self.lr, self.momentum, self.dampening,
                               self.weight_decay, self.nesterov, first)

        self._all_or_nothing([a for (p, _), b in zip(self.params, self.momentum_buffers)
                              for a in (p, b)], update)

    def __repr__(self) -> str:
        return (f"SGD(lr={self.lr:g}, momentum={self.momentum:g}, dampening={self.dampening:g}, "
                f"weight_decay={self.weight_decay:g}, nesterov={self.nesterov}, "
                f"params={len(self.params)}, steps={self.step_count})")
