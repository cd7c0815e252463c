"""LPIPS-VGG as a reconstruction metric: per-image distances from the training loss's network.

The network is :class:`ctok.losses.perceptual.LPIPSLoss`'s (the ``lpips`` package's calibrated
linear layers on torchvision's VGG16 trunk); only the VGG16 ImageNet weights have to be found:
an explicit path, ``CTOK_VGG16_WEIGHTS``, or torch's hub cache (``vgg16-397923af.pth``), downloaded
there when online (see :func:`ctok.models.teachers.locate`).
"""
from __future__ import annotations

import os

import torch

VGG16_ENV = "CTOK_VGG16_WEIGHTS"


def load_lpips_vgg(vgg_weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The frozen LPIPS-VGG network (an ``LPIPSLoss``) with ImageNet VGG16 weights, on ``device``.

    Raises FileNotFoundError naming ``vgg16-397923af.pth``, its URL and where to put it when the
    weights are neither given nor found (the metric is meaningless with a random trunk).
    """
    from ctok.losses.perceptual import LPIPSLoss
    from ctok.models.teachers import VGG16, WeightsRequest, locate

    explicit = vgg_weights if vgg_weights is not None else os.environ.get(VGG16_ENV) or None
    hint = f"--vgg-weights / {VGG16_ENV}"
    path = locate(WeightsRequest(role="LPIPS metric (VGG16 trunk)", model=VGG16,
                                 file=None if explicit is None else str(explicit), config_key=hint))
    return LPIPSLoss(path).to(device)


def lpips(images: torch.Tensor, references: torch.Tensor, *, network: torch.nn.Module | None = None,
          vgg_weights: str | os.PathLike | None = None) -> torch.Tensor:
    """LPIPS distance per image pair, (B,) float32, for images (B, 3, H, W) in [-1, 1]:

        d(x, y) = sum_l  mean_{h,w} || w_l ⊙ ( f̂_l(x)_hw - f̂_l(y)_hw ) ||²

    f_l: VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the inputs
    shifted and scaled to ImageNet statistics; f̂ = f / ||f||, the norm over channels at each
    position; w_l: the learned non-negative channel weights (LPIPS v0.1). Pass ``network`` (from
    :func:`load_lpips_vgg`) to reuse it; otherwise it is built from ``vgg_weights``.
    """
    for name, t in (("images", images), ("references", references)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (B, 3, H, W) in [-1, 1], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if images.shape != references.shape:
        raise ValueError(f"images and references differ in shape: {tuple(images.shape)} vs {tuple(references.shape)}")
    net = network if network is not None else load_lpips_vgg(vgg_weights, device=images.device)
    with torch.no_grad():
        return net.lpips(images.float(), references.float()).flatten()
