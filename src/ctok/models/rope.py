"""2-D rotary position embedding with learnable mixed frequencies (RoPE-Mixed, Heo et al. 2024).

Every layer and head owns its own frequency pairs (f_x, f_y); a patch at grid position (x, y)
rotates channel pair k of a query/key by the angle ``x * f_x[k] + y * f_y[k]``. Initialised as
axial frequencies ``theta ** (-4k / head_dim)`` turned by a random angle per head, then trained.

Layout of the learnable tensor (as stored in the released checkpoints): ``(2, depth, heads *
head_dim / 2)``, index 0 holding f_x and 1 f_y, heads concatenated along the last axis. Pairs are
adjacent channels (2k, 2k + 1), treated as the real and imaginary parts of a complex number.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ctok.numerics import without_autocast


def init_mixed_frequencies(depth: int, num_heads: int, head_dim: int, theta: float) -> torch.Tensor:
    """Initial (2, depth, num_heads * head_dim // 2) frequencies: axial magnitudes at a random angle."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
    magnitude = theta ** (-torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)
    angle = torch.rand(depth, num_heads, 1) * 2 * math.pi
    # Each head gets two groups of frequencies, the second turned a quarter turn from the first,
    # so that both axes are covered whatever the random angle.
    fx = torch.cat([magnitude * torch.cos(angle), magnitude * torch.cos(angle + math.pi / 2)], dim=-1)
    fy = torch.cat([magnitude * torch.sin(angle), magnitude * torch.sin(angle + math.pi / 2)], dim=-1)
    return torch.stack([fx, fy]).reshape(2, depth, -1)


def grid_positions(width: int, height: int, device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row of each patch in raster order (row-major), as floats, on ``device`` (None:
    torch's default device)."""
    index = torch.arange(width * height, dtype=torch.float32, device=device)
    return index % width, torch.div(index, width, rounding_mode="floor")


def rotation_angles(freqs: torch.Tensor, pos_x: torch.Tensor, pos_y: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Angles (depth, heads, N, head_dim // 2) for N patches; computed in float32 even under autocast."""
    depth = freqs.shape[1]
    with without_autocast(freqs.device):
        f = freqs.float()
        angles = pos_x[None, :, None] * f[0][:, None, :] + pos_y[None, :, None] * f[1][:, None, :]
    return angles.view(depth, pos_x.shape[0], num_heads, -1).transpose(1, 2)


def rotation_tables(angles: torch.Tensor, start: int, total: int) -> list[torch.Tensor]:
    """Per-layer unit complex multipliers over the whole token sequence: ``depth`` tables (heads, total, head_dim / 2).

    ``angles`` (depth, heads, N, head_dim / 2) are for the N tokens from ``start``; other positions
    (class and latent tokens) get the identity, 1 + 0i. Rotating the whole sequence by one complex
    product is a single pass over q and k, where slicing out the image tokens and concatenating
    them back would copy them three more times in every layer (and a real-valued cos / sin /
    pair-swap formulation takes three passes; measured 4-7x slower on the CPU).
    """
    # Built so that ctok.export can trace it: ONNX has no complex type, and the exporter turns
    # polar and complex products into real arithmetic, but not a complex slice copy or a complex
    # tensor split into layers. So the other positions get angle 0 (cos 0 = 1 and sin 0 = 0
    # exactly, the same table) and the real angles are split into layers before polar.
    angles = F.pad(angles.float(), (0, 0, start, total - start - angles.shape[2]))
    return [torch.polar(torch.ones_like(layer), layer) for layer in angles]


def apply_rotation(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2k, 2k+1) of x (B, heads, N, head_dim) by a layer's table.

    The product is taken in complex64 (float32 parts): bfloat16 has no complex type, and the
    rotation is cheap next to attention either way.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * table).flatten(-2).to(x.dtype)
