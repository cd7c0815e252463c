"""What activation checkpointing (``run.activation_checkpointing``) buys and costs: the peak memory
and the time of one training step with the blocks recomputed, against the same step without.

The step is the generator trainer's: a SiT-S/1 on 128 x 32 latents, in eval mode as the trainer
runs it, a velocity loss and its backward pass (batch 16 on the CPU, 64 on a GPU; ``quick``: 8).
Peak memory on a GPU is the allocator's peak; on the CPU, where no allocator keeps count and the
process's resident set hides freed memory that malloc keeps, it is the peak of the live tensors
that torch's MemTracker follows (parameters, gradients, activations, temporaries). The time ratio is
paired: both steps run in alternating rounds and the figure is the median of per-round ratios.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from benchmarks.measure import paired_ratio, summary, synchronize, timed_side_by_side
from ctok.models.checkpointing import set_activation_checkpointing
from ctok.models.diffusion_transformer import build_sit


def _peak_mib(fn, model: torch.nn.Module, device: torch.device) -> dict:
    """Peak MiB of ``fn()``: the whole and (CPU) the activations' share of it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        fn()
    peak = tracker.get_tracker_snapshot("peak")[device]
    activations = sum(v for k, v in peak.items() if getattr(k, "name", "") == "ACT")
    return {"peak_mib": peak["Total"] / 2**20, "activations_mib": activations / 2**20}


def activation_checkpointing(device: torch.device, quick: bool = False) -> dict:
    gpu = device.type == "cuda"
    batch = 8 if quick else (64 if gpu else 16)
    torch.manual_seed(0)
    sit = build_sit("SiT-S/1", input_size=128, in_channels=32).to(device).eval()
    x0 = torch.randn(batch, 128, 32, device=device)
    noise = torch.randn_like(x0)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise

    def step(recompute: bool):
        def run():
            set_activation_checkpointing(sit, recompute)
            with torch.autocast("cuda", dtype=torch.bfloat16) if gpu else nullcontext():
                loss = (sit(xt, t, y).float() - (noise - x0)).square().mean()
            loss.backward()
            sit.zero_grad(set_to_none=True)
        return run

    plain, recomputed = step(False), step(True)
    plain()  # warm-up, so that neither peak holds first-call allocations
    result = {"model": "SiT-S/1", "latents": "128x32", "batch": batch, "device": device.type,
              "threads": torch.get_num_threads(),
              "plain": _peak_mib(plain, sit, device), "recomputed": _peak_mib(recomputed, sit, device)}
    times = timed_side_by_side({"plain": plain, "recomputed": recomputed}, device, warmup=0,
                               repeats=2 if quick else 3)
    result["plain"].update(summary(times["plain"]))
    result["recomputed"].update(summary(times["recomputed"]))
    result["memory_ratio"] = result["recomputed"]["peak_mib"] / result["plain"]["peak_mib"]
    result["time_ratio"] = paired_ratio(times["recomputed"], times["plain"])
    return result
