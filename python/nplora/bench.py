"""`nplora bench`: every kernel timed against the NumPy code a user would otherwise write.

NumPy and nplora run in one process on the same arrays with the same number of threads, alternating
sample by sample after a warm-up; medians are reported, and the ratio NumPy / nplora (> 1: nplora is
faster) is held against the targets of PERFORMANCE.md. Each row first checks that both sides agree;
a mismatch marks the row FAILED and makes the command exit non-zero. With torch and peft installed,
PyTorch running PEFT's LoRA ``Linear`` is timed too, right after each pair.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO, cast

import numpy as np

from . import _core
from .embedding import LoraEmbedding
from .linear import LoraLinear, swap_adapters
from .runtime import blas_info, get_num_threads, set_num_threads

BATCHES, FLOAT64_BATCHES, LARGE_BATCH = (1, 2, 8, 32, 512), (8, 512), 512
VOCAB, EMBEDDING_IDS, MIXED_ADAPTERS = 32_000, 2048, 64
DEFAULT_SIZE, QUICK_SIZE = 4096, 1024
DEFAULT_RANK = 16
DEFAULT_REPEATS, QUICK_REPEATS = 7, 3
# A sample repeats a kernel until it lasts this long, so that millisecond kernels are not timer noise.
MIN_SAMPLE_S, QUICK_MIN_SAMPLE_S = 0.05, 0.005
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}  # of the reference's max |value|
LIMIT_SHARE = 0.9  # PERFORMANCE.md: 90% of NumPy's GEMM GFLOP/s, or of its GEMV GB/s


def forward_target(batch: int, dtype: np.dtype) -> float:
    """PERFORMANCE.md's minimum NumPy/nplora ratio for an unmerged forward."""
    if dtype == np.float64:
        return 1.0
    return 1.0 if batch == 1 else 2.0 if batch < LARGE_BATCH else 1.05


@dataclass
class Side:
    """One contender. `run` is timed; `setup` runs untimed before every call; `value` maps what
    `run` returned to the arrays checked against NumPy's (default: the return value itself)."""

    run: Callable[[], Any]
    setup: Callable[[], None] | None = None
    value: Callable[[Any], Any] | None = None

    def call(self) -> float:
        if self.setup is not None:
            self.setup()
        start = time.perf_counter()
        self.run()
        return time.perf_counter() - start

    def result(self) -> list[np.ndarray]:
        if self.setup is not None:
            self.setup()
        out = self.run()
        out = self.value(out) if self.value is not None else out
        out = out if isinstance(out, (tuple, list)) else [out]
        return [np.asarray(o.detach().numpy() if hasattr(o, "detach") else o) for o in out]


@dataclass
class Case:
    """A row to measure: NumPy's side, nplora's (None for a limit row), PyTorch's, the work done."""

    id: str
    kernel: str
    shape: str
    dtype: np.dtype
    numpy: Side
    nplora: Side | None = None
    torch: Side | None = None
    flops: float = 0.0
    bytes: float = 0.0
    unit: str = "GFLOP/s"  # the rate shown: flops / time or bytes / time
    target: float | None = None
    limit: str | None = None  # "gemm" or "gemv": the limit row this row's rate is held against
    note: str = ""


@dataclass
class Row:
    """A measured row, as printed and as written to JSON."""

    id: str
    kernel: str
    shape: str
    dtype: str
    numpy_ms: float
    nplora_ms: float | None
    ratio: float | None
    unit: str
    numpy_rate: float | None
    nplora_rate: float | None
    target: float | None
    target_met: bool | None
    check: str  # "ok", "FAILED", or "n/a" for the limit rows
    max_rel_error: float | None
    calls_per_sample: dict[str, int]
    torch_ms: float | None = None
    torch_ratio: float | None = None  # torch ms / nplora ms
    torch_check: str | None = None
    limit: str | None = None
    limit_share: float | None = None
    note: str = ""
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    others_cpu_share: float | None = None  # CPU time other processes took while this row ran


def relative_error(result: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """max |a - b| / max |b|, the worst over the arrays of a result (inf if a shape differs)."""
    if len(result) != len(reference):
        return math.inf
    worst = 0.0
    for a, b in zip(result, reference):
        if a.shape != b.shape:
            return math.inf
        scale = float(np.abs(b).max()) or 1.0
        error = float(np.abs(a.astype(np.float64) - b).max()) / scale
        worst = max(worst, error if not math.isnan(error) else math.inf)
    return worst


def measure(case: Case, repeats: int, min_sample: float) -> Row:
    """Check the sides against NumPy, then time them; medians of per-call times."""
    sides = {name: side for name, side in
             (("numpy", case.numpy), ("nplora", case.nplora), ("torch", case.torch)) if side}
    rtol = RTOL[np.dtype(case.dtype)]
    reference = case.numpy.result()
    errors = {name: relative_error(side.result(), reference)
              for name, side in sides.items() if name != "numpy"}
    del reference
    numbers: dict[str, int] = {}
    samples: dict[str, list[float]] = {name: [] for name in sides}
    # NumPy and nplora alternate; PyTorch runs after them, so that its OpenMP threads, spinning
    # after each call, do not take cores from the pair being compared.
    for wanted in (("numpy", "nplora"), ("torch",)):
        group = tuple(name for name in wanted if name in sides)
        for name in group:  # warm-up, which also sizes the samples
            once = min(sides[name].call(), sides[name].call())
            numbers[name] = max(1, min(1000, math.ceil(min_sample / max(once, 1e-9))))
        for _ in range(repeats if group else 0):
            for name in group:
                samples[name].append(sum(sides[name].call() for _ in range(numbers[name]))
                                     / numbers[name])
    ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}

    def rate(milliseconds: float | None) -> float | None:
        work = case.flops if case.unit == "GFLOP/s" else case.bytes
        return work / (milliseconds * 1e-3) / 1e9 if milliseconds and work else None

    def verdict(name: str) -> str | None:
        return None if name not in errors else "ok" if errors[name] <= rtol else "FAILED"

    nplora_ms, torch_ms = ms.get("nplora"), ms.get("torch")
    ratio = ms["numpy"] / nplora_ms if nplora_ms else None
    check = verdict("nplora") or "n/a"
    error = errors.get("nplora")
    return Row(
        id=case.id, kernel=case.kernel, shape=case.shape, dtype=str(np.dtype(case.dtype)),
        numpy_ms=ms["numpy"], nplora_ms=nplora_ms, ratio=ratio, unit=case.unit,
        numpy_rate=rate(ms["numpy"]), nplora_rate=rate(nplora_ms), target=case.target,
        target_met=None if case.target is None or ratio is None else (
            check == "ok" and ratio >= case.target),
        check=check, max_rel_error=error if error is None or math.isfinite(error) else None,
        calls_per_sample=numbers, torch_ms=torch_ms,
        torch_ratio=torch_ms / nplora_ms if torch_ms and nplora_ms else None,
        torch_check=verdict("torch"), limit=case.limit, note=case.note,
        samples_ms={name: [1e3 * v for v in values] for name, values in samples.items()})


# ------------------------------------------------------------------------- the rows
def random_matrix(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any,
                  scale: float = 1.0) -> np.ndarray:
    out = rng.standard_normal(shape, dtype=np.float32)
    if scale != 1.0:
        out *= scale
    return out.astype(dtype, copy=False)


def random_lora(rng: np.random.Generator, size: int, r: int, dtype: Any,
                ) -> tuple[np.ndarray, np.ndarray]:
    """A (r, size) and B (size, r), scaled so that the LoRA branch is as large as the base
    product: the correctness check then sees a wrong branch."""
    return (random_matrix(rng, (r, size), dtype, 1 / math.sqrt(size)),
            random_matrix(rng, (size, r), dtype, 1 / math.sqrt(r)))


def make_layer(weight: np.ndarray, a: np.ndarray, b: np.ndarray, r: int) -> LoraLinear:
    layer = LoraLinear(weight, r=r, lora_alpha=2 * r, seed=0)  # shares `weight`, not a copy
    layer.lora_A, layer.lora_B = a, b
    return layer


def forward_cases(rng: np.random.Generator, size: int, r: int, torch_peft: TorchPeft | None,
                  ) -> Iterator[Case]:
    yield from forward_cases_of(np.dtype(np.float32), BATCHES, rng, size, r, torch_peft)
    yield from forward_cases_of(np.dtype(np.float64), FLOAT64_BATCHES, rng, size, r, torch_peft)


def forward_cases_of(dtype: np.dtype, batches: tuple[int, ...], rng: np.random.Generator, size: int,
                     r: int, torch_peft: TorchPeft | None) -> Iterator[Case]:
    name = "f32" if dtype == np.float32 else "f64"
    weight = random_matrix(rng, (size, size), dtype, 1 / math.sqrt(size))
    a, b = random_lora(rng, size, r, dtype)
    layer = make_layer(weight, a, b, r).eval()
    s = layer.scaling
    peft = torch_peft.linear(weight, a, b, r).eval() if torch_peft else None
    for batch in batches:
        x = random_matrix(rng, (batch, size), dtype)
        out, np_out = np.empty((batch, size), dtype), np.empty((batch, size), dtype)

        def numpy_forward() -> np.ndarray:
            # x @ W.T + s * ((x @ A.T) @ B.T); nplora writes into a preallocated out=, so NumPy
            # writes into one too
            np.matmul(x, weight.T, out=np_out)
            np.add(np_out, s * ((x @ a.T) @ b.T), out=np_out)
            return np_out

        yield Case(
            id=f"forward_{name}_b{batch}", kernel=f"forward {name}",
            shape=f"b={batch}, {size}x{size}, r={r}", dtype=dtype,
            numpy=Side(numpy_forward), nplora=Side(lambda: layer(x, out=out)),
            torch=torch_peft.forward(peft, x) if torch_peft else None,
            flops=2.0 * batch * size * size + 4.0 * batch * r * size, bytes=float(weight.nbytes),
            unit="GB/s" if batch < LARGE_BATCH else "GFLOP/s", target=forward_target(batch, dtype),
            limit=None if name != "f32" else "gemv" if batch < LARGE_BATCH else "gemm")


def backward_case(rng: np.random.Generator, size: int, r: int, torch_peft: TorchPeft | None,
                  ) -> Case:
    weight = random_matrix(rng, (size, size), np.float32, 1 / math.sqrt(size))
    a, b = random_lora(rng, size, r, np.float32)
    layer = make_layer(weight, a, b, r).train()
    s, n = layer.scaling, LARGE_BATCH
    x = random_matrix(rng, (n, size), np.float32)
    g = random_matrix(rng, (n, size), np.float32)
    layer(x)  # the training-mode forward backward() needs; not timed (nor is PyTorch's)

    def numpy_backward() -> tuple[np.ndarray, ...]:
        # x @ A.T is computed here although nplora's forward stored it: a NumPy user's forward
        # would have had to keep it by hand. It is 2*b*in*r flops, 0.4% of this row's work.
        gb = g @ b
        grad_b = s * g.T @ (x @ a.T)
        grad_a = s * gb.T @ x
        grad_x = g @ weight + s * gb @ a
        return grad_x, grad_a, grad_b

    return Case(
        id="backward_f32_b512", kernel="backward f32 (dX,dA,dB)", shape=f"b={n}, {size}x{size}, r={r}",
        dtype=np.dtype(np.float32), numpy=Side(numpy_backward),
        nplora=Side(lambda: layer.backward(g), setup=layer.zero_grad,
                    value=lambda grad_x: (grad_x, layer.lora_A_grad.copy(), layer.lora_B_grad.copy())),
        torch=torch_peft.backward(torch_peft.linear(weight, a, b, r), x, g) if torch_peft else None,
        flops=2.0 * n * size * size + 10.0 * n * r * size, target=1.1,
        note="forward not timed; NumPy computes x@A.T, nplora reuses its forward's")


def merge_cases(rng: np.random.Generator, size: int, r: int) -> Iterator[Case]:
    weight = random_matrix(rng, (size, size), np.float32, 1 / math.sqrt(size))
    np_weight = np.empty_like(weight)  # NumPy's side works on a copy, to be checked against nplora's
    a, b = random_lora(rng, size, r, np.float32)
    a2, b2 = random_lora(rng, size, r, np.float32)
    layer, other = make_layer(weight, a, b, r).eval(), make_layer(weight, a2, b2, r).eval()
    s = layer.scaling
    common: dict[str, Any] = dict(shape=f"{size}x{size}, r={r}", dtype=np.dtype(np.float32),
                                  unit="GB/s", target=3.0)
    traffic = 2.0 * weight.nbytes  # W read and written once

    def state(merged: LoraLinear | None) -> Callable[[], None]:
        """A setup leaving `merged` (or no adapter) merged into the shared weight."""
        def setup() -> None:
            for adapter in (layer, other):
                if adapter.merged and adapter is not merged:
                    adapter.unmerge()
            if merged is not None and not merged.merged:
                merged.merge()
        return setup

    # Repeated NumPy calls move W by one delta each time: the values drift, the time does not.
    state(None)()
    np_weight[...] = weight
    yield Case(id="merge", kernel="merge W += s*B@A", bytes=traffic, note="GB/s: W read + written",
               numpy=Side(lambda: np_weight.__iadd__(s * (b @ a))),
               nplora=Side(layer.merge, setup=state(None), value=lambda _: weight), **common)
    state(layer)()
    np_weight[...] = weight
    yield Case(id="unmerge", kernel="unmerge W -= s*B@A", bytes=traffic,
               numpy=Side(lambda: np_weight.__isub__(s * (b @ a))),
               nplora=Side(layer.unmerge, setup=state(layer), value=lambda _: weight), **common)

    # Swapping adapter 1 for adapter 2 over one weight: nplora.swap_adapters, one pass over W.
    def swap() -> None:
        swap_adapters(layer, other)

    state(layer)()
    np_weight[...] = weight
    yield Case(id="swap", kernel="swap adapters (one pass)",
               bytes=traffic, note="NumPy: W += s*B2@A2 - s*B1@A1",
               numpy=Side(lambda: np_weight.__iadd__(s * (b2 @ a2) - s * (b @ a))),
               nplora=Side(swap, setup=state(layer), value=lambda _: weight), **common)
    state(None)()


def mixed_cases(rng: np.random.Generator, size: int, r: int) -> Iterator[Case]:
    from .config import LoraConfig
    from .model import LoraModel

    n = MIXED_ADAPTERS
    weight = random_matrix(rng, (size, size), np.float32, 1 / math.sqrt(size))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"])
    model = LoraModel({"proj.weight": weight}, config, "a0", seed=0)
    stacked_a, stacked_b = np.empty((n, r, size), np.float32), np.empty((n, size, r), np.float32)
    for k in range(n):
        if k:
            model.add_adapter(f"a{k}", config, seed=k)
        stacked_a[k], stacked_b[k] = random_lora(rng, size, r, np.float32)
        layer = cast(LoraLinear, model.layers(f"a{k}")["proj"])
        layer.lora_A, layer.lora_B = stacked_a[k], stacked_b[k]
    model.eval()
    s = layer.scaling
    ids = rng.permutation(n)  # one adapter per row
    x = random_matrix(rng, (n, size), np.float32)

    def numpy_per_adapter() -> np.ndarray:
        # What a NumPy user with one layer per adapter writes: each adapter's rows go through
        # its own layer, base product included (the target row of PERFORMANCE.md).
        y = np.empty((n, size), np.float32)
        for k in range(n):
            rows = ids == k
            y[rows] = x[rows] @ weight.T + s * (x[rows] @ stacked_a[k].T) @ stacked_b[k].T
        return y

    def numpy_shared_base() -> np.ndarray:
        # A NumPy user who knows the punica trick: the base product once, then the LoRA terms.
        y = x @ weight.T
        for k in range(n):
            rows = ids == k
            y[rows] += s * (x[rows] @ stacked_a[k].T) @ stacked_b[k].T
        return y

    common: dict[str, Any] = dict(shape=f"b={n}, {size}x{size}, r={r}", dtype=np.dtype(np.float32),
                  nplora=Side(lambda: model.forward("proj", x, adapter_ids=ids)),
                  flops=2.0 * n * size * size + 4.0 * n * r * size, bytes=float(weight.nbytes),
                  unit="GB/s")
    yield Case(id="mixed_64", kernel=f"mixed batch, {n} adapters", numpy=Side(numpy_per_adapter),
               target=10.0, note="NumPy: a loop over per-adapter layers with fancy indexing",
               **common)
    yield Case(id="mixed_64_shared", kernel=f"mixed batch, {n} adapters, NumPy base once",
               numpy=Side(numpy_shared_base), target=1.0,
               note="NumPy: x @ W.T once, then a loop over adapters with fancy indexing", **common)


def embedding_case(rng: np.random.Generator, vocab: int, size: int, r: int) -> Case:
    table = random_matrix(rng, (vocab, size), np.float32)
    emb = LoraEmbedding(table, r=r, lora_alpha=2 * r, seed=0).eval()
    a = random_matrix(rng, (r, vocab), np.float32)
    b = random_matrix(rng, (size, r), np.float32, 1 / math.sqrt(r))
    emb.lora_embedding_A, emb.lora_embedding_B = a, b
    s = emb.scaling
    ids = rng.integers(0, vocab, EMBEDDING_IDS)
    # Both sides allocate their result: np.take(..., out=) buffers its output (slower than E[ids]),
    # so a preallocated NumPy side would not be the code a user writes.
    return Case(id="embedding", kernel="embedding forward", dtype=np.dtype(np.float32),
                shape=f"{vocab}x{size} table, {EMBEDDING_IDS} ids, r={r}",
                numpy=Side(lambda: table[ids] + s * (a.T[ids] @ b.T)), nplora=Side(lambda: emb(ids)),
                bytes=2.0 * EMBEDDING_IDS * size * table.itemsize, unit="GB/s", target=1.5,
                note="GB/s: rows gathered + written")


def limit_cases(rng: np.random.Generator, size: int) -> Iterator[Case]:
    weight = random_matrix(rng, (size, size), np.float32, 1 / math.sqrt(size))
    x = random_matrix(rng, (LARGE_BATCH, size), np.float32)
    yield Case(id="limit_gemm", kernel="limit: NumPy GEMM x@W.T", dtype=np.dtype(np.float32),
               shape=f"b={LARGE_BATCH}, {size}x{size}", numpy=Side(lambda: x @ weight.T),
               flops=2.0 * LARGE_BATCH * size * size, unit="GFLOP/s")
    v = x[0].copy()
    yield Case(id="limit_gemv", kernel="limit: NumPy GEMV W@v", dtype=np.dtype(np.float32),
               shape=f"{size}x{size}", numpy=Side(lambda: weight @ v),
               bytes=float(weight.nbytes), unit="GB/s", note="GB/s: bytes of W / time")


class TorchPeft:
    """PyTorch CPU running PEFT's LoRA ``Linear`` on the benchmark's own arrays (shared, not copied)."""

    def __init__(self, threads: int) -> None:
        import peft
        import torch

        # Typed Any: the benchmark must type-check the same with and without torch installed.
        self.torch: Any = torch
        self.peft: Any = peft
        torch.set_num_threads(threads)
        self.versions = {"torch": torch.__version__, "peft": peft.__version__,
                         "torch_threads": torch.get_num_threads()}

    def linear(self, weight: np.ndarray, a: np.ndarray, b: np.ndarray, r: int) -> Any:
        """``peft.get_peft_model`` over a module holding one ``torch.nn.Linear`` of `weight`."""
        torch = self.torch
        dtype = torch.from_numpy(weight[:1, :1]).dtype

        base_class: Any = torch.nn.Module  # a variable: type checkers without torch accept it

        class Holder(base_class):
            def __init__(self) -> None:
                super().__init__()
                self.proj = torch.nn.utils.skip_init(torch.nn.Linear, weight.shape[1],
                                                     weight.shape[0], bias=False, dtype=dtype)

            def forward(self, x: Any) -> Any:
                return self.proj(x)

        holder = Holder()
        holder.proj.weight = torch.nn.Parameter(torch.from_numpy(weight), requires_grad=False)
        config = self.peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"])
        model = self.peft.get_peft_model(holder, config)
        lora = model.base_model.model.proj
        with torch.no_grad():
            for module, value in ((lora.lora_A["default"], a), (lora.lora_B["default"], b)):
                module.to(dtype)
                module.weight.copy_(torch.from_numpy(value))
        return model

    def forward(self, model: Any, x: np.ndarray) -> Side:
        torch, tx = self.torch, self.torch.from_numpy(x)

        def run() -> Any:
            with torch.no_grad():
                return model(tx)
        return Side(run)

    def backward(self, model: Any, x: np.ndarray, g: np.ndarray) -> Side:
        """Autograd's backward through the LoRA Linear; the forward is the untimed setup."""
        model.train()
        lora = model.base_model.model.proj
        params = (lora.lora_A["default"].weight, lora.lora_B["default"].weight)
        tg, graph = self.torch.from_numpy(g), {}

        def setup() -> None:
            for p in params:
                p.grad = None
            graph["x"] = self.torch.from_numpy(x).requires_grad_(True)
            graph["y"] = model(graph["x"])

        return Side(lambda: graph["y"].backward(tg), setup=setup,
                    value=lambda _: (graph["x"].grad, params[0].grad, params[1].grad))


# ------------------------------------------------------------------------- running
def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_times() -> tuple[float, float, float] | None:
    """(busy, total) CPU seconds of the whole machine from /proc/stat, and this process's own."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz, own.user + own.system


def others_share(before: tuple[float, float, float] | None) -> float | None:
    """The share of all CPU time that other processes used since `before` (noise on the timings)."""
    after = cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    others = (after[0] - before[0]) - (after[2] - before[2])
    return min(1.0, max(0.0, others / (after[1] - before[1])))


def machine_info() -> dict[str, Any]:
    """The CPU, NumPy's BLAS (through threadpoolctl), nplora's threads and product backend."""
    from threadpoolctl import threadpool_info

    from . import __version__

    model, cores, physical = platform.processor() or platform.machine(), set(), "0"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name":
                    model = value
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    cores.add((physical, value))
    except OSError:
        pass
    blas = [{key: info.get(key) for key in ("internal_api", "version", "num_threads", "architecture",
                                            "threading_layer", "filepath")}
            for info in threadpool_info() if info.get("user_api") == "blas"]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": model, "physical_cores": len(cores) or None, "os_cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(), "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "numpy": np.__version__, "numpy_blas": blas,
        "nplora": __version__, "nplora_threads": get_num_threads(), "nplora_blas": blas_info(),
        "kernel_isa": _core.kernel_isa(),
        "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
    }


def all_cases(size: int, r: int, vocab: int, torch_peft: TorchPeft | None) -> Iterator[Case]:
    """The rows, built one after another so that only one row's arrays are alive at a time."""
    rng = np.random.default_rng(0)
    yield from forward_cases(rng, size, r, torch_peft)
    yield backward_case(rng, size, r, torch_peft)
    yield from merge_cases(rng, size, r)
    yield from mixed_cases(rng, size, r)
    yield embedding_case(rng, vocab, size, r)
    yield from limit_cases(rng, size)


def run_bench(*, size: int = DEFAULT_SIZE, rank: int = DEFAULT_RANK, vocab: int = VOCAB,
              repeats: int = DEFAULT_REPEATS, min_sample: float = MIN_SAMPLE_S,
              threads: int | None = None, use_torch: bool = True,
              progress: TextIO | None = None) -> dict[str, Any]:
    """Measure every row.

    Parameters
    ----------
    size : int
        in_features = out_features of the linear rows, and the embedding width.
    rank : int
        LoRA rank r.
    vocab : int
        Rows of the embedding table.
    repeats : int
        Timed samples per side and row, after a warm-up; NumPy's and nplora's alternate.
    min_sample : float
        Seconds a sample lasts at least (a fast kernel is repeated within a sample).
    threads : int, optional
        Threads for nplora, NumPy's BLAS and PyTorch alike (default: every usable CPU).
    use_torch : bool
        Add PyTorch + PEFT when both import.
    progress : text stream, optional
        Where to report each row as it is measured.

    Returns
    -------
    dict
        ``machine``, ``settings``, ``rows`` (one dict per row), ``targets_met``,
        ``targets_total``, ``failed`` (ids of rows whose results disagree) and ``seconds``.
    """
    from threadpoolctl import threadpool_limits

    threads = usable_cpus() if threads is None else threads
    for name, value in (("size", size), ("rank", rank), ("vocab", vocab), ("repeats", repeats),
                        ("threads", threads)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    start, previous_threads, cpu_before = time.perf_counter(), get_num_threads(), cpu_times()
    torch_peft, torch_error, rows = None, None, []
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            set_num_threads(threads)
            if use_torch:
                try:
                    torch_peft = TorchPeft(threads)
                except Exception as error:  # noqa: BLE001  (whatever fails only drops the column)
                    torch_error = f"{type(error).__name__}: {error}"
            machine = machine_info()
            machine.update(torch_peft.versions if torch_peft else {"torch_skipped": torch_error})
            for case in all_cases(size, rank, vocab, torch_peft):
                row_before = cpu_times()
                row = measure(case, repeats, min_sample)
                row.others_cpu_share = others_share(row_before)
                rows.append(row)
                del case
                gc.collect()
                if progress is not None:
                    print(f"  {row.kernel}, {row.shape}: NumPy {row.numpy_ms:.2f} ms, nplora "
                          f"{_num(row.nplora_ms)} ms, ratio {_num(row.ratio)} {row.check}",
                          file=progress, flush=True)
    finally:
        set_num_threads(previous_threads)
    limits = {row.id[len("limit_"):]: row.numpy_rate for row in rows if row.id.startswith("limit_")}
    for row in rows:  # a row's rate is in its limit's unit (GB/s for GEMV, GFLOP/s for GEMM)
        limit = limits.get(row.limit) if row.limit else None
        if row.nplora_rate and limit:
            row.limit_share = row.nplora_rate / limit
    targeted = [row for row in rows if row.target_met is not None]
    return {
        "machine": machine,
        "settings": {"size": size, "rank": rank, "vocab": vocab, "repeats": repeats,
                     "min_sample_s": min_sample, "threads": threads, "torch": torch_peft is not None},
        "rows": [vars(row) for row in rows],
        "targets_met": sum(bool(row.target_met) for row in targeted),
        "targets_total": len(targeted),
        "failed": [row.id for row in rows if "FAILED" in (row.check, row.torch_check)],
        "seconds": time.perf_counter() - start,
        "others_cpu_share": others_share(cpu_before),
    }


# ------------------------------------------------------------------------- printing
def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_header(result: dict[str, Any]) -> list[str]:
    m, settings = result["machine"], result["settings"]
    blas = "; ".join(f"{b['internal_api']} {b['version']} ({b['architecture']}, "
                     f"{b['num_threads']} threads, {os.path.basename(b['filepath'] or '?')})"
                     for b in m["numpy_blas"]) or "none found by threadpoolctl"
    nb, load = m["nplora_blas"], m["load_average"]
    lines = [
        f"nplora bench  {m['date']}",
        f"machine: {m['cpu']}, {m['physical_cores'] or '?'} physical cores, os.cpu_count()="
        f"{m['os_cpu_count']} ({m['usable_cpus']} usable); {m['platform']}",
        f"NumPy {m['numpy']}, BLAS: {blas}",
        f"nplora {m['nplora']}, {m['nplora_threads']} threads, products on {nb['backend']}"
        + (f" ({nb['symbol']} in {os.path.basename(nb['filepath'])})" if nb.get("filepath") else ""),
    ]
    lines.append(f"SIMD kernels: {m.get('kernel_isa')}; OPENBLAS_THREAD_TIMEOUT="
                 f"{m.get('openblas_thread_timeout') or 'unset'} (unset: NumPy's BLAS workers spin "
                 "~0.1 s after each call, competing with nplora's threads)")
    if settings["torch"]:
        lines.append(f"PyTorch {m['torch']} + PEFT {m['peft']}, {m['torch_threads']} threads")
    elif m.get("torch_skipped"):
        lines.append(f"PyTorch + PEFT skipped ({m['torch_skipped']})")
    lines.append(f"threads on every side: {settings['threads']}; medians of {settings['repeats']} "
                 "alternating samples; ratio = NumPy ms / nplora ms (> 1: nplora is faster)")
    noise = [] if not load else [f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"]
    share = result.get("others_cpu_share")
    if share is not None:
        noise.append(f"other processes used {share:.0%} of the CPU time during the run"
                     + (" (busy: times inflated, ratios less reliable)" if share > 0.05 else ""))
    if noise:
        lines.append("; ".join(noise))
    return lines


def format_table(result: dict[str, Any]) -> str:
    """The header, one line per row, and the summary."""
    with_torch = result["settings"]["torch"]
    columns = ["kernel", "shape", "NumPy ms", "nplora ms", "ratio", "nplora rate", "limit",
               "target", "check", "others"] + (["torch ms", "torch/nplora"] if with_torch else [])
    table = []
    for row in result["rows"]:
        rate = row["nplora_rate"] if row["nplora_ms"] else row["numpy_rate"]  # limit rows: NumPy's
        cells = [row["kernel"], row["shape"], _num(row["numpy_ms"]), _num(row["nplora_ms"]),
                 "-" if row["ratio"] is None else f"{row['ratio']:.2f}x",
                 "-" if rate is None else f"{rate:.1f} {row['unit']}",
                 "-" if row["limit_share"] is None else f"{100 * row['limit_share']:.0f}%",
                 "-" if row["target"] is None else
                 f">={row['target']:g} {'pass' if row['target_met'] else 'MISS'}",
                 row["check"],
                 "-" if row["others_cpu_share"] is None else f"{row['others_cpu_share']:.0%}"]
        if with_torch:
            cells += [_num(row["torch_ms"]) + (" FAILED" if row["torch_check"] == "FAILED" else ""),
                      "-" if row["torch_ratio"] is None else f"{row['torch_ratio']:.2f}x"]
        table.append(cells)
    widths = [max(len(c), *(len(cells[i]) for cells in table)) for i, c in enumerate(columns)]
    left = {"kernel", "shape", "target", "check"}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if name in left else c.rjust(w)
                         for name, c, w in zip(columns, cells, widths)).rstrip()

    lines = format_header(result) + ["", line(columns), line(["-" * w for w in widths])]
    lines += [line(cells) for cells in table]
    lines += ["", f"limit: nplora's rate as a share of NumPy's GEMV GB/s (batch < {LARGE_BATCH}) or "
                  f"GEMM GFLOP/s (batch {LARGE_BATCH}); PERFORMANCE.md asks >= {LIMIT_SHARE:.0%}",
              "others: CPU time other processes took while the row ran (above a few %, distrust it)",
              f"targets met: {result['targets_met']} / {result['targets_total']}"]
    if result["failed"]:
        lines.append(f"FAILED correctness checks: {', '.join(result['failed'])}")
    lines.append(f"total time: {result['seconds']:.1f} s")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nplora bench``."""
    parser.add_argument("--size", type=int,
                        help=f"in = out features (default: {DEFAULT_SIZE}; --quick: {QUICK_SIZE})")
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK,
                        help=f"LoRA rank (default: {DEFAULT_RANK})")
    parser.add_argument("--repeats", type=int, help=f"timed samples per side (default: "
                                                    f"{DEFAULT_REPEATS}; --quick: {QUICK_REPEATS})")
    parser.add_argument("--threads", type=int,
                        help="threads for nplora and NumPy's BLAS alike (default: all usable CPUs)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, few repeats: a smoke test for CI, not a measurement")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of the table")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch + PEFT")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; exit status 1 if any result disagreed with NumPy's."""
    size = args.size if args.size is not None else QUICK_SIZE if args.quick else DEFAULT_SIZE
    repeats = args.repeats if args.repeats is not None else (
        QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    result = run_bench(
        size=size, rank=args.rank, vocab=max(1, VOCAB * size // DEFAULT_SIZE) if args.quick else VOCAB,
        repeats=repeats, min_sample=QUICK_MIN_SAMPLE_S if args.quick else MIN_SAMPLE_S,
        threads=args.threads, use_torch=not args.no_torch, progress=None if args.json else sys.stderr)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 1 if result["failed"] else 0
