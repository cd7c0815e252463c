"""Discriminators for tokenizer GAN training.

* :class:`DinoDiscriminator` (the published recipes): a frozen DINO ViT-S/16 reads the image; at
  its patch embedding and after blocks 3, 6, 9 and 12 the patch tokens plus the class token form a
  sequence, and one small trainable head per level (spectrally normalised 1-D convolutions over the
  token sequence, circular padding, batch norm, leaky ReLU, a residual kernel-9 block) gives one
  logit per token. The logits of all levels are concatenated: (B, 5 x tokens).
* :class:`PatchGANDiscriminator`: the pix2pix / taming-transformers convolutional patch critic.

The DINO discriminator reads images larger than its input size (224 px) as the original does:
each call, with probability 1/2, one random input-size window, the same for the whole batch;
otherwise the whole image area-resized (:meth:`DinoDiscriminator.random_view`).

Batch norm here normalises over the *global* batch: under torch.distributed the statistics are
summed over processes with a differentiable all-reduce (what SyncBatchNorm does on GPUs, but on
any backend), so N processes train the discriminator exactly as one process with the whole batch.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from ctok.models.checkpointing import BlockStack
from ctok.models.collectives import sum_over_processes
from ctok.models.teachers import IMAGENET_MEAN, IMAGENET_STD, freeze


class GlobalBatchNorm(nn.Module):
    """Batch norm over batch and spatial dimensions of the whole global batch, without running stats.

    The discriminator is only ever used in training, so running averages would never be read.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        h = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics never in half precision
        # The element count joins the sums (processes may hold different batch sizes); filled on the
        # device, where a tensor made from the Python number would be a blocking host-to-device copy.
        count = h.new_full((1,), h.numel() / h.shape[1])
        stats = torch.cat([h.sum(dims), h.square().sum(dims), count])
        stats = sum_over_processes(stats)
        c = x.shape[1]
        mean = stats[:c] / stats[-1]
        var = (stats[c:2 * c] / stats[-1] - mean.square()).clamp_min(0.0)
        shape = (1, c) + (1,) * (x.dim() - 2)
        h = (h - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return (h * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


def _sn_conv1d(channels_in: int, channels_out: int, kernel_size: int, bias: bool = True) -> nn.Module:
    conv = nn.Conv1d(channels_in, channels_out, kernel_size, padding=kernel_size // 2, padding_mode="circular",
                     bias=bias)
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12)


def _conv_norm_act(channels: int, kernel_size: int) -> nn.Sequential:
    # No bias before batch norm: the norm removes it, and its gradient is pure rounding noise that
    # Adam would blow up into steps of full learning-rate size.
    return nn.Sequential(_sn_conv1d(channels, channels, kernel_size, bias=False), GlobalBatchNorm(channels),
                         nn.LeakyReLU(0.2))


class ScaledResidual(nn.Module):
    """``(f(x) + x) / sqrt(2)``: keeps the variance of the residual sum at that of its inputs."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2.0)


def _token_head(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        _conv_norm_act(channels, 1),
        ScaledResidual(_conv_norm_act(channels, kernel_size)),
        _sn_conv1d(channels, 1, 1),
    )


class DinoDiscriminator(BlockStack, nn.Module):
    """Trainable heads on a frozen DINO ViT (see the module docstring).

    ``backbone`` is a timm ViT with a class token (DINO ViT-S/16 in the recipes; any timm ViT for
    tests). Images in [-1, 1] are normalised with ImageNet statistics, then resized to
    ``input_size`` (the ViT's own resolution): area averaging down, bicubic up. Training first
    passes larger images through :meth:`random_view`, which crops one window with probability
    ``crop_prob``. ``key_blocks`` are 0-based block indices.

    Activation checkpointing recomputes the ViT's blocks: they are frozen, but the generator's
    adversarial loss back-propagates through them to the reconstructions.
    """

    def __init__(self, backbone: nn.Module, input_size: int = 224, key_blocks: tuple[int, ...] = (2, 5, 8, 11),
                 kernel_size: int = 9, crop_prob: float = 0.5):
        super().__init__()
        if backbone.num_prefix_tokens != 1:
            raise ValueError(f"the DINO discriminator needs a ViT with exactly a class token, "
                             f"got {backbone.num_prefix_tokens} prefix tokens")
        depth = len(backbone.blocks)
        if any(not 0 <= k < depth for k in key_blocks):
            raise ValueError(f"key_blocks {key_blocks} must lie in [0, {depth - 1}] for a {depth}-block backbone")
        if not 0.0 <= crop_prob <= 1.0:
            raise ValueError(f"crop_prob must lie in [0, 1], got {crop_prob}")
        self.backbone = freeze(backbone)
        self.input_size = input_size
        self.crop_prob = crop_prob
        self.key_blocks = tuple(sorted(key_blocks))
        self.last_block = self.key_blocks[-1] if self.key_blocks else -1
        self.register_buffer("scale", 0.5 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift",
                             ((0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1),
                             persistent=False)
        width = backbone.num_features
        self.heads = nn.ModuleList(_token_head(width, kernel_size) for _ in range(len(self.key_blocks) + 1))

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.backbone.eval()
        return self

    def random_view(self, images: torch.Tensor, shared_rand: Callable[..., torch.Tensor] | None = None
                    ) -> torch.Tensor:
        """With probability ``crop_prob`` one ``input_size`` window of images larger than that, at a
        random place, the same window for every image of the batch; otherwise ``images`` unchanged
        (the forward pass then area-resizes them, after normalising, as the original does).

        ``shared_rand(n)`` gives n uniform numbers shared by the whole batch (training passes
        :meth:`ctok.training.sharding.BatchRandom.shared_rand`, so every process crops the same
        window); None: torch's global generator. Images not larger than ``input_size`` on both
        sides pass unchanged and draw nothing.
        """
        h, w = images.shape[-2:]
        s = self.input_size
        if h <= s or w <= s:
            return images
        u = shared_rand(3) if shared_rand is not None else torch.rand(3)
        if float(u[0]) >= self.crop_prob:
            return images
        top, left = int(u[1] * (h - s + 1)), int(u[2] * (w - s + 1))
        return images[..., top:top + s, left:left + s]

    def token_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, width, tokens) per level: patch tokens plus the class token, before and after key blocks."""
        x = self.scale * images.float() + self.shift  # [-1, 1] -> ImageNet-normalised
        size = x.shape[-1]
        if size != self.input_size:
            mode = "area" if size > self.input_size else "bicubic"
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=mode)
        vit = self.backbone
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))

        def readout(t: torch.Tensor) -> torch.Tensor:
            return (t[:, 1:] + t[:, :1]).transpose(1, 2)

        levels = [readout(h)]
        for i, block in enumerate(vit.blocks[: self.last_block + 1]):
            h = self.run_block(block, h)
            if i in self.key_blocks:
                levels.append(readout(h))
        return levels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, levels x tokens) for images (B, 3, H, W) in [-1, 1]."""
        levels = self.token_features(images)
        return torch.cat([head(t).flatten(1) for head, t in zip(self.heads, levels)], dim=1)


class PatchGANDiscriminator(nn.Module):
    """pix2pix's N-layer patch discriminator: 4x4 convolutions, logits on a patch grid (B, 1, h, w)."""

    def __init__(self, in_channels: int = 3, width: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(width * prev, width * mult, 4, stride=stride, padding=1, bias=False),
                       GlobalBatchNorm(width * mult, eps=1e-5), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, GlobalBatchNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def training_view(discriminator: nn.Module, images: torch.Tensor,
                  shared_rand: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """What ``discriminator`` is shown of ``images`` in training: a :class:`DinoDiscriminator`'s
    :meth:`~DinoDiscriminator.random_view`; any other discriminator reads the images whole."""
    if isinstance(discriminator, DinoDiscriminator):
        return discriminator.random_view(images, shared_rand)
    return images
