"""`nplora bench`: every kernel timed against the NumPy code a user would otherwise write.

NumPy and nplora run in one process on the same arrays with the same number of threads, alternating
sample by sample after a warm-up; medians are reported, and the ratio NumPy / nplora (> 1: nplora is
faster) is held against the targets of PERFORMANCE.md. Each row first checks that both sides agree;
a mismatch marks the row FAILED and makes the command exit non-zero. With torch and peft installed,
PyTorch running PEFT's LoRA ``Linear`` is timed too, right after each pair.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Iterator
from functools import partial
from typing import Any, Callable, TextIO, cast

import numpy as np

from .bench_harness import (LARGE_BATCH, Case, Row, Side, cpu_times, format_number, format_table,
                            machine_info, measure, others_share, usable_cpus)
from .embedding import LoraEmbedding
from .linear import LoraLinear, swap_adapters
from .runtime import get_num_threads, set_num_threads

__all__ = ["Case", "Row", "Side", "add_arguments", "format_table", "run", "run_bench"]

BATCHES, FLOAT64_BATCHES = (1, 2, 8, 32, LARGE_BATCH), (8, LARGE_BATCH)
VOCAB, EMBEDDING_IDS, MIXED_ADAPTERS = 32_000, 2048, 64
DEFAULT_SIZE, QUICK_SIZE = 4096, 1024
DEFAULT_RANK = 16
# 11 rounds: on this project's Xeon VM a single round's NumPy / nplora ratio ranged 0.8-1.5 for the
# same 100 ms kernels (other tenants share the cores), so fewer rounds left the median to chance.
DEFAULT_REPEATS, QUICK_REPEATS = 11, 3
# A sample repeats a kernel until it lasts this long, so that millisecond kernels are not timer noise.
MIN_SAMPLE_S, QUICK_MIN_SAMPLE_S = 0.05, 0.005


def forward_target(batch: int, dtype: np.dtype) -> float:
    """PERFORMANCE.md's minimum NumPy/nplora ratio for an unmerged forward."""
    if dtype == np.float64:
        return 1.0
    return 1.0 if batch == 1 else 2.0 if batch < LARGE_BATCH else 1.05


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
            limit=None if name != "f32" else "gemv" if batch < LARGE_BATCH else "gemm",
            # The weight-streaming rows' limit, NumPy's W @ v on the same W, timed in the row.
            limit_side=Side(partial(np.matmul, weight, x[0].copy()))
            if name == "f32" and batch < LARGE_BATCH else None)


def backward_case(rng: np.random.Generator, size: int, r: int, torch_peft: TorchPeft | None,
                  ) -> Case:
    weight = random_matrix(rng, (size, size), np.float32, 1 / math.sqrt(size))
    a, b = random_lora(rng, size, r, np.float32)
    layer = make_layer(weight, a, b, r).train()
    s, n = layer.scaling, LARGE_BATCH
    x = random_matrix(rng, (n, size), np.float32)
    g = random_matrix(rng, (n, size), np.float32)

    def forward_untimed() -> None:
        # The training-mode forward each backward() uses up; not timed (nor is PyTorch's).
        layer.zero_grad()
        layer(x)

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
        nplora=Side(lambda: layer.backward(g), setup=forward_untimed,
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
                          f"{format_number(row.nplora_ms)} ms, ratio {format_number(row.ratio)} {row.check}",
                          file=progress, flush=True)
    finally:
        set_num_threads(previous_threads)
    limits = {row.id[len("limit_"):]: row.numpy_rate for row in rows if row.id.startswith("limit_")}
    for row in rows:  # a row's rate is in its limit's unit (GB/s for GEMV, GFLOP/s for GEMM)
        limit = limits.get(row.limit) if row.limit and row.limit_ms is None else None
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
