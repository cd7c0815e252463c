"""LPIPS as a reconstruction metric: per-image distances, AlexNet or VGG trunk.

The network is :class:`ctok.losses.perceptual.LPIPSLoss`'s (the ``lpips`` package's calibrated
linear layers on a torchvision trunk). The field's tables mostly report LPIPS-AlexNet (the
``lpips`` package's default); ctok's training loss is LPIPS-VGG, and the two give different
numbers, so every result names its variant. Only the trunk's ImageNet weights have to be found:
an explicit path, the variant's environment variable (``CTOK_ALEXNET_WEIGHTS``,
``CTOK_VGG16_WEIGHTS``), or torch's hub cache (``alexnet-owt-7be5be79.pth``,
``vgg16-397923af.pth``), downloaded there when online (see :func:`ctok.models.teachers.locate`).
"""
from __future__ import annotations

import os

import torch

# The environment variable that names each variant's trunk weight file.
WEIGHTS_ENV = {"alex": "CTOK_ALEXNET_WEIGHTS", "vgg": "CTOK_VGG16_WEIGHTS"}
DEFAULT_NET = "alex"


def load_lpips(net: str = DEFAULT_NET, weights: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """The frozen LPIPS network (an ``LPIPSLoss``) of ``net`` ("alex" or "vgg") with its ImageNet trunk, on ``device``.

    Raises FileNotFoundError naming the trunk's weight file, its URL and where to put it when the
    weights are neither given nor found (the metric is meaningless with a random trunk).
    """
    from ctok.losses.perceptual import LPIPS_NETS, LPIPSLoss
    from ctok.models.teachers import WeightsRequest, locate

    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_NETS)}, got {net!r}")
    explicit = weights if weights is not None else os.environ.get(WEIGHTS_ENV[net]) or None
    path = locate(WeightsRequest(role=f"LPIPS metric ({net} trunk)", model=LPIPS_NETS[net],
                                 file=None if explicit is None else str(explicit),
                                 config_key=f"--lpips-weights / {WEIGHTS_ENV[net]}"))
    return LPIPSLoss(path, net=net).to(device)


def lpips(images: torch.Tensor, references: torch.Tensor, *, network: torch.nn.Module | None = None,
          net: str = DEFAULT_NET, weights: str | os.PathLike | None = None) -> torch.Tensor:
    """LPIPS distance per image pair, (B,) float32, for images (B, 3, H, W) in [-1, 1]:

        d(x, y) = sum_l  mean_{h,w} || w_l ⊙ ( f̂_l(x)_hw - f̂_l(y)_hw ) ||²

    f_l: the trunk's activations at five depths (AlexNet's five ReLUs, or VGG16's relu1_2 ...
    relu5_3) of the inputs shifted and scaled to ImageNet statistics; f̂ = f / ||f||, the norm over
    channels at each position; w_l: the learned non-negative channel weights (LPIPS v0.1). Pass
    ``network`` (from :func:`load_lpips`) to reuse it; otherwise the ``net`` variant is built from
    ``weights``.
    """
    for name, t in (("images", images), ("references", references)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (B, 3, H, W) in [-1, 1], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if images.shape != references.shape:
        raise ValueError(f"images and references differ in shape: {tuple(images.shape)} vs {tuple(references.shape)}")
    network = network if network is not None else load_lpips(net, weights, device=images.device)
    with torch.no_grad():
        return network.lpips(images.float(), references.float()).flatten()
