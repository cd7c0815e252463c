"""LPIPS-VGG perceptual loss (Zhang et al., 2018), as the tokenizers are trained with it.

The network is the reference ``lpips`` package's: VGG16 activations at five depths, unit-normalised
per position across channels, squared differences weighted by its calibrated 1x1 "linear" layers
(shipped inside the package), averaged over space and summed over depths::

    LPIPS(x, y) = sum_l mean_hw < w_l, (f_l(x)/||f_l(x)|| - f_l(y)/||f_l(y)||)^2 >

The VGG16 trunk's ImageNet weights come from torchvision (see :mod:`ctok.models.teachers`), so an
offline machine can point to a local copy. Inputs are images in [-1, 1].
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ctok.models.teachers import freeze, vgg16_features


class LPIPSLoss(nn.Module):
    """Mean LPIPS-VGG distance over the batch; frozen, always in eval mode.

    ``vgg_weights`` is torchvision's ``vgg16-397923af.pth`` (None: a random trunk, for tests; the
    calibrated linear layers are loaded either way).
    """

    def __init__(self, vgg_weights: Path | None):
        super().__init__()
        import lpips

        with warnings.catch_warnings():
            # lpips builds its trunk through torchvision's deprecated `pretrained=` argument.
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if vgg_weights is not None:
            features = vgg16_features(vgg_weights)
            for name, module in self.lpips.net.named_modules():
                if isinstance(module, nn.Conv2d):
                    module.load_state_dict(features[int(name.rsplit(".", 1)[1])].state_dict())
        freeze(self)

    def train(self, mode: bool = True) -> "LPIPSLoss":
        return super().train(False)

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        return self.lpips(images, reconstructions).mean()


def perceptual_weight_at(step: int, weight: float, warmup_steps: int) -> float:
    """LPIPS weight at ``step``: ramps linearly from 0 to ``weight`` over ``warmup_steps`` (0: no ramp)."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps)
