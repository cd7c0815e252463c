"""MAETok's auxiliary shallow decoders: from the latent tokens, predict features of masked patches.

Each decoder is a small MoVQ ViT decoder (3 blocks, width 192, 3 heads by default) that reads the
latents exactly as the pixel decoder does (projected into its width, with the raw latents
modulating its norms) and maps every image position to a target feature instead of pixels. With
one decoder per target (HOG, DINOv2 and SigLIP patch features) the encoder must put into its few
latent tokens what those targets know about the patches it never saw. The decoders exist only in
training: the saved tokenizer does not carry them.

Training gives them the position encoding and class-token layout of the tokenizer's own decoder
(:class:`Positions`): under the released MAETok settings that is RoPE-Mixed on the image tokens,
no absolute position table (``use_ape`` false) and no class token (``dec_cls_token`` false).

Losses are taken at masked positions only: mean squared error for HOG, negative cosine for
teacher features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctok.models.vit import ViTDecoder, ViTSize

LOSS_KINDS = ("mse", "cosine")


@dataclass(frozen=True)
class Positions:
    """How a decoder encodes positions, as :class:`ctok.models.vit.ViTDecoder` takes it.

    The default is an absolute position table with a class token; ``rope_theta`` set means
    RoPE-Mixed on the image tokens (then ``use_ape`` False: no absolute table), its frequencies
    laid out for ``base_image_size``.
    """

    class_token: bool = True
    use_ape: bool = True
    rope_theta: float | None = None
    base_image_size: int | None = None


class AuxiliaryDecoder(nn.Module):
    """Latents (B, N, D) -> per-patch predictions (B, num_patches, out_dim)."""

    def __init__(self, *, image_size: int, patch_size: int, num_latent_tokens: int, latent_dim: int, out_dim: int,
                 width: int = 192, depth: int = 3, num_heads: int = 3, positions: Positions = Positions()):
        super().__init__()
        self.embed = nn.Linear(latent_dim, width)
        self.decoder = ViTDecoder(
            image_size=image_size, patch_size=patch_size, size=ViTSize(width, depth, num_heads),
            num_latent_tokens=num_latent_tokens, latent_dim=latent_dim, movq=True,
            class_token=positions.class_token, use_ape=positions.use_ape, rope_theta=positions.rope_theta,
            base_image_size=positions.base_image_size, pixel_channels=None,
        )
        self.head = nn.Linear(width, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder.forward_tokens(self.embed(z), z))


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, P) values over positions where ``mask`` is True (all positions when None).

    With no masked position the result is 0, still connected to the graph, so that every
    parameter receives a (zero) gradient and distributed training stays in step.
    """
    if mask is None:
        return per_position.mean()
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def per_position_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, P) losses: squared error averaged over features, or negative cosine similarity."""
    if prediction.shape != target.shape:
        raise ValueError(f"auxiliary prediction {tuple(prediction.shape)} does not match its target "
                         f"{tuple(target.shape)}")
    target = target.detach().to(prediction.dtype)
    if kind == "mse":
        return (prediction - target).square().mean(-1)
    if kind == "cosine":
        return -F.cosine_similarity(prediction, target, dim=-1)
    raise ValueError(f"auxiliary loss must be one of {LOSS_KINDS}, got {kind!r}")


class AuxiliaryDecoders(nn.Module):
    """One :class:`AuxiliaryDecoder` per named target, and their masked losses.

    ``targets`` maps a name (``hog``, ``dinov2``, ``siglip``) to (feature width, loss kind);
    ``positions``: the position encoding of every decoder (the tokenizer decoder's in training).
    """

    def __init__(self, targets: dict[str, tuple[int, str]], *, image_size: int, patch_size: int,
                 num_latent_tokens: int, latent_dim: int, width: int = 192, depth: int = 3, num_heads: int = 3,
                 positions: Positions = Positions()):
        super().__init__()
        for name, (_, kind) in targets.items():
            if kind not in LOSS_KINDS:
                raise ValueError(f"auxiliary target {name!r}: loss must be one of {LOSS_KINDS}, got {kind!r}")
        self.kinds = {name: kind for name, (_, kind) in targets.items()}
        self.decoders = nn.ModuleDict({
            name: AuxiliaryDecoder(image_size=image_size, patch_size=patch_size, num_latent_tokens=num_latent_tokens,
                                   latent_dim=latent_dim, out_dim=dim, width=width, depth=depth, num_heads=num_heads,
                                   positions=positions)
            for name, (dim, _) in targets.items()
        })

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None,
                targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss per target, at the masked positions of ``mask`` (B, num_patches)."""
        missing = sorted(set(self.decoders) - set(targets))
        if missing:
            raise ValueError(f"no target features given for auxiliary decoders {missing}")
        return {
            name: masked_mean(per_position_loss(decoder(z), targets[name], self.kinds[name]), mask)
            for name, decoder in self.decoders.items()
        }
