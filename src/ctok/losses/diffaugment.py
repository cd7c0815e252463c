"""Differentiable augmentation (Zhao et al., 2020) for the discriminator's inputs.

Each policy (colour, translation, cutout) is applied to each sample with probability ``prob``;
every operation is differentiable in the image, so the generator's adversarial gradient passes
through the same augmentations the discriminator sees.

Every random number is a per-sample uniform draw from ``rand(*shape) -> (B, *shape)``. Training
passes :meth:`ctok.training.sharding.BatchRandom.rand`, whose draws depend on a sample's place in
the global batch only, so N processes augment each image as one process with the whole batch
would; without it, torch's global generator is used.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Uniform = Callable[..., torch.Tensor]


def _per_sample(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return u.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def random_color(x: torch.Tensor, rand: Uniform) -> torch.Tensor:
    """Brightness ``+U(-0.5, 0.5)``, saturation ``x U(0, 2)``, contrast ``x U(0.5, 1.5)``, per sample."""
    u = rand(3).to(x.device)
    x = x + _per_sample(u[:, 0] - 0.5, x)
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * _per_sample(2 * u[:, 1], x) + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * _per_sample(u[:, 2] + 0.5, x) + image_mean


def random_translation(x: torch.Tensor, rand: Uniform, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size in each direction, filling with zeros."""
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    u = rand(2).to(x.device)
    dy = (u[:, 0] * (2 * max_dy + 1)).floor().long() - max_dy
    dx = (u[:, 1] * (2 * max_dx + 1)).floor().long() - max_dx
    rows = torch.arange(h, device=x.device)[None, :] - dy[:, None]  # (B, H): source row of each output row
    cols = torch.arange(w, device=x.device)[None, :] - dx[:, None]
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    batch = torch.arange(b, device=x.device)[:, None, None]
    shifted = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return shifted * valid[:, None].to(x.dtype)


def random_cutout(x: torch.Tensor, rand: Uniform, ratio: float = 0.2) -> torch.Tensor:
    """Zero a square of ``ratio`` x the image size at a random centre (clipped at the borders)."""
    b, _, h, w = x.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    u = rand(2).to(x.device)
    top = (u[:, 0] * (h + 1 - size_y % 2)).floor().long() - size_y // 2
    left = (u[:, 1] * (w + 1 - size_x % 2)).floor().long() - size_x // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    inside_y = (rows >= top[:, None]) & (rows < top[:, None] + size_y)
    inside_x = (cols >= left[:, None]) & (cols < left[:, None] + size_x)
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


class DiffAugment:
    """Apply each policy in ``policies`` to each sample with probability ``prob``.

    Policies: ``color``, ``translation`` (shift up to ``translation`` of the size) and ``cutout``
    (a square of ``cutout`` x the size). MAETok's discriminator input uses
    ``DiffAugment(prob=0.5, cutout=0.2)``; its consistency regulariser a strong
    ``DiffAugment(prob=1.0, cutout=0.5)``.
    """

    POLICIES = ("color", "translation", "cutout")

    def __init__(
        self,
        policies: Sequence[str] | str = POLICIES,
        prob: float = 0.5,
        translation: float = 0.125,
        cutout: float = 0.2,
    ):
        if isinstance(policies, str):
            policies = [p.strip() for p in policies.split(",") if p.strip()]
        unknown = sorted(set(policies) - set(self.POLICIES))
        if unknown:
            raise ValueError(f"unknown DiffAugment policies {unknown}; choose from {list(self.POLICIES)}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"DiffAugment prob must lie in [0, 1], got {prob}")
        self.policies = tuple(policies)
        self.prob = prob
        self.translation = translation
        self.cutout = cutout

    def __call__(self, x: torch.Tensor, rand: Uniform | None = None) -> torch.Tensor:
        if rand is None:
            def rand(*shape: int) -> torch.Tensor:
                return torch.rand(x.shape[0], *shape, device=x.device)
        for policy in self.policies:
            apply = rand().to(x.device) < self.prob
            if policy == "color":
                augmented = random_color(x, rand)
            elif policy == "translation":
                augmented = random_translation(x, rand, self.translation)
            else:
                augmented = random_cutout(x, rand, self.cutout)
            x = torch.where(apply.view(-1, 1, 1, 1), augmented, x)
        return x
