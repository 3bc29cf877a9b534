"""Hostile adapter files: every malformed input gets a clear nplora.AdapterError, nothing else.

The corpus is built here, in memory, from one valid adapter: truncated and bit-flipped safetensors,
headers claiming huge tensors or pointing outside the file, wrong dtypes, NaN/Inf values, config
JSON that is invalid, mistyped or out of range, keys naming modules the base model lacks, shapes
that disagree with it, and path tricks in adapter names. Each case is loaded four ways
(``read_adapter``, ``nplora.load_adapter``, ``LoraModel.load_adapter`` onto a model, and
``nplora merge``); each must raise the expected subclass of AdapterError, allocate little, write
nothing, and leave the base weights and the model as they were. ``test_corpus_size`` prints how
many cases there are.

Negative lora_alpha is valid in PEFT (it flips the update) and loads; it is checked as such.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_bytes

import nplora
from nplora import merge_cli
from nplora.adapters import (
    MAX_CONFIG_BYTES,
    AdapterError,
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNotFoundError,
    read_adapter,
)
from nplora.config import CONFIG_NAME
from nplora.safetensors_write import save_weights

WEIGHTS = "adapter_model.safetensors"
P = "base_model.model."
R, ALPHA = 2, 4
SHAPES = {"model.q_proj": (6, 5), "model.v_proj": (6, 5), "model.embed_tokens": (10, 4)}
MEMORY_LIMIT = 32 << 20  # bytes NumPy/Python may allocate while rejecting one small file


def base_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    weights = {f"{path}.weight": rng.standard_normal(shape).astype(np.float32)
               for path, shape in SHAPES.items()}
    weights["model.norm.weight"] = np.ones(5, np.float32)
    return weights


def good_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    f32 = np.float32
    return {
        f"{P}model.q_proj.lora_A.weight": rng.standard_normal((R, 5)).astype(f32),
        f"{P}model.q_proj.lora_B.weight": rng.standard_normal((6, R)).astype(f32),
        f"{P}model.v_proj.lora_A.weight": rng.standard_normal((R, 5)).astype(f32),
        f"{P}model.v_proj.lora_B.weight": rng.standard_normal((6, R)).astype(f32),
        f"{P}model.embed_tokens.lora_embedding_A": rng.standard_normal((R, 10)).astype(f32),
        f"{P}model.embed_tokens.lora_embedding_B": rng.standard_normal((4, R)).astype(f32),
    }


def good_config() -> dict:
    return {"r": R, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj", "embed_tokens"],
            "peft_type": "LORA", "lora_dropout": 0.0, "bias": "none"}


GOOD_FILE = safetensors_bytes(good_tensors(), metadata={"format": "pt"})
GOOD_CONFIG = json.dumps(good_config()).encode()


def raw_file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A hand-made safetensors file: 8-byte length, header bytes, data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def header_of(tensors: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """The header dict and data bytes safetensors would write (tensors in the given order)."""
    header, data, offset = {}, b"", 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        code = {"float32": "F32", "float64": "F64", "float16": "F16", "int32": "I32", "uint8": "U8",
                "bool": "BOOL", "complex64": "C64", "int64": "I64"}[array.dtype.name]
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    return header, data


# ----------------------------------------------------------------------------- the corpus
# A case: (id, files to write as {name: bytes or None to delete}, expected exception or None for
# "either a clear AdapterError or a valid adapter", load kwargs).
# Which loaders must reject a case. "file": all four (the file alone is wrong). "base": the three
# that see the base weights (read_adapter reads the adapter alone). "model": the two that build
# modules from the config (``nplora merge`` folds in the file's tensors, whatever target_modules
# says). "merge": only ``nplora merge``, which computes W + s B A (a loaded adapter whose product
# overflows is caught by ``safe_merge=True``, see test_reliability).
Case = tuple[str, dict[str, "bytes | HugeConfig | None"], "type[BaseException] | None", dict]
CASES: list[Case] = []
# (A targeted module missing from the file is a LoraWarning, as in PEFT: test_model.py.)
LEVEL = {"config-targets-nothing-in-file": "model", "finite-but-overflowing-product": "merge"}


def level(case_id: str, expected: type[BaseException] | None) -> str:
    return LEVEL.get(case_id, "base" if expected is AdapterMismatchError else "file")


class HugeConfig:
    """A config file of MAX_CONFIG_BYTES + 1 bytes of valid JSON, written in pieces when a test
    needs it (holding it in the corpus would keep 16 MB alive for the whole session)."""

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            f.write(b"{")
            for _ in range(MAX_CONFIG_BYTES >> 20):
                f.write(b" " * (1 << 20))
            f.write(b"}")


def case(name: str, expected: type[BaseException] | None, *, weights: bytes | None | str = "good",
         config: bytes | None | str | HugeConfig = "good", extra: dict[str, bytes] | None = None,
         **load: object) -> None:
    files: dict[str, bytes | None] = {WEIGHTS: GOOD_FILE if weights == "good" else weights,
                                      CONFIG_NAME: GOOD_CONFIG if config == "good" else config}
    files.update(extra or {})
    CASES.append((name, files, expected, load))


def tensors_case(name: str, expected: type[BaseException], tensors: dict[str, np.ndarray]) -> None:
    case(name, expected, weights=safetensors_bytes(tensors, metadata={"format": "pt"}))


def header_case(name: str, expected: type[BaseException], mutate: Callable[[dict], object],
                data_change: Callable[[bytes], bytes] = lambda d: d) -> None:
    header, data = header_of(good_tensors())
    mutate(header)
    case(name, expected, weights=raw_file(header, data_change(data)))


def config_case(name: str, expected: type[BaseException], **changes: object) -> None:
    config = good_config()
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    case(name, expected, config=json.dumps(config).encode())


DELETE = object()
A_KEY, B_KEY = f"{P}model.q_proj.lora_A.weight", f"{P}model.q_proj.lora_B.weight"
EA_KEY = f"{P}model.embed_tokens.lora_embedding_A"

# -- files missing or not files
case("no-weights-file", AdapterNotFoundError, weights=None)
case("no-config-file", AdapterNotFoundError, config=None)
case("pickled-weights-only", AdapterFormatError, weights=None,
     extra={"adapter_model.bin": b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR."})
case("no-directory", AdapterNotFoundError, subfolder="missing")

# -- truncated safetensors: at every few bytes of the header and at points in the data
for cut in sorted({0, 1, 4, 7, 8, 9, 16, 50, 100, *range(120, len(GOOD_FILE), 37), len(GOOD_FILE) - 1}):
    case(f"truncated-at-{cut}", AdapterFormatError, weights=GOOD_FILE[:cut])
case("trailing-garbage", AdapterFormatError, weights=GOOD_FILE + b"\0" * 13)

# -- the header's length field
for length, why in [(2**64 - 1, "max"), (2**63, "2^63"), (100_000_001, "over-limit"),
                    (99_999_999, "past-eof"), (len(GOOD_FILE), "whole-file"), (0, "zero"), (1, "one")]:
    case(f"header-length-{why}", AdapterFormatError, weights=struct.pack("<Q", length) + GOOD_FILE[8:])

# -- headers that are not JSON objects
for raw, why in [(b"", "empty"), (b"[]", "list"), (b'"x"', "string"), (b"null", "null"), (b"1", "number"),
                 (b"{", "unclosed"), (b"{'a': 1}", "single-quotes"), (b"\xff\xfe{}", "bad-utf8"),
                 (b'{"a": 1, "a": 2}', "duplicate-key"), (b"{}" + b"\0" * 6, "nul-padding"),
                 (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested-100k"),
                 (b'{"x": {"dtype": "F32", "shape": [' + b"1," * 50_000 + b'1], "data_offsets": [0, 4]}}',
                  "50k-dims"),
                 (b'{"__metadata__": {"format": 5}}', "metadata-not-str"),
                 (b'{"__metadata__": []}', "metadata-list")]:
    case(f"header-{why}", AdapterFormatError, weights=raw_file(raw, b"\0" * 4))

# -- entries claiming huge tensors, or bytes outside the data
huge = [(2**40, 2**40), (2**31, 2**31, 2**31), (10**6, 10**6), (2**62, 4)]
for shape in huge:
    nbytes = 4 * int(np.prod(shape, dtype=object))
    case(f"huge-shape-{'x'.join(map(str, shape))}", AdapterFormatError,
         weights=raw_file({A_KEY: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}}, b"\0" * 16))
case("huge-shape-consistent-offsets-past-eof", AdapterFormatError,
     weights=raw_file({A_KEY: {"dtype": "F64", "shape": [2**20, 2**20], "data_offsets": [0, 8 * 2**40]}}, b"\0" * 8))
case("zero-size-huge-rank", AdapterMismatchError,
     weights=raw_file({A_KEY: {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]},
                       B_KEY: {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}}))
case("zero-size-huge-rank-in-config", AdapterMismatchError,
     weights=raw_file({A_KEY: {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]},
                       B_KEY: {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}}),
     config=json.dumps({**good_config(), "target_modules": ["q_proj"], "r": 2**40}).encode())
case("huge-shape-zero-bytes", AdapterFormatError,
     weights=raw_file({A_KEY: {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]},
                       B_KEY: {"dtype": "F32", "shape": [6, 2**40], "data_offsets": [0, 0]}}))
for offsets, why in [([0, 10**18], "end-huge"), ([10**18, 10**18 + 40], "begin-huge"), ([40, 0], "reversed"),
                     ([-8, 32], "negative"), ([0.0, 40.0], "floats"), ([True, 40], "bool"), (["0", "40"], "strings"),
                     ([0], "one-number"), ([0, 40, 80], "three-numbers"), (None, "null"), ({"a": 0}, "object"),
                     ([2**64, 2**64 + 40], "beyond-u64")]:
    header_case(f"offsets-{why}", AdapterFormatError,
                lambda h, o=offsets: h[A_KEY].__setitem__("data_offsets", o))
header_case("offsets-overlap", AdapterFormatError,
            lambda h: h[B_KEY].__setitem__("data_offsets", [h[A_KEY]["data_offsets"][0],
                                                            h[A_KEY]["data_offsets"][0] + 48]))
header_case("offsets-gap", AdapterFormatError,
            lambda h: [e.__setitem__("data_offsets", [o + 4 for o in e["data_offsets"]]) for e in h.values()],
            lambda d: b"\0" * 4 + d)
header_case("offsets-shifted-past-end", AdapterFormatError,
            lambda h: [e.__setitem__("data_offsets", [o + 8 for o in e["data_offsets"]]) for e in h.values()])
for shape, why in [([2, -5], "negative-dim"), ([2, 5.0], "float-dim"), ([2, "5"], "string-dim"), ("2x5", "string"),
                   (None, "null"), ([2, True], "bool-dim"), ([10], "flat"), ([2, 2**64], "dim-over-u64")]:
    header_case(f"shape-{why}", AdapterFormatError, lambda h, s=shape: h[A_KEY].__setitem__("shape", s))
header_case("shape-transposed", AdapterMismatchError, lambda h: h[A_KEY].__setitem__("shape", [5, 2]))
for code in ["F33", "", None, 32, "f32", "float32", "Q8", "F128"]:
    header_case(f"dtype-code-{code!r}", AdapterFormatError, lambda h, c=code: h[A_KEY].__setitem__("dtype", c))
header_case("entry-not-object", AdapterFormatError, lambda h: h.__setitem__(A_KEY, [0, 40]))
header_case("entry-missing-dtype", AdapterFormatError, lambda h: h[A_KEY].pop("dtype"))

# -- well-formed files with wrong contents
for dtype in [np.int32, np.uint8, np.int64, np.bool_, np.complex64]:
    tensors = good_tensors()
    tensors[A_KEY] = np.ones((R, 5), dtype)
    tensors_case(f"dtype-{np.dtype(dtype).name}", AdapterFormatError, tensors)
for value in [np.nan, np.inf, -np.inf]:
    for key in (A_KEY, B_KEY, EA_KEY):
        for dtype in (np.float32, np.float16, np.float64):
            tensors = good_tensors()
            bad = tensors[key].astype(dtype)
            bad.flat[-1] = value
            tensors[key] = bad
            tensors_case(f"{value}-in-{key.split('.')[-2]}-{np.dtype(dtype).name}", AdapterFormatError, tensors)
tensors = good_tensors()
tensors[A_KEY] = tensors[A_KEY] * np.float32(1e38)
tensors[B_KEY] = tensors[B_KEY] * np.float32(1e38)
tensors_case("finite-but-overflowing-product", AdapterFormatError, tensors)  # only on merge
for ndim_shape, why in [((R * 5,), "1-d"), ((R, 5, 1), "3-d"), ((), "0-d")]:
    tensors = good_tensors()
    tensors[A_KEY] = np.ones(ndim_shape, np.float32)
    tensors_case(f"lora_A-{why}", AdapterFormatError, tensors)
for what, change in [
    ("missing-lora_B", lambda t: t.pop(B_KEY)),
    ("missing-embedding_A", lambda t: t.pop(EA_KEY)),
    ("no-prefix", lambda t: t.__setitem__("model.q_proj.lora_A.weight", t.pop(A_KEY))),
    ("unknown-suffix", lambda t: t.__setitem__(f"{P}model.q_proj.lora_C.weight", np.ones((2, 2), np.float32))),
    ("empty-module-path", lambda t: t.__setitem__(f"{P}.lora_A.weight", np.ones((2, 5), np.float32))),
    ("no-tensors", lambda t: t.clear()),
    ("linear-and-embedding-keys",
     lambda t: t.__setitem__(f"{P}model.q_proj.lora_embedding_A", np.ones((2, 6), np.float32))),
]:
    tensors = good_tensors()
    change(tensors)
    tensors_case(f"keys-{what}", AdapterFormatError, tensors)
for what, change in [
    ("module-not-in-base", lambda t: t.update({f"{P}model.nope.lora_A.weight": np.ones((R, 5), np.float32),
                                               f"{P}model.nope.lora_B.weight": np.ones((6, R), np.float32)})),
    ("module-path-traversal", lambda t: t.update({f"{P}../../etc/pw.lora_A.weight": np.ones((R, 5), np.float32),
                                                  f"{P}../../etc/pw.lora_B.weight": np.ones((6, R), np.float32)})),
    ("module-not-targeted", lambda t: t.update({f"{P}model.norm.lora_A.weight": np.ones((R, 5), np.float32),
                                                f"{P}model.norm.lora_B.weight": np.ones((6, R), np.float32)})),
    ("in-features-disagree", lambda t: t.__setitem__(A_KEY, np.ones((R, 7), np.float32))),
    ("out-features-disagree", lambda t: t.__setitem__(B_KEY, np.ones((9, R), np.float32))),
    ("rank-disagrees-with-config", lambda t: [t.__setitem__(A_KEY, np.ones((3, 5), np.float32)),
                                              t.__setitem__(B_KEY, np.ones((6, 3), np.float32))]),
    ("A-and-B-ranks-disagree", lambda t: t.__setitem__(B_KEY, np.ones((6, 3), np.float32))),
    ("embedding-table-disagrees", lambda t: t.__setitem__(EA_KEY, np.ones((R, 11), np.float32))),
    ("base-is-1-d", lambda t: t.update({f"{P}model.norm.lora_A.weight": np.ones((R, 5), np.float32),
                                        f"{P}model.norm.lora_B.weight": np.ones((1, R), np.float32)})),
]:
    tensors = good_tensors()
    change(tensors)
    tensors_case(f"mismatch-{what}", AdapterMismatchError, tensors)

# -- config JSON: not JSON, not an object, wrong types, out of range
for raw, why in [(b"", "empty"), (b"{", "truncated"), (b"\x00\x01\x02", "binary"), (b"[]", "list"),
                 (b'"LORA"', "string"), (b"null", "null"), (b"8", "number"), (b"\xef\xbb\xbf{}x", "bom-garbage"),
                 (b'{"r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested-100k"),
                 (b'{"r": 1' + b"0" * 5000 + b"}", "5000-digit-int"),
                 (b'{"r": 16, ' + GOOD_CONFIG[1:], "duplicate-key"),
                 (GOOD_CONFIG[: len(GOOD_CONFIG) // 2], "half")]:
    case(f"config-{why}", AdapterFormatError, config=raw)
for field, values in {
    "r": [0, -1, -(2**63), 10**9, 10**40, 2.5, "8", True, None, [8], 1e308],
    "lora_alpha": ["8", None, [], {}, float("nan"), float("inf"), -float("inf"), True],
    "lora_dropout": [1.0, -0.5, "0.1", 2, float("nan")],
    "target_modules": [5, [1, 2], {"q_proj": 1}, "(", "[", "(?P<x", [None]],
    "exclude_modules": ["(", 3, [4]],
    "fan_in_fan_out": ["yes", 1, None],
    "use_rslora": ["true", 0],
    "init_lora_weights": ["nope", 3, None],
    "layers_to_transform": [-1, "0", [0, "1"], [0.5], {"a": 1}],
    "rank_pattern": [{"q_proj": 0}, {"q_proj": "x"}, {"(": 2}, [1], "q", {"q_proj": 10**9}],
    "alpha_pattern": [{"q_proj": "x"}, {"q_proj": float("nan")}, {")": 1}, 5],
    "peft_type": ["PREFIX_TUNING", None, 5],
    "task_type": ["EVIL", 5],
    "bias": ["sometimes", 5],
}.items():
    for value in values:
        expected: type[BaseException] = AdapterFormatError
        if field in ("r",) and isinstance(value, int) and not isinstance(value, bool) and value > R:
            expected = AdapterMismatchError  # a valid config whose rank the tensors do not have
        if field == "rank_pattern" and value == {"q_proj": 10**9}:
            expected = AdapterMismatchError
        config_case(f"config-{field}={value!r}"[:80], expected, **{field: value})
config_case("config-layers_pattern-bad-regex", AdapterFormatError, layers_pattern="(", layers_to_transform=[0])
config_case("config-layers_pattern-without-layers", AdapterFormatError, layers_pattern="layers")
config_case("config-missing-target_modules", AdapterFormatError, target_modules=DELETE)
config_case("config-targets-nothing-in-file", AdapterMismatchError, target_modules=["o_proj"])
config_case("config-fan_in_fan_out-shapes", AdapterMismatchError, fan_in_fan_out=True)
case("config-huge-file", AdapterFormatError, config=HugeConfig())

# -- path tricks in adapter names (the name becomes a folder name)
for name in ["..", "../evil", "../../etc", "a/b", "/abs", "a\\b", "", ".", ".hidden", "a\0b", "~", "a" * 300,
             "x/../..", "C:evil", "default/..", "\n", "é"]:
    case(f"adapter-name-{name[:20]!r}", AdapterError, adapter_name=name)
for subfolder in ["../outside", "missing/../../.."]:
    case(f"subfolder-{subfolder!r}", AdapterNotFoundError, subfolder=subfolder)

HOSTILE = len(CASES)

# -- bit flips anywhere in the file: a flip in the data may give other valid, finite values
# (safetensors has no checksum), so the rule is "a clear AdapterError, or a valid adapter".
_flips = np.random.default_rng(5)
for k in range(160):
    position = int(_flips.integers(0, len(GOOD_FILE)))
    bit = int(_flips.integers(0, 8))
    flipped = bytearray(GOOD_FILE)
    flipped[position] ^= 1 << bit
    case(f"bitflip-{k}-byte{position}-bit{bit}", None, weights=bytes(flipped))
for k in range(40):
    position = int(_flips.integers(0, len(GOOD_CONFIG)))
    flipped = bytearray(GOOD_CONFIG)
    flipped[position] ^= 1 << int(_flips.integers(0, 8))
    case(f"config-bitflip-{k}-byte{position}", None, config=bytes(flipped))


# ----------------------------------------------------------------------------- the checks
def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root, with a hash of each file's bytes."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root) + "/"] = ""
        for f in files:
            path = os.path.join(folder, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def write_case(folder: Path, files: dict[str, bytes | None]) -> None:
    folder.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, HugeConfig):
            content.write(folder / name)
        elif content is not None:
            (folder / name).write_bytes(content)


def check_valid(config: nplora.LoraConfig, modules: dict) -> None:
    """What a flipped file that still loads must be: finite, of the right shapes."""
    for module in modules.values():
        assert np.isfinite(module.lora_A).all() and np.isfinite(module.lora_B).all()
        assert module.base_shape() == SHAPES[module.path] or module.kind == "linear" and \
            module.base_shape(True) == SHAPES[module.path]


def expect(expected: type[BaseException] | None, call: Callable[[], object]) -> object:
    """Run a loader under tracemalloc; it must raise `expected` (an AdapterError), or, with None,
    either raise an AdapterError or succeed. Returns the result (None after an error)."""
    tracemalloc.start()
    try:
        if expected is None:
            try:
                return call()
            except AdapterError:
                return None
        with pytest.raises(expected) as info:
            call()
        assert isinstance(info.value, AdapterError), repr(info.value)
        assert str(info.value)
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MEMORY_LIMIT, f"{peak} bytes allocated"


@pytest.fixture(scope="module")
def model() -> nplora.LoraModel:
    weights = base_weights()
    config = nplora.LoraConfig(r=3, target_modules=["q_proj"])
    return nplora.LoraModel(weights, config, "resident", seed=0)


@pytest.mark.parametrize("case_id,files,expected,load", CASES, ids=[c[0] for c in CASES])
def test_hostile_adapter(tmp_path: Path, model: nplora.LoraModel, case_id: str, files: dict,
                         expected: type[BaseException] | None, load: dict) -> None:
    folder = tmp_path / "adapter"
    write_case(folder, files)
    weights = base_weights()
    pristine = {k: v.copy() for k, v in weights.items()}
    save_weights(tmp_path / "base.safetensors", pristine)
    before = snapshot(tmp_path)
    must = {"file": {"read", "load", "model", "merge"}, "base": {"load", "model", "merge"},
            "model": {"load", "model"}, "merge": {"merge"}}[level(case_id, expected)]
    model_state = (model.adapter_names, model.active_adapter, list(model._modules))
    x = np.ones((2, 5), np.float32)
    y = model["model.q_proj"](x)
    subfolder, adapter_name = load.get("subfolder"), load.get("adapter_name")
    where = folder / subfolder if subfolder else folder
    out = tmp_path / "out.safetensors"
    calls = {
        "read": lambda: read_adapter(folder, adapter_name) if adapter_name is not None else read_adapter(where),
        "load": lambda: nplora.load_adapter(folder, weights, subfolder=subfolder) if adapter_name is None
        else nplora.LoraModel(weights, nplora.LoraConfig(target_modules=["q_proj"])).load_adapter(
            folder, adapter_name),
        "model": lambda: model.load_adapter(folder, "hostile" if adapter_name is None else adapter_name,
                                            subfolder=subfolder),
        "merge": lambda: merge_cli.merge(tmp_path / "base.safetensors", folder if adapter_name else where, out,
                                         adapter_name=adapter_name, progress=False),
    }
    for name, call in calls.items():
        result = expect(expected if name in must else None, call)
        if name == "read" and result is not None and expected is None:
            check_valid(*result)
        if name == "model" and "hostile" in model.adapter_names:  # a flipped file, still valid
            model.delete_adapter("hostile")
        if name == "merge" and out.exists():
            out.unlink()
    # Nothing written or changed: files, base weights, the model's adapters and its outputs.
    assert snapshot(tmp_path) == before
    for key, value in pristine.items():
        assert np.array_equal(weights[key], value), key
    assert (model.adapter_names, model.active_adapter, list(model._modules)) == model_state
    assert np.array_equal(model["model.q_proj"](x), y)


def test_the_valid_adapter_loads(tmp_path: Path) -> None:
    write_case(tmp_path / "a", {WEIGHTS: GOOD_FILE, CONFIG_NAME: GOOD_CONFIG})
    model = nplora.load_adapter(tmp_path / "a", base_weights())
    assert sorted(model.targets) == sorted(SHAPES)
    assert np.array_equal(model["model.q_proj"].lora_A, good_tensors()[A_KEY])


def test_negative_alpha_is_valid_as_in_peft(tmp_path: Path) -> None:
    config = good_config()
    config["lora_alpha"] = -4
    write_case(tmp_path / "a", {WEIGHTS: GOOD_FILE, CONFIG_NAME: json.dumps(config).encode()})
    model = nplora.load_adapter(tmp_path / "a", base_weights())
    assert model["model.q_proj"].scaling == -2.0


def test_corpus_size(capsys: pytest.CaptureFixture[str]) -> None:
    flips = len(CASES) - HOSTILE
    assert HOSTILE >= 250 and flips == 200
    with capsys.disabled():
        print(f"\nhostile adapter corpus: {HOSTILE} malformed cases + {flips} bit flips = {len(CASES)} "
              "cases, each loaded 4 ways")
