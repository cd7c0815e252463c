"""LPIPS (Zhang et al., 2018): the tokenizers' perceptual loss (VGG) and the reconstruction metric (AlexNet or VGG).

The network is the reference ``lpips`` package's: trunk activations at five depths, unit-normalised
per position across channels, squared differences weighted by its calibrated 1x1 "linear" layers
(shipped inside the package), averaged over space and summed over depths::

    LPIPS(x, y) = sum_l mean_hw < w_l, (f_l(x)/||f_l(x)|| - f_l(y)/||f_l(y)||)^2 >

The trunk's ImageNet weights come from torchvision (see :mod:`ctok.models.teachers`), so an
offline machine can point to a local copy. Inputs are images in [-1, 1].
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ctok.models.teachers import ALEXNET, VGG16, freeze, torchvision_trunk

# The lpips package's name of each trunk.
LPIPS_NETS = {"vgg": VGG16, "alex": ALEXNET}


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance over the batch; frozen, always in eval mode.

    ``trunk_weights`` is torchvision's ImageNet file of the trunk, ``vgg16-397923af.pth`` for
    ``net="vgg"`` or ``alexnet-owt-7be5be79.pth`` for ``net="alex"`` (None: a random trunk, for
    tests; the calibrated linear layers of that trunk are loaded either way).
    """

    def __init__(self, trunk_weights: Path | None, net: str = "vgg"):
        super().__init__()
        import lpips

        if net not in LPIPS_NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_NETS)}, got {net!r}")
        self.net = net
        with warnings.catch_warnings():
            # lpips builds its trunk through torchvision's deprecated `pretrained=` argument.
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if trunk_weights is not None:
            # lpips keeps torchvision's layer indices inside its slices (slice2.3 is features[3]).
            features = torchvision_trunk(LPIPS_NETS[net], trunk_weights)
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
