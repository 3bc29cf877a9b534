"""Which modules of a model get an adapter: PEFT's matching rules over Hugging Face module names,
and the check that an adapter file fits the base weights it is loaded onto."""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence

from ._layer import LoraWarning
from .adapters import AdapterMismatchError, AdapterModule
from .config import LoraConfig

# A module whose last name component is one of these is an embedding table (E[ids]), not a linear
# layer; pass ``embedding_modules=`` to say otherwise. lm_head is a linear layer, as in PEFT.
EMBEDDING_NAMES = frozenset({
    "embed_tokens", "embed_positions", "embed_in", "wte", "wpe", "word_embeddings",
    "position_embeddings", "token_type_embeddings", "tok_embeddings", "shared", "embeddings",
    "relative_attention_bias",  # T5's per-bucket attention bias, an nn.Embedding
    "token_embedding", "position_embedding",  # CLIP's text and vision towers
    "rel_embeddings",  # DeBERTa-v2's relative positions
    "word_embedding",  # XLNet
})


# What "all-linear" leaves out: the output layer, as PEFT does (it asks the model for
# get_output_embeddings(); a dict of weights cannot be asked, so these are the names that method
# returns across Hugging Face's architectures, matched as a whole path or its tail).
OUTPUT_LAYER_NAMES = (
    "lm_head",  # most causal and seq2seq LMs
    "embed_out",  # GPT-NeoX, Pythia
    "cls.predictions.decoder",  # BERT-style masked LMs
    "lm_head.decoder",  # RoBERTa-style masked LMs (lm_head.dense stays a target)
    "generator_lm_head",  # ELECTRA
    "vocab_projector",  # DistilBERT
    "predictions.decoder",  # ALBERT
    "lm_loss",  # XLNet
    "pred_layer.proj",  # XLM
)


def missing_weight_hint(path: str) -> str:
    """A hint for an adapted module whose weight the base lacks: an output layer tied to the
    input embeddings is stored once, under the embedding's name."""
    if not _is_output_layer(path):
        return ""
    return (" (tied to the input embeddings? a model with tie_word_embeddings stores that weight "
            "once, under the embedding's name, and nplora does not merge into tied weights: "
            "untie it first, giving the model its own lm_head.weight, or merge with PEFT)")


def _is_output_layer(name: str) -> bool:
    return any(name == tail or name.endswith("." + tail) for tail in OUTPUT_LAYER_NAMES)


def _layer_index(config: LoraConfig, name: str) -> int | None:
    """The layer number PEFT reads from a module name for layers_to_transform."""
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _excluded(config: LoraConfig, name: str) -> bool:
    """Whether exclude_modules leaves module `name` out (PEFT checks it before the targets)."""
    exclude = config.exclude_modules
    if exclude is None:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return name in exclude or any(name.endswith("." + e) for e in exclude)


def is_target(config: LoraConfig, name: str, is_embedding: bool = False) -> bool:
    """PEFT's rule (``check_target_module_exists``) for whether module `name` gets an adapter.

    A list of target_modules matches a name equal to an entry or ending in ``"." + entry``; a string
    is a regex that must match the whole name; ``"all-linear"`` takes every linear module but
    the output layer (OUTPUT_LAYER_NAMES). exclude_modules wins; layers_to_transform/layers_pattern filter suffix matches.
    """
    if _excluded(config, name):
        return False
    targets = config.target_modules
    if targets is None:
        raise ValueError("target_modules must be set: nplora has no per-architecture defaults")
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return not is_embedding and not _is_output_layer(name)
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    index = _layer_index(config, name)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def _first_frame_outside_package() -> int:
    """The warnings stacklevel of the user's line: the first caller outside nplora (the path to
    here differs between LoraModel(...) and add_adapter(...))."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package:
        frame, level = frame.f_back, level + 1
    return level


def match_targets(config: LoraConfig, paths: Sequence[str], is_embedding: Callable[[str], bool]
                  ) -> list[str]:
    """The module paths `config` targets, in order; ValueError if none.

    A target_modules entry, or a rank_pattern/alpha_pattern key, that matches no module is a
    LoraWarning (a typo in a name would otherwise just train nothing there).
    """
    matched = [p for p in paths if is_target(config, p, is_embedding(p))]
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() != "all-linear":
        # PEFT fullmatches the regex against every module, containers too, and refuses a match it
        # cannot adapt ("Target module LlamaAttention(...) is not supported"): refused here as
        # well, rather than adapting the leaves into a file PEFT will not load.
        leaves = set(paths)
        for container in sorted({p.rsplit(".", k)[0] for p in paths for k in range(1, p.count(".") + 1)}
                                - leaves):
            if re.fullmatch(targets, container) and not _excluded(config, container):
                raise ValueError(
                    f"target_modules={targets!r} also matches {container!r}, which holds other "
                    "modules: PEFT refuses such a pattern (match the layers only, e.g. end it "
                    "in a module name such as '(q|v)_proj')")
    if not matched:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched none of the "
            f"{len(paths)} modules (e.g. {list(paths[:3])})")
    level = _first_frame_outside_package()
    if isinstance(targets, list):
        for target in targets:
            if not any(p == target or p.endswith("." + target) for p in matched):
                named = sum(p == target or p.endswith("." + target) for p in paths)
                why = (f"its {named} module(s) are all left out by exclude_modules or "
                       "layers_to_transform" if named else "it matched no module")
                warnings.warn(f"target module {target!r} adapts nothing: {why}", LoraWarning,
                              stacklevel=level)
    for field_name, keys in config.unmatched_pattern_keys(matched).items():
        for key in keys:
            warnings.warn(f"{field_name} key {key!r} matched no targeted module", LoraWarning,
                          stacklevel=level)
    return matched


def check_adapter_modules(config: LoraConfig, modules: Mapping[str, AdapterModule],
                          paths: Sequence[str], is_embedding: Callable[[str], bool],
                          shape_of: Callable[[str], tuple[int, ...] | None]) -> None:
    """AdapterMismatchError unless the adapter's `modules` are among the ones `config` targets
    in the base model's module `paths`, each with the base weight shape its matrices need
    (targeted modules the file lacks are a LoraWarning, as PEFT's missing keys).

    ``shape_of(key)`` is the shape of base weight `key`, None when there is no such weight.
    """
    for path, record in modules.items():
        key = path + ".weight"
        actual = shape_of(key)
        if actual is None:
            raise AdapterMismatchError(f"the adapter has module {path!r}, but the base weights "
                                       f"have no {key!r}" + missing_weight_hint(path))
        expected = record.base_shape(config.fan_in_fan_out and record.kind == "linear")
        if actual != expected:
            raise AdapterMismatchError(
                f"{key} has shape {actual}, but the adapter's lora_A {record.lora_A.shape} and "
                f"lora_B {record.lora_B.shape} need {expected}"
                + record.orientation_hint(actual, config.fan_in_fan_out))
    kinds = {p: m.kind for p, m in modules.items()}
    targeted = {p for p in paths
                if is_target(config, p, kinds[p] == "embedding" if p in kinds else is_embedding(p))}
    missing, extra = sorted(targeted - set(modules)), sorted(set(modules) - targeted)
    if missing:
        # A base checkpoint with more modules than the model the adapter was trained on (BERT's
        # pooler beside a masked-LM adapter): PEFT loads it and warns of the missing keys.
        warnings.warn(
            f"the config targets {len(missing)} module(s) the adapter file has no tensors for, "
            f"e.g. {missing[:3]}: they get no adapter (is the base a larger model than the one "
            "the adapter was trained on?)", LoraWarning, stacklevel=_first_frame_outside_package())
    if extra:
        raise AdapterMismatchError(
            f"the adapter file has tensors for {len(extra)} module(s) its config does not "
            f"target, e.g. {extra[:3]}")
