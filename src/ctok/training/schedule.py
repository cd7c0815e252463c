"""Learning-rate schedules: linear warm-up, then constant or cosine decay.

The learning rate is a pure function of the step. The runner sets it before every optimizer step,
so the step stored in a checkpoint restores the schedule exactly and a module that starts late (a
discriminator switched on at step 30k) still follows the same clock as the rest.
"""
from __future__ import annotations

import math


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for the update made at ``step`` (counting from 0).

    warm-up: (step + 1) / warmup_steps while step < warmup_steps, so the first update is not wasted;
    cosine:  min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2 with p the fraction of the
             post-warm-up steps done, reaching min_ratio at ``total_steps``.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"learning-rate schedule must be 'constant' or 'cosine', got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
