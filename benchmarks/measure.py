"""How the benchmarks time, count and compare, so that every figure is a ratio taken in one run.

A lone wall-clock time says little on a shared machine; the same run's GEMM rate is the yardstick
(``achieved GFLOP/s / GEMM GFLOP/s``), and each figure is the median of repeats after warm-up,
reported with its spread (min and max).
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
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def count_flops(fn) -> int:
    """FLOPs of one call, counted by PyTorch's dispatcher (matmuls, convolutions and attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def gemm_rate(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None) -> dict:
    """The machine's reference: GFLOP/s of a large square matmul in ``dtype``."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, warmup=2, repeats=7)
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), **t, "gflops": 2 * size**3 / t["median_s"] / 1e9}


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


def throughput(name: str, fn, items: int, device: torch.device, gemm_gflops: float, *, repeats: int = 5) -> dict:
    """One row of the table: items/s, FLOPs per item, achieved GFLOP/s and its share of the GEMM rate."""
    flops = count_flops(fn)
    row = {"name": name}
    with peak_memory(device, row):
        t = timed(fn, device, repeats=repeats)
    achieved = flops / t["median_s"] / 1e9
    row.update(t, items=items, items_per_s=items / t["median_s"], gflop_per_item=flops / items / 1e9,
               achieved_gflops=achieved, fraction_of_gemm=achieved / gemm_gflops)
    return row
