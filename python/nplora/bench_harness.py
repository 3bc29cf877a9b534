"""The measuring and reporting machinery of `nplora bench`: contenders, rows, timing, the table.

`measure` checks every side against NumPy's result, then times the sides alternating sample by
sample after a warm-up and keeps medians; `format_table` prints what `run_bench` collected.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import _core
from .runtime import blas_info, get_num_threads

LARGE_BATCH = 512  # the batch whose rate is GFLOP/s (held against NumPy's GEMM), not GB/s
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}  # of the reference's max |value|
LIMIT_SHARE = 0.9  # the performance brief: 90% of NumPy's GEMM GFLOP/s, or of its GEMV GB/s


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
    # The limit's own NumPy call (same work unit as the row), timed in this row's alternation: the
    # machine's memory bandwidth swung from 34 to 66 GB/s between rows of one run, so a GB/s
    # taken from another row, seconds apart, said little.
    limit_side: Side | None = None
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
    limit_ms: float | None = None  # the row's own limit call (Case.limit_side), if it has one
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
             (("numpy", case.numpy), ("nplora", case.nplora), ("limit", case.limit_side),
              ("torch", case.torch)) if side}
    rtol = RTOL[np.dtype(case.dtype)]
    reference = case.numpy.result()
    errors = {name: relative_error(side.result(), reference)
              for name, side in sides.items() if name not in ("numpy", "limit")}
    del reference
    numbers: dict[str, int] = {}
    samples: dict[str, list[float]] = {name: [] for name in sides}
    # NumPy and nplora (and the row's limit call) alternate; PyTorch runs after them, so that its
    # OpenMP threads, spinning after each call, do not take cores from the pair being compared.
    for wanted in (("numpy", "nplora", "limit"), ("torch",)):
        group = tuple(name for name in wanted if name in sides)
        for name in group:  # warm-up, which also sizes the samples
            once = min(sides[name].call(), sides[name].call())
            numbers[name] = max(1, min(1000, math.ceil(min_sample / max(once, 1e-9))))
        for repeat in range(repeats if group else 0):
            # Every other round in reverse order, so that a machine speeding up or slowing down
            # through a round favours neither side.
            for name in group if repeat % 2 == 0 else group[::-1]:
                samples[name].append(sum(sides[name].call() for _ in range(numbers[name]))
                                     / numbers[name])
    ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}

    def paired(over: str) -> float | None:
        """The median over rounds of `over`'s time / nplora's time in the same round."""
        if over not in samples or "nplora" not in samples:
            return None
        return statistics.median(t / u for t, u in zip(samples[over], samples["nplora"]))

    def rate(milliseconds: float | None) -> float | None:
        work = case.flops if case.unit == "GFLOP/s" else case.bytes
        return work / (milliseconds * 1e-3) / 1e9 if milliseconds and work else None

    def verdict(name: str) -> str | None:
        return None if name not in errors else "ok" if errors[name] <= rtol else "FAILED"

    nplora_ms, torch_ms, limit_ms = ms.get("nplora"), ms.get("torch"), ms.get("limit")
    nplora_rate, limit_rate = rate(nplora_ms), rate(limit_ms)
    # Ratios are taken round by round, then their median: the host's other tenants change the
    # speed of these shared cores by up to ~1.7x within seconds (a register-only FMA loop ran at
    # 96-169 GFLOP/s on one core), so two samples taken side by side are compared, not two medians
    # of samples taken at different moments.
    ratio = paired("numpy")
    check = verdict("nplora") or "n/a"
    error = errors.get("nplora")
    return Row(
        id=case.id, kernel=case.kernel, shape=case.shape, dtype=str(np.dtype(case.dtype)),
        numpy_ms=ms["numpy"], nplora_ms=nplora_ms, ratio=ratio, unit=case.unit,
        numpy_rate=rate(ms["numpy"]), nplora_rate=nplora_rate, target=case.target,
        target_met=None if case.target is None or ratio is None else (
            check == "ok" and ratio >= case.target),
        check=check, max_rel_error=error if error is None or math.isfinite(error) else None,
        calls_per_sample=numbers, torch_ms=torch_ms,
        torch_ratio=torch_ms / nplora_ms if torch_ms and nplora_ms else None,
        torch_check=verdict("torch"), limit=case.limit, note=case.note, limit_ms=limit_ms,
        limit_share=paired("limit") if nplora_rate and limit_rate else None,
        samples_ms={name: [1e3 * v for v in values] for name, values in samples.items()})


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


def format_number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def products_line(nb: dict[str, Any]) -> str:
    """Where nplora's float32 and float64 products run, naming NumPy's BLAS library where it does."""
    library = f" ({os.path.basename(nb['filepath'])})" if nb.get("filepath") else ""
    names = {"nplora": "nplora's kernels", "numpy": "NumPy's BLAS" + library, "eigen": "Eigen"}
    backend, float64 = nb["backend"], nb.get("float64", nb["backend"])
    if float64 == backend:
        return f"products (float32 and float64) on {names.get(backend, backend)}"
    return f"products on {names.get(backend, backend)}, float64 ones on {names.get(float64, float64)}"


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
        f"nplora {m['nplora']}, {m['nplora_threads']} threads; {products_line(nb)}",
    ]
    shared = nb.get("numpy_blas_on_nplora_threads")
    lines.append(f"SIMD kernels: {m.get('kernel_isa')}; NumPy's BLAS runs on "
                 + ("nplora's threads (one pool, no spinning OpenBLAS workers)" if shared else
                    "its own threads (OPENBLAS_THREAD_TIMEOUT="
                    f"{m.get('openblas_thread_timeout') or 'unset'}; unset: they spin ~0.1 s after "
                    "each call, competing with nplora's)"))
    if settings["torch"]:
        lines.append(f"PyTorch {m['torch']} + PEFT {m['peft']}, {m['torch_threads']} threads")
    elif m.get("torch_skipped"):
        lines.append(f"PyTorch + PEFT skipped ({m['torch_skipped']})")
    lines.append(f"threads on every side: {settings['threads']}; medians of {settings['repeats']} "
                 "alternating samples; ratio = the median over those rounds of NumPy ms / nplora ms "
                 "(> 1: nplora is faster)")
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
        cells = [row["kernel"], row["shape"], format_number(row["numpy_ms"]), format_number(row["nplora_ms"]),
                 "-" if row["ratio"] is None else f"{row['ratio']:.2f}x",
                 "-" if rate is None else f"{rate:.1f} {row['unit']}",
                 "-" if row["limit_share"] is None else f"{100 * row['limit_share']:.0f}%",
                 "-" if row["target"] is None else
                 f">={row['target']:g} {'pass' if row['target_met'] else 'MISS'}",
                 row["check"],
                 "-" if row["others_cpu_share"] is None else f"{row['others_cpu_share']:.0%}"]
        if with_torch:
            cells += [format_number(row["torch_ms"]) + (" FAILED" if row["torch_check"] == "FAILED" else ""),
                      "-" if row["torch_ratio"] is None else f"{row['torch_ratio']:.2f}x"]
        table.append(cells)
    widths = [max(len(c), *(len(cells[i]) for cells in table)) for i, c in enumerate(columns)]
    left = {"kernel", "shape", "target", "check"}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if name in left else c.rjust(w)
                         for name, c, w in zip(columns, cells, widths)).rstrip()

    lines = format_header(result) + ["", line(columns), line(["-" * w for w in widths])]
    lines += [line(cells) for cells in table]
    lines += ["", f"limit: nplora's rate as a share of NumPy's GEMV GB/s (batch < {LARGE_BATCH}: W @ v "
                  f"timed within the row) or GEMM GFLOP/s (batch {LARGE_BATCH}: the limit row); "
                  f"the target is >= {LIMIT_SHARE:.0%}",
              "others: CPU time other processes took while the row ran (above a few %, distrust it)",
              f"targets met: {result['targets_met']} / {result['targets_total']}"]
    if result["failed"]:
        lines.append(f"FAILED correctness checks: {', '.join(result['failed'])}")
    lines.append(f"total time: {result['seconds']:.1f} s")
    return "\n".join(lines)
