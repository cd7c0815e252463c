"""MAETok's mask modelling, training side: which image patches the encoder does not see at a step.

This is the only place masks are drawn; the network (:class:`ctok.models.tokenizer.Tokenizer`)
applies the mask it is given and never draws one. Per step:

    r     the mask ratio: ``published`` draws it from a normal (loc ``enc_token_drop_max``,
          scale 0.25) truncated to [enc_token_drop, enc_token_drop_max], by inverse CDF from one
          uniform of a generator seeded by (seed, step); ``anneal`` (MAETok's decoder fine-tuning)
          decreases it linearly from ``masking.anneal_from`` to 0 over ``masking.anneal_steps``.
    mask  per sample, the round(r P) of its P patches with the smallest of its own P uniforms.

Both depend only on (seed, step) and the sample's own draws, never on the process-global
generator or on how the batch is split over processes, so N processes mask like one and a resumed
run masks as the uninterrupted one did. A ratio that rounds to no patch gives no mask (None): an
unmasked step, not a fallback to some other ratio.
"""
from __future__ import annotations

import torch
from scipy.stats import truncnorm

from ctok.seeding import derived_seed

_MASK_STREAM = 2  # seed stream of the per-step mask ratio (0 and 1 are ctok.training.sharding's)
_SCALE = 0.25  # the published distribution's scale


class MaskSchedule:
    """The share of image patches masked at each step (see the module docstring)."""

    def __init__(self, low: float, high: float, *, schedule: str = "published", start: float = 0.6,
                 steps: int = 50000):
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"mask ratios need 0 <= enc_token_drop <= enc_token_drop_max < 1, got {low}, {high}")
        if schedule == "anneal" and steps < 1:
            raise ValueError(f"masking.anneal_steps must be at least 1, got {steps}")
        self.schedule = schedule
        self.low = low
        self.start = start
        self.steps = steps
        self.distribution = truncnorm((low - high) / _SCALE, 0.0, loc=high, scale=_SCALE)

    def ratio(self, step: int, u: float) -> float:
        """The ratio at ``step`` given the step's uniform ``u`` (which ``anneal`` ignores)."""
        if self.schedule == "anneal":
            return max(0.0, self.start * (1.0 - step / self.steps))
        return float(self.distribution.ppf(u))

    def may_mask_nothing(self, num_patches: int) -> bool:
        """Whether some step's ratio may round to no patch of ``num_patches`` (an unmasked step).

        ``anneal`` reaches 0 at ``anneal_steps``; ``published`` never goes below ``enc_token_drop``,
        whose share of the patches :func:`random_patch_mask` rounds the same way.
        """
        lowest = 0.0 if self.schedule == "anneal" else self.low
        return round(lowest * num_patches) == 0

    def step_ratio(self, seed: int, step: int) -> float:
        """The ratio of ``step`` in the run seeded ``seed``: the same in every process and on resume."""
        g = torch.Generator().manual_seed(derived_seed(seed, _MASK_STREAM, step))
        return self.ratio(step, float(torch.rand((), generator=g)))


def random_patch_mask(uniform: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """(B, P) bool masking ``round(ratio * P)`` patches per row, chosen by ``uniform`` (B, P) draws.

    None when that is no patch. A row's mask depends on its own draws only, so splitting the batch
    changes nothing.
    """
    k = int(round(ratio * uniform.shape[1]))
    if k == 0:
        return None
    return uniform.argsort(dim=1).argsort(dim=1) < k
