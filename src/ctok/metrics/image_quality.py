"""Per-image reconstruction fidelity: PSNR and SSIM, on the data range of the images given.

The data range is the width of the interval the pixel values live in: 255 for uint8 images, 1.0
for [0, 1], 2.0 for [-1, 1]. Getting it wrong is the usual SSIM mistake (the constants C1, C2
scale with it), so it is taken from the dtype for uint8 and must be given for float images.

Two conventions are named because published tables mix them:

* PSNR of an identical pair is infinite; an infinite value would make every mean infinite, so it is
  capped at :func:`psnr_cap` (the PSNR of an image whose only error is one 8-bit level in one
  value, the smallest error a saved image can have) and callers report how many pairs were capped.
* ``ssim(..., convention="llamagen")`` reproduces the LlamaGen-lineage tables, which ran
  scikit-image with ``data_range=2`` on images in [0, 1]: the constants are those of twice the real
  range, which inflates the score. ``"standard"`` (the default) is Wang et al.'s, on the real range.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 7
K1, K2 = 0.01, 0.03
SSIM_CONVENTIONS = ("standard", "llamagen")


def _pair(x: torch.Tensor, y: torch.Tensor, data_range: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    for name, t in (("images", x), ("references", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a tensor (B, C, H, W), got {getattr(t, 'shape', type(t).__name__)}")
    if x.shape != y.shape:
        raise ValueError(f"images and references differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if data_range is None:
        if x.dtype != torch.uint8 or y.dtype != torch.uint8:
            raise ValueError(
                f"data_range is needed for {x.dtype}/{y.dtype} images: the width of their value range "
                "(1.0 for [0, 1], 2.0 for [-1, 1]); only uint8 images imply it (255)"
            )
        data_range = 255.0
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    return x.double(), y.double(), float(data_range)


def psnr_cap(images: torch.Tensor) -> float:
    """The PSNR given to an identical pair: 10 log10(255² n) dB for images of n = C x H x W values,
    as if exactly one value were one 8-bit level off (101.1 dB at 256 x 256 x 3)."""
    return 10 * math.log10(255.0**2 * images[0].numel())


def psnr(images: torch.Tensor, references: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(R² / MSE), MSE over channels and pixels.

    ``images``, ``references``: (B, C, H, W); R = ``data_range`` (255 for uint8). Returns (B,)
    float64. Equals ``skimage.metrics.peak_signal_noise_ratio`` except for identical pairs, which
    get :func:`psnr_cap` instead of +inf (count them with :func:`identical_pairs`).
    """
    x, y, r = _pair(images, references, data_range)
    mse = (x - y).square().flatten(1).mean(dim=1)
    return (10 * torch.log10(r * r / mse)).clamp(max=psnr_cap(x))


def identical_pairs(images: torch.Tensor, references: torch.Tensor) -> int:
    """How many pairs are equal in every value (their PSNR is capped, see :func:`psnr_cap`)."""
    _pair(images, references, 1.0)
    return int((images == references).flatten(1).all(dim=1).sum())


def ssim(images: torch.Tensor, references: torch.Tensor, data_range: float | None = None,
         convention: str = "standard") -> torch.Tensor:
    """Structural similarity per image, scikit-image's default estimator (Wang et al. 2004).

    For each channel, with 7x7 uniform windows and the sample (N-1) covariance over each window,

        SSIM = ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x² + mu_y² + C1)(s_x² + s_y² + C2)),
        C1 = (0.01 R)², C2 = (0.03 R)²,  R = ``data_range``,

    averaged over the windows that fit inside the image and then over channels. Returns (B,)
    float64; equals ``skimage.metrics.structural_similarity(..., channel_axis=, data_range=R)``.
    ``convention="llamagen"`` uses twice the range in the constants (see the module docstring).
    """
    if convention not in SSIM_CONVENTIONS:
        raise ValueError(f"SSIM convention must be one of {SSIM_CONVENTIONS}, got {convention!r}")
    x, y, r = _pair(images, references, data_range)
    if convention == "llamagen":
        r *= 2
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(x.shape[-2:])}")

    def window_mean(t):
        return F.avg_pool2d(t, SSIM_WINDOW, stride=1)

    n = SSIM_WINDOW * SSIM_WINDOW
    unbiased = n / (n - 1)
    mu_x, mu_y = window_mean(x), window_mean(y)
    var_x = unbiased * (window_mean(x * x) - mu_x * mu_x)
    var_y = unbiased * (window_mean(y * y) - mu_y * mu_y)
    cov = unbiased * (window_mean(x * y) - mu_x * mu_y)
    c1, c2 = (K1 * r) ** 2, (K2 * r) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)

