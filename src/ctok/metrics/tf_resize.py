"""TensorFlow 1.x's bilinear resize, the one inside the FID Inception graph, in PyTorch.

ADM's evaluator feeds uint8 images of any size to ``classify_image_graph_def.pb``, whose first op
resizes them to 299 x 299 with ``ResizeBilinear`` (``align_corners=False``, no half-pixel centres,
no antialiasing). PyTorch's ``interpolate`` samples at half-pixel centres and torchvision/torchmetrics
may antialias; both change FID, so the resize is written out here from TF's definition:

    output pixel i samples the input at  s = i * (in_size / out_size)   (float32 arithmetic),
    lower = floor(s), upper = min(ceil(s), in_size - 1), lerp = s - floor(s);
    each row is interpolated along x first:  top = tl + (tr - tl) * lerp_x,
    then the two rows along y:               out = top + (bottom - top) * lerp_y.

The order of the float32 operations is TF's, so the result matches it to the last bit on the CPU.
"""
from __future__ import annotations

import torch


def _sample_positions(in_size: int, out_size: int, device: torch.device):
    # float32 scale, as TF's CalculateResizeScale computes it: float(in) / out.
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    source = torch.arange(out_size, dtype=torch.float32) * scale
    lower = source.floor()
    upper = source.ceil().clamp(max=in_size - 1)
    return lower.long().to(device), upper.long().to(device), (source - lower).to(device)


def resize_bilinear_tf(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) float images to ``size`` = (height, width) as TF 1.x ``resize_bilinear`` does.

    Computed in float32 whatever the input's float dtype (TF's kernel computes in float).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    out_h, out_w = size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    x = images.float()
    y_lo, y_hi, y_lerp = _sample_positions(x.shape[-2], out_h, x.device)
    x_lo, x_hi, x_lerp = _sample_positions(x.shape[-1], out_w, x.device)

    def along_x(rows: torch.Tensor) -> torch.Tensor:
        left, right = rows[..., x_lo], rows[..., x_hi]
        return left + (right - left) * x_lerp

    top = along_x(x[..., y_lo, :])
    bottom = along_x(x[..., y_hi, :])
    return top + (bottom - top) * y_lerp[:, None]
