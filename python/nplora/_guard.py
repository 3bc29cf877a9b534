"""Guards against concurrent mutation: a clear RuntimeError instead of a data race.

Eval-mode forward only reads a layer (its weight, A and B), and the C++ core releases the GIL, so
any number of threads may run it on shared layers at once. Everything else changes something that
a concurrent call reads: merge/unmerge/swap write the weight, which all the adapters over that
weight read; a training-mode forward, backward, zero_grad, train/eval and an optimizer step write
a layer's own state (its cache, gradients, A and B). Those calls need what they write to
themselves, and fail at once if another thread is using it: they never wait, so there is no
deadlock and no silent queueing.

Two levels, because adapters over one base weight share it (a LoraModel's modules, or layers built
on the same array): one ``_WeightGuard`` per weight array, shared by every layer over it, and one
``LayerGuard`` per layer. Readers take no lock: each registers in lists (``append``/``pop`` are
atomic) and then checks the writer flags, while a writer sets its flag and then checks the lists
(Dekker's handshake), so at least one of two racing calls sees the other. Two racing calls may
both fail; neither ever proceeds unseen.
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import numpy as np

_HINT = ("merge, unmerge, backward, zero_grad, train/eval, optimizer steps and training-mode "
         "forward need a layer to themselves; only eval-mode forward may run concurrently")


class _WeightGuard:
    """Shared by every layer over one weight array: who writes it, how many calls read it."""

    __slots__ = ("lock", "users", "writing", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by the one weight writer
        self.users: list[None] = []  # one entry per call reading the weight (any layer over it)
        self.writing: str | None = None  # what the weight writer is doing


# Which layers' weights are one weight, found two ways: by the ndarray that owns the memory
# (views of one array share its guard, overlapping or not, in any order of construction), and by
# address, for memory no ndarray owns (two .numpy() views of one torch tensor, memoryviews, an
# mmap) and to join the two: disjoint runs of bytes sorted by start, [start, end, guard], each the
# union of the weights under one guard, found by bisection. Every layer whose weight overlaps
# another's (a fused QKV weight and a layer over its q rows, tied embeddings) thus shares its
# guard, since a merge through one changes what the other reads.
_OWNER_GUARDS: weakref.WeakValueDictionary[int, _WeightGuard] = weakref.WeakValueDictionary()
_WEIGHT_GUARDS: list[list[Any]] = []
_REGISTRY_LOCK = threading.Lock()
_DEAD = [False]  # a guard has died since the runs were last pruned


def _buffer_of(array: np.ndarray) -> Any:
    """The object that owns `array`'s memory: the end of its chain of bases (through the
    stand-ins NumPy keeps a base on, such as as_strided's)."""
    owner: Any = array
    while True:
        base = getattr(owner, "base", None)
        if base is None or not (isinstance(owner, np.ndarray) or isinstance(base, np.ndarray)):
            return owner
        owner = base


def _weight_guard(weight: np.ndarray) -> _WeightGuard:
    """The guard of the weights `weight` shares memory with (or a new one).

    The layers keep their weights alive, so an owner's id and a run's bytes stay theirs while the
    guard lives. (Should memory no ndarray owns be reached as two disjoint views first and a view
    over both later, that last one joins the first's guard only: not told apart.)
    """
    owner = _buffer_of(weight)
    start = weight.__array_interface__["data"][0]
    end = start + max(weight.nbytes, 1)
    with _REGISTRY_LOCK:
        runs = _WEIGHT_GUARDS
        if _DEAD[0]:
            runs[:] = [run for run in runs if run[2]() is not None]
            _DEAD[0] = False
        guard = _OWNER_GUARDS.get(id(owner)) if isinstance(owner, np.ndarray) else None
        i = bisect.bisect_right(runs, start, key=lambda run: run[1] - 1)  # first run ending after start
        j = i
        while j < len(runs) and runs[j][0] < end:  # every run overlapping [start, end)
            candidate = runs[j][2]()
            if candidate is not None and guard is None:
                guard = candidate
            start, end = min(start, runs[j][0]), max(end, runs[j][1])
            j += 1
        if guard is None:
            guard = _WeightGuard()
        runs[i:j] = [[start, end, weakref.ref(guard, _mark_dead)]]
        if isinstance(owner, np.ndarray):
            _OWNER_GUARDS.setdefault(id(owner), guard)
    return guard


def _mark_dead(_: Any) -> None:
    _DEAD[0] = True


_LAYER_GUARDS: weakref.WeakSet[LayerGuard] = weakref.WeakSet()
_CORE_GUARDS: weakref.WeakKeyDictionary[Any, LayerGuard] = weakref.WeakKeyDictionary()


def _guard_of_array(array: np.ndarray) -> LayerGuard | None:
    """The guard of the layer whose core owns `array` (a view of its A, B or a gradient)."""
    owner = _buffer_of(array)
    if isinstance(owner, np.ndarray):
        return None  # memory an ndarray owns: no core's
    try:
        return _CORE_GUARDS.get(owner)
    except (TypeError, ValueError):  # an unhashable base (a writable memoryview): not a core
        return None


def _reset_after_fork() -> None:
    """In a forked child only the forking thread runs: the calls other threads had in flight at
    the fork never finish there, so their marks would refuse every change to those layers forever."""
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for shared in {id(g): g for g in (run[2]() for run in _WEIGHT_GUARDS) if g is not None}.values():
        shared.lock, shared.writing = threading.Lock(), None
        shared.users.clear()
    for guard in list(_LAYER_GUARDS):
        guard.lock, guard.writing = threading.Lock(), None
        guard.readers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _busy(what: str, action: str, other: str) -> RuntimeError:
    return RuntimeError(f"{what} is being modified by another thread ({other}): cannot {action} "
                        f"now. {_HINT}")


def _in_use(what: str, action: str) -> RuntimeError:
    return RuntimeError(f"{what} is in use by another thread: cannot {action} now. {_HINT}")


# The core's message for a weight it cannot write (lora_options.cpp), for one made read-only after
# the layer was built: the core looks at the flag only then.
READ_ONLY_MESSAGE = ("weight is read-only (memory-mapped or a read-only array): merging writes into "
                     "it, so give the layer a writable copy (weight.copy())")


class LayerGuard:
    """The guard of one layer; ``what`` names the layer in error messages."""

    __slots__ = ("weight", "array", "lock", "readers", "writing", "what", "owner", "__weakref__")

    def __init__(self, weight: np.ndarray, what: str, owner: Any = None, core: Any = None) -> None:
        # The layer (weakly: an optimizer finds it through here) and its C++ core, whose arrays
        # (A, B, gradients) lead back to this guard when an optimizer is given raw pairs.
        self.owner = weakref.ref(owner) if owner is not None else lambda: None
        if core is not None:
            _CORE_GUARDS[core] = self
        self.weight = _weight_guard(weight)
        self.array = weakref.ref(weight)  # the layer's weight, whose writeable flag may change
        self.lock = threading.Lock()  # held by the one writer of this layer's own state
        self.readers: list[None] = []
        self.writing: str | None = None
        self.what = what
        _LAYER_GUARDS.add(self)

    # -------------------------------------------------------------- readers: no lock taken
    def __enter__(self) -> None:
        """``with guard:`` reads the layer (eval-mode forward); fails if a writer is active."""
        shared = self.weight
        shared.users.append(None)
        self.readers.append(None)
        writer = shared.writing or self.writing
        if writer:
            self.readers.pop()
            shared.users.pop()
            raise _busy(self.what, "read it", writer)

    def __exit__(self, *exc: object) -> None:
        self.readers.pop()
        self.weight.users.pop()

    # -------------------------------------------------------------- writers
    def writing_layer(self, action: str) -> _Held:
        """Context for a call that writes this layer's own state (and reads its weight)."""
        return _Held(self, action, weight=False)

    def writing_weight(self, action: str) -> _Held:
        """Context for a call that writes the weight (and so touches every layer over it)."""
        return _Held(self, action, weight=True)


class _Held:
    __slots__ = ("guard", "action", "weight", "taken")

    def __init__(self, guard: LayerGuard, action: str, weight: bool) -> None:
        self.guard, self.action, self.weight, self.taken = guard, action, weight, False

    def __enter__(self) -> None:
        guard, shared = self.guard, self.guard.weight
        if self.weight:
            # Every call on any layer over this weight registers in `users`: none may be running.
            if not shared.lock.acquire(blocking=False):
                raise _busy(guard.what, self.action, shared.writing or "a merge")
            shared.writing = self.action
            array = guard.array()
            in_use = bool(shared.users)  # read once: a reader may leave between two reads
            if in_use or (array is not None and not array.flags.writeable):
                shared.writing = None
                shared.lock.release()
                if in_use:
                    raise _in_use(guard.what, self.action)
                raise ValueError(READ_ONLY_MESSAGE)
        else:
            if not guard.lock.acquire(blocking=False):
                raise _busy(guard.what, self.action, guard.writing or "a training call")
            guard.writing = self.action
            shared.users.append(None)
            if guard.readers or shared.writing:
                other = shared.writing
                shared.users.pop()
                guard.writing = None
                guard.lock.release()
                raise _busy(guard.what, self.action, other) if other else _in_use(guard.what, self.action)
        self.taken = True

    def __exit__(self, *exc: object) -> None:
        if not self.taken:
            return
        self.taken = False
        guard, shared = self.guard, self.guard.weight
        if self.weight:
            shared.writing = None
            shared.lock.release()
        else:
            shared.users.pop()
            guard.writing = None
            guard.lock.release()


class _Reading:
    """Layers being read, released together at the end of a ``with`` block."""

    __slots__ = ("guards",)

    def __init__(self, guards: list[LayerGuard]) -> None:
        self.guards = guards

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        for guard in reversed(self.guards):
            guard.__exit__()


def reading_all(guards: Iterable[LayerGuard]) -> _Reading:
    """Read several layers at once (a mixed batch); fails, holding nothing, if any is written.

    (A plain loop rather than an ExitStack: a mixed batch over 64 adapters enters 64 guards per call.)
    """
    entered: list[LayerGuard] = []
    try:
        for guard in guards:
            guard.__enter__()
            entered.append(guard)
    except BaseException:
        for guard in reversed(entered):
            guard.__exit__()
        raise
    return _Reading(entered)


def writing_all(guards: Iterable[LayerGuard], action: str, *, weight: bool = False) -> ExitStack:
    """Write several layers at once (an optimizer step, a swap): all of them, or none and raise.

    With ``weight=True`` the weights are written: layers sharing a weight take its guard once.
    """
    with ExitStack() as undo:
        seen: set[int] = set()
        for guard in guards:
            key = id(guard.weight) if weight else id(guard)
            if key in seen:
                # Its weight's guard is taken already; its own array may still be read-only
                # (two views of one buffer, one made read-only after the layers were built).
                array = guard.array()
                if weight and array is not None and not array.flags.writeable:
                    raise ValueError(READ_ONLY_MESSAGE)
                continue
            seen.add(key)
            undo.enter_context(guard.writing_weight(action) if weight else guard.writing_layer(action))
        return undo.pop_all()


def guards_of(params: Any) -> list[LayerGuard]:
    """The guards of the layers in `params` (a layer, a model, or lists of them); raw arrays have none."""
    if isinstance(params, np.ndarray) or isinstance(params, (str, bytes)):
        return []
    guard = getattr(params, "_guard", None)
    if isinstance(guard, LayerGuard):
        return [guard]
    layers = getattr(params, "layers", None)
    if callable(layers) and hasattr(params, "named_parameters"):
        return [g for layer in layers().values() for g in guards_of(layer)]
    if isinstance(params, tuple) and len(params) == 2 and all(isinstance(a, np.ndarray) for a in params):
        # Raw (param, grad) arrays: a layer's own views lead to its guard (a step must not tear
        # a merge another thread runs on that layer); arrays of the caller's have none.
        found = {id(g): g for g in (_guard_of_array(a) for a in params) if g is not None}
        return list(found.values())
    if isinstance(params, Iterable):
        return [g for item in params for g in guards_of(item)]
    return []
