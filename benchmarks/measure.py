"""How the benchmarks time, count and compare, so that every figure is a ratio taken in one run.

A lone wall-clock time says little on a shared machine; the GEMM rate is the yardstick
(``achieved GFLOP/s / GEMM GFLOP/s``), timed in the same rounds as the code it judges, and each
figure is the median of repeats after warm-up, reported with its spread (min and max).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, *, warmup: int = 1, repeats: int = 5) -> dict:
    """Median / min / max seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    return summary(timed_side_by_side({"fn": fn}, device, warmup=warmup, repeats=repeats)["fn"])


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def summary(stats: dict) -> dict:
    """One function's entry of ``timed_side_by_side`` without its per-round times."""
    return {k: v for k, v in stats.items() if k != "times"}


def timed_side_by_side(fns: dict, device: torch.device, *, warmup: int = 1, repeats: int = 5) -> dict:
    """``timed`` for several functions at once, run in rounds (a, b, c, a, b, c, ...).

    On a machine whose speed drifts (a shared CPU, a GPU warming up) timing one function's repeats
    after another's compares two different machines; in rounds each comparison is paired. Returns
    per function its stats plus ``times``, the per-round seconds, for paired ratios (``paired_ratio``).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: {**_stats(t), "times": t} for name, t in times.items()}


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's time / b's time (entries of one ``timed_side_by_side`` result)."""
    return statistics.median(x / y for x, y in zip(a["times"], b["times"]))


def count_flops(fn) -> int:
    """FLOPs of one call, counted by PyTorch's dispatcher (matmuls, convolutions and attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class Gemm:
    """A large square matmul on the device: the yardstick that every row is timed beside."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None):
        self.device = device
        self.size = size or (8192 if device.type == "cuda" else 2048)
        self.a = torch.randn(self.size, self.size, device=device, dtype=dtype)
        self.b = torch.randn(self.size, self.size, device=device, dtype=dtype)
        self.flops = 2 * self.size**3

    def __call__(self) -> torch.Tensor:
        return self.a @ self.b

    def rate(self) -> dict:
        """GFLOP/s, timed on its own (the figure printed as the machine's reference)."""
        t = timed(self, self.device, warmup=2, repeats=7)
        return {"size": self.size, "dtype": str(self.a.dtype).replace("torch.", ""), **t,
                "gflops": self.flops / t["median_s"] / 1e9}


def copy_rate(device: torch.device, megabytes: int = 512) -> dict:
    """GB/s of a large tensor copy (read + write counted)."""
    src = torch.empty(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, warmup=2, repeats=7)
    return {"megabytes": megabytes, **t, "gb_per_s": 2 * src.numel() * 4 / t["median_s"] / 1e9}


@contextmanager
def peak_memory(device: torch.device, out: dict):
    """Peak memory of the block in MiB: CUDA allocator peak, or the process's peak RSS on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    try:  # writing 5 to clear_refs resets VmHWM, the peak resident set
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    yield
    out["peak_mib"] = _status_kib("VmHWM") / 1024


def _status_kib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def throughput(name: str, fn, items: int, device: torch.device, gemm: Gemm, *, repeats: int = 5) -> dict:
    """One row of the table: items/s, FLOPs per item, achieved GFLOP/s and its share of the GEMM rate.

    The share is paired: each round times ``fn`` and then the GEMM, and the row reports the median
    over rounds of (achieved rate / GEMM rate), so that a machine that slows down during the suite
    (thermal limits, a neighbour on a shared host) does not pass for a slow code path.
    """
    flops = count_flops(fn)
    row = {"name": name}
    with peak_memory(device, row):  # one call on its own: the warm-up (the GEMM is warm from its rate)
        fn()
        synchronize(device)
    t = timed_side_by_side({"row": fn, "gemm": gemm}, device, warmup=0, repeats=repeats)
    achieved = flops / t["row"]["median_s"] / 1e9
    row.update(summary(t["row"]), items=items,
               items_per_s=items / t["row"]["median_s"], gflop_per_item=flops / items / 1e9,
               achieved_gflops=achieved, fraction_of_gemm=paired_ratio(t["gemm"], t["row"]) * flops / gemm.flops,
               gemm_gflops_beside=gemm.flops / t["gemm"]["median_s"] / 1e9)
    return row
