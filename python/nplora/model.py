"""LoraModel: LoRA adapters over a dict of NumPy weights named as Hugging Face names them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np

from ._arrays import as_weight, check_int
from ._guard import reading_all, writing_all
from ._layer import LoraWarning
from .adapters import (
    DEFAULT_ADAPTER,
    AdapterMismatchError,
    AdapterModule,
    adapter_directory,
    check_adapter_name,
    read_adapter,
    write_adapter,
)
from .config import CONFIG_NAME, FRESH_ONLY_INITS, LoraConfig
from .embedding import LoraEmbedding
from .linear import LoraLinear, swap_adapters
from .targets import EMBEDDING_NAMES, check_adapter_modules, match_targets

Layer = Union[LoraLinear, LoraEmbedding]

def _all_or_nothing(cores: Sequence[Any], action: str, undo: str) -> None:
    """Call ``core.<action>()`` on each core; if one raises, ``<undo>`` those done, then re-raise."""
    done = []
    try:
        for core in cores:
            getattr(core, action)()
            done.append(core)
    except BaseException:
        for core in reversed(done):
            getattr(core, undo)()
        raise


class _Module:
    """One adapted module: its base weight (shared by all its adapters) and a layer per adapter."""

    def __init__(self, path: str, kind: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
        self.path = path
        self.kind = kind
        self.weight = weight
        self.bias = bias
        self.layers: dict[str, Layer] = {}

    def merged_adapters(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.merged]


def _tied_pairs(modules: Sequence[_Module]) -> list[tuple[str, str]]:
    """Pairs of modules whose weights overlap in memory (tied weights: lm_head is embed_tokens)."""
    # Module weights are C-contiguous, so each is one span of bytes: sorted by start, a module
    # overlaps the earlier one that reaches furthest when it starts before that one ends.
    spans = sorted((m.weight.__array_interface__["data"][0], m.weight.nbytes, m.path)
                   for m in modules if m.weight.nbytes)
    pairs, reach, reach_path = [], -1, ""
    for start, size, path in spans:
        if start < reach:
            pairs.append((reach_path, path))
        if start + size > reach:
            reach, reach_path = start + size, path
    return pairs


def _tied_message(pairs: list[tuple[str, str]]) -> str:
    first, second = pairs[0]
    more = f" (and {len(pairs) - 1} more pairs)" if len(pairs) > 1 else ""
    return (f"{first}.weight and {second}.weight are one array (tied weights){more}: an in-place "
            "merge_adapter() would add both modules' updates into it, so it refuses; "
            "merge_and_unload() gives each its own merged array")


class LoraModel:
    """LoRA adapters on the modules of a model given as a dict of NumPy weights.

    Parameters
    ----------
    base_weights : Mapping[str, ndarray]
        Hugging Face-named weights (``"model.layers.0.self_attn.q_proj.weight"`` [out, in],
        ``"….bias"`` [out]); a lazily loaded, memory-mapped mapping works (see
        ``nplora.open_weights``). Targeted weights that are C-contiguous float32/float64 are used
        in place (in-place merges write into them); float16/bfloat16 ones are widened to float32,
        and other layouts (Fortran order, strided views) copied once to C order: in-place merges
        write into those copies, which all of a module's adapters share.
    config : LoraConfig
        Which modules get an adapter (target_modules, exclude_modules, layers_to_transform, ...),
        and with which rank, alpha and initialisation.
    adapter_name : str
        Name of this first adapter.
    embedding_modules : iterable of str, optional
        Module paths that are embedding tables. By default a module whose last name component is
        one of ``EMBEDDING_NAMES`` (``embed_tokens``, ``wte``, ``word_embeddings``, ...) is one.
    seed : int, optional
        Seeds every layer's initialisation (each module gets its own stream).
    padding_idx : Mapping[str, int], optional
        ``{embedding module path: padding id}``, e.g. ``{"model.embed_tokens":
        config.pad_token_id}``: the torch module's ``padding_idx``, which PEFT reads from the
        model and a dict of weights does not hold. That id's column of ``lora_embedding_A`` then
        never gets a gradient, as in PEFT (its output is unchanged).

    Examples
    --------
    >>> model = LoraModel(weights, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    >>> y = model["model.layers.0.self_attn.q_proj"](x)
    """

    def __init__(self, base_weights: Mapping[str, Any], config: LoraConfig,
                 adapter_name: str = DEFAULT_ADAPTER, *, embedding_modules: Any = None,
                 seed: int | None = None, padding_idx: Mapping[str, int] | None = None) -> None:
        if not isinstance(base_weights, Mapping):
            raise TypeError(f"base_weights must be a mapping of name -> array, got "
                            f"{type(base_weights).__name__}")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
        self.base_weights = base_weights
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | None = None
        self.embedding_modules = None if embedding_modules is None else frozenset(embedding_modules)
        self.padding_idx = self._checked_padding(padding_idx)
        self._file_kinds: dict[str, str] = {}  # loaded files' modules: "linear" or "embedding"
        self._modules: dict[str, _Module] = {}
        self._adapters_disabled = False
        self.add_adapter(adapter_name, config, seed=seed)
        self.active_adapter = adapter_name

    def _checked_padding(self, padding_idx: Mapping[str, int] | None) -> dict[str, int]:
        if padding_idx is None:
            return {}
        if not isinstance(padding_idx, Mapping):
            raise TypeError(f"padding_idx must be a mapping of module path -> id, got "
                            f"{type(padding_idx).__name__}")
        checked = {}
        for path, value in padding_idx.items():
            key = f"{path}.weight"
            if key not in self.base_weights or len(self._shape(key)) != 2:
                raise KeyError(f"padding_idx names {path!r}, which has no 2-D {key!r} in the "
                               "base weights")
            rows = self._shape(key)[0]
            value = check_int(f"padding_idx[{path!r}]", value, -rows)
            if value >= rows:
                raise ValueError(f"padding_idx[{path!r}] must be < {rows} (the table's rows), "
                                 f"got {value}")
            checked[path] = value % rows  # torch accepts a negative padding_idx
        return checked

    # ----------------------------------------------------------------- modules and matching
    def _module_paths(self) -> list[str]:
        paths = []
        for key in self.base_weights:
            if key.endswith(".weight") and len(self._shape(key)) == 2:
                paths.append(key[: -len(".weight")])
        return paths

    def _shape(self, key: str) -> tuple[int, ...]:
        shape_of = getattr(self.base_weights, "shape_of", None)
        return tuple(shape_of(key)) if shape_of else tuple(np.shape(self.base_weights[key]))

    def _is_embedding(self, path: str) -> bool:
        # A loaded file's tensor names say which of its modules are embeddings; for the others,
        # embedding_modules or the names decide.
        kind = self._file_kinds.get(path)
        if kind is not None:
            return kind == "embedding"
        if self.embedding_modules is not None:
            return path in self.embedding_modules
        return path.rsplit(".", 1)[-1] in EMBEDDING_NAMES

    def _matched_paths(self, config: LoraConfig) -> list[str]:
        return match_targets(config, self._module_paths(), self._is_embedding)

    def _module(self, path: str, kind: str) -> _Module:
        if path in self._modules:
            module = self._modules[path]
            if module.kind != kind:
                raise AdapterMismatchError(f"module {path!r} is a {module.kind} layer, not {kind}")
            return module
        weight = self.base_weights[path + ".weight"]
        if np.dtype(weight.dtype) not in (np.float32, np.float64):
            weight = np.asarray(weight, dtype=np.float32)  # float16/bfloat16: widened once
        # Once here, not per layer: a weight in another layout (Fortran order) gets one C copy that
        # all of the module's adapters share, as merges and swaps need.
        weight = as_weight(weight, f"{path}.weight")
        bias = None
        if kind == "linear" and path + ".bias" in self.base_weights:
            bias = np.asarray(self.base_weights[path + ".bias"])
            if bias.dtype != weight.dtype:  # a bfloat16 base's bias too, with its weight
                bias = np.asarray(bias, dtype=weight.dtype)
        module = _Module(path, kind, weight, bias)
        self._modules[path] = module
        return module

    # ----------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters, in the order they were added (the ints of ``adapter_ids``)."""
        return list(self.peft_config)

    def add_adapter(self, adapter_name: str, config: LoraConfig, *, seed: int | None = None,
                    kinds: Mapping[str, str] | None = None) -> None:
        """Add a new adapter (freshly initialised) on the modules `config` targets.

        The active adapter does not change (use ``set_adapter``).

        Parameters
        ----------
        adapter_name : str
            Its name (letters, digits, ``_``, ``-``, ``.``: it becomes a folder name on save).
        config : LoraConfig
            Which modules, and with which rank, alpha and initialisation.
        seed : int, optional
            Seeds every layer's initialisation; None draws fresh entropy.
        kinds : Mapping[str, str], optional
            ``{module path: "linear" or "embedding"}`` to adapt exactly these modules instead of
            the ones `config` matches (used when loading a file).
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
        init = config.init_lora_weights
        if kinds is None and isinstance(init, str) and init.lower() in FRESH_ONLY_INITS:
            raise NotImplementedError(f"init_lora_weights={init!r} is not supported by nplora for a new "
                                      "adapter (an adapter trained from it loads: load_adapter)")
        paths = list(kinds) if kinds is not None else self._matched_paths(config)
        base_seed = np.random.SeedSequence(seed).generate_state(1, np.uint32)[0] if seed is None \
            else seed
        created: list[_Module] = []
        try:
            for path in paths:
                kind = kinds[path] if kinds is not None else (
                    "embedding" if self._is_embedding(path) else "linear")
                module = self._module(path, kind)
                layer_seed = (int(base_seed) * 1_000_003 + zlib.crc32(path.encode())) % 2**63
                common: dict[str, Any] = dict(
                    r=config.rank_for(path), lora_alpha=config.alpha_for(path),
                    use_rslora=config.use_rslora,
                    # Loading: A and B come from the file, so how they would start does not matter.
                    init_lora_weights=config.init_lora_weights if kinds is None else True,
                    seed=layer_seed)
                if kind != "embedding" and path in self.padding_idx:
                    raise ValueError(f"padding_idx names {path!r}, which is adapted as a linear "
                                     "layer, not an embedding (see embedding_modules)")
                if kind == "embedding":
                    layer: Layer = LoraEmbedding(module.weight,
                                                 padding_idx=self.padding_idx.get(path), **common)
                else:
                    try:
                        layer = LoraLinear(module.weight, module.bias,
                                           lora_dropout=config.lora_dropout,
                                           fan_in_fan_out=config.fan_in_fan_out, **common)
                    except ValueError as error:  # name the module: "bias must have shape ..."
                        hint = (" (a GPT-2-style Conv1D weight, (in, out)? then set "
                                "fan_in_fan_out=True)" if "bias must have shape" in str(error)
                                and not config.fan_in_fan_out else "")
                        raise ValueError(f"{path}: {error}{hint}") from None
                layer.adapter_enabled = not self._adapters_disabled
                module.layers[adapter_name] = layer
                created.append(module)
        except BaseException:
            for module in created:
                module.layers.pop(adapter_name, None)
            raise
        self.peft_config[adapter_name] = config
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        new_paths = {module.path for module in created}
        tied = [pair for pair in _tied_pairs(list(self._modules.values()))
                if new_paths.intersection(pair)]
        if tied:  # PEFT warns here too
            warnings.warn(_tied_message(tied), LoraWarning, stacklevel=2)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter that ``model[name]`` and training use.

        On a merged model the new adapter is merged in place of the old one (a single pass over
        each weight for linear modules).

        Parameters
        ----------
        adapter_name : str
            One of ``adapter_names``; KeyError otherwise.
        """
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter {adapter_name!r}; adapters: {self.adapter_names}")
        if adapter_name != self.active_adapter and self._merged():
            # Stay merged, with the new adapter: one pass over each weight (swap) where possible.
            for module in self._modules.values():
                old = module.layers.get(self.active_adapter) if self.active_adapter else None
                new = module.layers.get(adapter_name)
                if old is not None and old.merged and isinstance(old, LoraLinear) \
                        and isinstance(new, LoraLinear):
                    swap_adapters(old, new)
                    continue
                if old is not None and old.merged:
                    old.unmerge()
                if new is not None:
                    new.merge()
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (unmerged first if it is merged).

        Parameters
        ----------
        adapter_name : str
            One of ``adapter_names``; if it was active, the first remaining adapter becomes active.
        """
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter {adapter_name!r}; adapters: {self.adapter_names}")
        for module in self._modules.values():
            layer = module.layers.pop(adapter_name, None)
            if layer is not None and layer.merged:
                layer.unmerge()
        del self.peft_config[adapter_name]
        self._modules = {p: m for p, m in self._modules.items() if m.layers}
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which every module runs the base model alone (merged adapters are unmerged).

        Yields
        ------
        None
            ``with model.disable_adapter(): ...``; the adapters are enabled again on leaving.
        """
        previous = self._adapters_disabled
        self._set_enabled(False)
        try:
            yield
        finally:
            self._set_enabled(not previous)

    def _set_enabled(self, enabled: bool) -> None:
        self._adapters_disabled = not enabled
        for module in self._modules.values():
            for layer in module.layers.values():
                if not enabled and layer.merged:
                    layer.unmerge()
                layer.adapter_enabled = enabled

    def _merged(self) -> bool:
        return any(m.merged_adapters() for m in self._modules.values())

    # ----------------------------------------------------------------- layers
    @property
    def targets(self) -> list[str]:
        """Paths of the modules the active adapter adapts."""
        return [p for p, m in self._modules.items() if self.active_adapter in m.layers]

    def __getitem__(self, path: str) -> Layer:
        module = self._modules.get(path)
        if module is None or self.active_adapter not in module.layers:
            close = [p for p in self.targets if p.endswith(path.rsplit(".", 1)[-1])][:3]
            raise KeyError(f"{path!r} has no adapter {self.active_adapter!r}"
                           + (f"; did you mean one of {close}?" if close else ""))
        return module.layers[self.active_adapter]

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and path in self._modules and \
            self.active_adapter in self._modules[path].layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def layers(self, adapter_name: str | None = None) -> dict[str, Layer]:
        """The layers of one adapter.

        Parameters
        ----------
        adapter_name : str, optional
            The adapter; the active one by default.

        Returns
        -------
        dict
            ``{module path: LoraLinear or LoraEmbedding}``, in the order of the base weights.
        """
        name = adapter_name or self.active_adapter
        return {p: m.layers[name] for p, m in self._modules.items() if name in m.layers}

    def train(self, mode: bool = True) -> LoraModel:
        """Training mode (or, with ``mode=False``, evaluation mode) for every layer.

        Parameters
        ----------
        mode : bool
            True for training, False for evaluation.

        Returns
        -------
        LoraModel
            The model itself.
        """
        for module in self._modules.values():
            for layer in module.layers.values():
                layer.train(mode)
        return self

    def eval(self) -> LoraModel:
        """Evaluation mode for every layer (no dropout, nothing kept for backward).

        Returns
        -------
        LoraModel
            The model itself.
        """
        return self.train(False)

    def zero_grad(self) -> None:
        """Zero the gradients of the active adapter."""
        for layer in self.layers().values():
            layer.zero_grad()

    def named_parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        """The active adapter's trainable arrays (they share the layers' memory).

        Yields
        ------
        (str, ndarray)
            ``("<module>.lora_A", A)`` of shape (r, in_features), ``("<module>.lora_B", B)`` of
            shape (out_features, r), ... (``lora_embedding_A``/``_B`` for embeddings).
        """
        for path, layer in self.layers().items():
            for name, array in layer.named_parameters():
                yield f"{path}.{name}", array

    def named_grads(self) -> Iterator[tuple[str, np.ndarray]]:
        """The gradients of ``named_parameters()``, in the same order.

        Yields
        ------
        (str, ndarray)
            Same names and shapes as ``named_parameters()``.
        """
        for path, layer in self.layers().items():
            for name, array in layer.named_grads():
                yield f"{path}.{name}", array

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """Parameter counts, as PEFT's method of the same name.

        Returns
        -------
        (int, int)
            Trainable parameters of the active adapter, and all parameters (every base weight
            plus those trainable ones; a tied weight, one array under two names, counts once, as
            torch's ``parameters()`` does).
        """
        trainable = sum(a.size for _, a in self.named_parameters())
        frozen, seen = 0, set()
        lazy = hasattr(self.base_weights, "shape_of")  # a file's tensors: never one array twice
        for key in self.base_weights:
            if not lazy:
                array = self.base_weights[key]
                if isinstance(array, np.ndarray):
                    identity = (array.__array_interface__["data"][0], array.shape, array.strides)
                    if identity in seen:
                        continue
                    seen.add(identity)
            frozen += int(np.prod(self._shape(key)))
        return int(trainable), int(frozen + trainable)

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: … || all params: … || trainable%: …`` as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ----------------------------------------------------------------- forward
    def forward(self, path: str, x: Any, *, adapter_ids: Any = None) -> np.ndarray:
        """Run module `path` on `x`.

        Parameters
        ----------
        path : str
            Module path, e.g. ``"model.layers.0.self_attn.q_proj"``.
        x : array_like, shape (..., in_features), or integer ids (...) for an embedding
        adapter_ids : array_like, shape x.shape[:-1] (ids.shape for an embedding), optional
            A mixed batch: per row, the adapter to use, as an adapter name or an index into
            ``adapter_names``; ``-1``, ``None`` or ``"__base__"`` runs the base model alone, as
            do disabled adapters (``disable_adapter()``). A mixed batch is for inference: no
            dropout, and nothing is kept for a backward (what an earlier training-mode forward
            of this module kept is dropped).

        Returns
        -------
        ndarray, shape (..., out_features) (or ids.shape + (embedding_dim,))
        """
        if adapter_ids is None:
            return self[path](x)
        from .mixed import mixed_forward

        module = self._modules.get(path)
        if module is None:
            raise KeyError(f"{path!r} has no adapter")
        with reading_all(layer._guard for layer in module.layers.values()):
            # Checked while read, so no other thread's merge can land between check and use.
            if module.merged_adapters():
                raise RuntimeError(f"{path!r} has merged adapters: unmerge before a mixed batch")
            y = mixed_forward(module, self.adapter_names, x, adapter_ids)
            # It keeps nothing, so, once it has run, it drops what an earlier training-mode
            # forward kept: a backward then raises instead of pairing that forward's input with
            # this output's gradient. Done while still reading, so no training forward of
            # another thread can slip in first (writers are refused now); the layer's lock keeps
            # two threads' mixed batches from dropping at once (it is held only for moments:
            # by another dropper, or by a writer on its way to being refused).
            for layer in module.layers.values():
                if getattr(layer, layer._kept_shape_attr) is not None and \
                        layer._guard.lock.acquire(timeout=5):
                    try:
                        if getattr(layer, layer._kept_shape_attr) is not None:
                            layer._drop_kept()
                    finally:
                        layer._guard.lock.release()
        return y

    # ----------------------------------------------------------------- merging
    def merge_adapter(self, safe_merge: bool = False) -> None:
        """Merge the active adapter into the base weights, in place (all modules or none).

        Read-only (memory-mapped) base weights raise ValueError before anything is changed; use
        merge_and_unload() for those, and for tied weights (two adapted modules over one array,
        such as ``lm_head`` and ``embed_tokens``), whose updates would both land in it. With ``safe_merge`` every module is checked (NaN/Inf) before
        any is merged. A failure part-way (even KeyboardInterrupt) unmerges what was merged.

        Parameters
        ----------
        safe_merge : bool
            Check every merged weight for NaN/Inf first (costs one weight-sized copy per module).
        """
        read_only = [p for p, layer in self.layers().items() if layer._core.weight_read_only]
        if read_only:
            raise ValueError(f"{len(read_only)} base weight(s) are read-only (memory-mapped?), e.g. "
                             f"{read_only[0]}.weight: merge_and_unload() returns merged copies")
        tied = _tied_pairs([self._modules[path] for path in self.layers()])
        if tied:
            raise ValueError(_tied_message(tied))
        todo = {path: layer for path, layer in self.layers().items() if not layer.merged}
        with writing_all([layer._guard for layer in todo.values()], "merge", weight=True):
            if safe_merge:
                for path, layer in todo.items():
                    if not np.isfinite(layer._merged_copy()).all():
                        raise ValueError(f"NaNs or infinities in the merged {path}.weight: the "
                                         "adapter seems to be broken; nothing was merged")
            _all_or_nothing([layer._core for layer in todo.values()], "merge", "unmerge")

    def unmerge_adapter(self) -> None:
        """Undo every in-place merge (all of them, or, on a failure part-way, none)."""
        merged = [layer for module in self._modules.values() for layer in module.layers.values()
                  if layer.merged]
        with writing_all([layer._guard for layer in merged], "unmerge", weight=True):
            _all_or_nothing([layer._core for layer in merged], "unmerge", "merge")

    def merge_and_unload(self, progress: bool = False, safe_merge: bool = False
                         ) -> dict[str, np.ndarray]:
        """The base weights with the active adapter merged in, as a new dict (under
        ``disable_adapter()``, the base weights alone, as its forwards give).

        Adapted weights are new arrays in the base weight's dtype (float16/bfloat16 bases are merged
        in float32 and cast back); all others are the base arrays themselves. The model and its
        base weights are left as they were, so this works on read-only, memory-mapped weights.

        Parameters
        ----------
        progress : bool
            Show a tqdm progress bar over the tensors.
        safe_merge : bool
            Raise ValueError if a merged weight holds NaN or infinite values.

        Returns
        -------
        dict
            ``{name: ndarray}`` with the keys and shapes of ``base_weights``:
            ``"<module>.weight"`` (out_features, in_features) is ``W + scaling * B @ A``.
        """
        from tqdm.auto import tqdm

        merged: dict[str, np.ndarray] = {}
        layers = self.layers()
        for key in tqdm(list(self.base_weights), disable=not progress, desc="merging"):
            path = key[: -len(".weight")] if key.endswith(".weight") else None
            layer = layers.get(path) if path is not None else None
            original = self.base_weights[key]
            if layer is None or self._adapters_disabled and not (
                    layer.merged and np.shares_memory(layer.weight, original)):
                merged[key] = original
                continue
            if self._adapters_disabled:
                # Disabled, but merged into this very array (merge_adapter): the base is the array
                # with the update taken out again, as the disabled forward computes it.
                base = np.array(layer.weight, order="C", copy=True)
                layer._core.add_delta_to(base, -1.0)
                merged[key] = base.astype(original.dtype, copy=False)
                continue
            with np.errstate(over="ignore"):  # checked below, in the dtype it is returned in
                weight = layer.merged_weight().astype(original.dtype, copy=False)
            if safe_merge and not np.isfinite(weight).all():
                raise ValueError(f"NaNs or infinities in the merged {key} (as {weight.dtype}): the "
                                 "adapter seems broken")
            merged[key] = weight
        return merged

    # ----------------------------------------------------------------- files
    def adapter_modules(self, adapter_name: str | None = None) -> dict[str, AdapterModule]:
        """The adapter's matrices as AdapterModule records (what save_adapter writes).

        Parameters
        ----------
        adapter_name : str, optional
            The adapter; the active one by default.

        Returns
        -------
        dict
            ``{module path: AdapterModule}``, each with ``lora_A`` (r, in_features) and ``lora_B``
            (out_features, r), or the embedding shapes (r, num_embeddings), (embedding_dim, r).
        """
        name = adapter_name or self.active_adapter
        if name is None:
            raise KeyError("the model has no adapter")
        config = self.peft_config[name]
        records = {}
        for path, layer in self.layers(name).items():
            params = dict(layer.named_parameters())
            a, b = (params["lora_A"], params["lora_B"]) if isinstance(layer, LoraLinear) else (
                params["lora_embedding_A"], params["lora_embedding_B"])
            records[path] = AdapterModule(
                path=path, kind="linear" if isinstance(layer, LoraLinear) else "embedding",
                lora_A=a, lora_B=b, r=layer.r, lora_alpha=config.alpha_for(path),
                scaling=layer.scaling)
        return records

    def save_adapter(self, directory: str | os.PathLike[str],
                     adapter_names: Sequence[str] | None = None) -> None:
        """Save adapters in PEFT's format: "default" in `directory`, others in ``directory/<name>/``.

        Each file is written to a temporary file and renamed, so an interrupted save leaves the
        previous adapter readable; every config is serialised before any file is written.
        ``target_modules="all-linear"`` is written as the list of modules it adapted, as PEFT does.

        Parameters
        ----------
        directory : str or PathLike
            Created if needed; ``PeftModel.from_pretrained(torch_model, directory)`` reads it.
        adapter_names : sequence of str, optional
            Which adapters to save; all by default.
        """
        names = list(adapter_names or self.adapter_names)
        for name in names:
            if name not in self.peft_config:
                raise KeyError(f"no adapter {name!r}; adapters: {self.adapter_names}")
        configs = {name: self._config_to_save(name) for name in names}
        for config in configs.values():  # every config that cannot be written fails before any file
            config.to_json_text()
        for name, config in configs.items():
            write_adapter(directory, config, self.adapter_modules(name), name)

    def _config_to_save(self, adapter_name: str) -> LoraConfig:
        """The adapter's config as PEFT saves it: "all-linear" expanded to the modules it took.

        PEFT resolves "all-linear" against the torch model and saves the list; a file that still
        says "all-linear" is resolved again by whoever loads it, and PEFT's idea of the output layer
        or of an embedding can differ from a dict of weights' (it would drop tensors silently).
        """
        config = self.peft_config[adapter_name]
        targets = config.target_modules
        if isinstance(targets, str) and targets.lower() == "all-linear":
            config = dataclasses.replace(config, target_modules=sorted(self.layers(adapter_name)))
        return config

    def load_adapter(self, directory: str | os.PathLike[str], adapter_name: str = DEFAULT_ADAPTER,
                     *, subfolder: str | None = None) -> None:
        """Load an adapter from `directory` under the name `adapter_name`.

        The files are read from ``directory/subfolder`` if given, else from
        ``directory/adapter_name`` when that holds an adapter (the layout save_adapter writes for
        several adapters), else from `directory` itself. Every tensor is checked
        against the base weights (shapes) and the config (ranks); modules the file has but the
        config does not target are an error, and modules the config targets but the file lacks a
        LoraWarning (as PEFT's missing keys: they get no adapter).

        Parameters
        ----------
        directory : str or PathLike
            An adapter folder written by PEFT's ``save_pretrained`` or by ``save_adapter``.
        adapter_name : str
            The name to give it in this model (must be new).
        subfolder : str, optional
            Read from ``directory/subfolder``.
        """
        folder = os.fspath(directory)
        if subfolder is not None:
            folder = os.path.join(folder, subfolder)
        else:
            nested = adapter_directory(folder, adapter_name)
            if (nested / CONFIG_NAME).is_file():
                folder = os.fspath(nested)
        config, modules = read_adapter(folder)
        self._add_loaded(adapter_name, config, modules)

    def _add_loaded(self, adapter_name: str, config: LoraConfig,
                    modules: Mapping[str, AdapterModule]) -> None:
        self._check_against_base(config, modules)
        kinds = {p: m.kind for p, m in modules.items()}
        self.add_adapter(adapter_name, config, kinds=kinds)
        self._file_kinds.update(kinds)
        for path, record in modules.items():
            layer = self._modules[path].layers[adapter_name]
            if isinstance(layer, LoraLinear):
                layer.lora_A, layer.lora_B = record.lora_A, record.lora_B
            else:
                layer.lora_embedding_A, layer.lora_embedding_B = record.lora_A, record.lora_B

    def _check_against_base(self, config: LoraConfig, modules: Mapping[str, AdapterModule]) -> None:
        check_adapter_modules(config, modules, self._module_paths(), self._is_embedding,
                              lambda key: self._shape(key) if key in self.base_weights else None)

    def __repr__(self) -> str:
        trainable, total = self.get_nb_trainable_parameters()
        state = ", merged=True" if self._merged() else ""
        if self._adapters_disabled:
            state += ", adapters_disabled=True"
        return (f"LoraModel(adapters={self.adapter_names}, active={self.active_adapter!r}, "
                f"modules={len(self.targets)}, trainable={trainable:,d}, total={total:,d}{state})")

    def _repr_html_(self) -> str:
        from .display import model_html

        return model_html(self)


def load_adapter(directory: str | os.PathLike[str], base_weights: Mapping[str, Any],
                 adapter_name: str = DEFAULT_ADAPTER, *, subfolder: str | None = None,
                 padding_idx: Mapping[str, int] | None = None) -> LoraModel:
    """Load a PEFT-format adapter onto `base_weights` and return the LoraModel.

    Parameters
    ----------
    directory : path
        Folder with adapter_config.json and adapter_model.safetensors (PEFT's save_pretrained).
    base_weights : Mapping[str, ndarray]
        Hugging Face-named base weights (a dict, or ``nplora.open_weights(path)``).
    adapter_name : str
        Name to give the adapter in the model.
    subfolder : str, optional
        Read from ``directory/subfolder`` (a non-default adapter saved beside others). Without
        it, ``directory/adapter_name`` is read when it holds an adapter, else `directory`.
    padding_idx : Mapping[str, int], optional
        ``{embedding module path: padding id}``, as for ``LoraModel``.

    Returns
    -------
    LoraModel
        The model, with this adapter active; ``model[path]`` are its layers.
    """
    folder = os.path.join(os.fspath(directory), subfolder) if subfolder else os.fspath(directory)
    if not subfolder and (adapter_directory(folder, adapter_name) / CONFIG_NAME).is_file():
        folder = os.fspath(adapter_directory(folder, adapter_name))  # as LoraModel.load_adapter
    config, modules = read_adapter(folder)
    model = LoraModel.__new__(LoraModel)
    model.base_weights = base_weights
    model.peft_config = {}
    model.active_adapter = None
    # By name, as LoraModel's default, so adapters added later find their embeddings; the file's
    # own modules are what its tensor names say (_file_kinds). (Setting this to the file's
    # embeddings made every other table a linear layer: an all-linear adapter nplora had saved
    # could not be loaded back, and a later add_adapter adapted embed_tokens as a linear layer.)
    model.embedding_modules = None
    model._file_kinds = {}
    model.padding_idx = model._checked_padding(padding_idx)
    model._modules = {}
    model._adapters_disabled = False
    model._add_loaded(adapter_name, config, modules)
    return model
