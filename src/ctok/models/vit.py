"""ViT encoder and decoder of the 1-D tokenizers.

Encoder: patches of the image, a class token and learned position embeddings, then
``num_latent_tokens`` learnable latent tokens appended after the image tokens. After the blocks
and the final norm, the latent tokens are the output: the image's 1-D representation.

Decoder: one shared learned mask token at every image position, followed by the projected
latents with their own position embedding. The blocks let the mask tokens read the latents;
the image positions are then mapped linearly to patch pixels. In MoVQ decoders (MAETok) the
norms have no affine parameters: at the latent positions their scale and shift are predicted
from the raw latents instead.

Image tokens may additionally carry 2-D RoPE-Mixed rotations (see :mod:`ctok.models.rope`);
class and latent tokens are never rotated. Module and parameter names follow the released
checkpoints (a timm-style ``model`` holding ``patch_embed``, ``cls_token``, ``pos_embed``,
``blocks``, ``norm``), so their state dicts load unchanged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed, trunc_normal_

from ctok.models.checkpointing import BlockStack
from ctok.models.rope import apply_rotation, grid_positions, init_mixed_frequencies, rotation_angles, rotation_tables


@dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    num_heads: int


# DINOv2-style ViTs by the timm names the released configs use (the patch size in the name is
# DINOv2's own; the tokenizers override it with enc_patch_size / dec_patch_size).
VIT_SIZES = {
    "tiny": ViTSize(192, 12, 3),
    "small": ViTSize(384, 12, 6),
    "base": ViTSize(768, 12, 12),
    "large": ViTSize(1024, 24, 16),
}
_NAME = re.compile(r"^vit_(?P<size>tiny|small|base|large)_patch14_dinov2(?P<movq>_movq(v2)?)?(\.lvd142m)?$")


def parse_vit_name(name: str, override: list | tuple | None = None) -> tuple[ViTSize, bool]:
    """(size, uses MoVQ blocks) of a model name such as ``vit_base_patch14_dinov2_movqv2``.

    ``override`` ([width, depth, heads]) replaces the size the name implies.
    """
    match = _NAME.match(name)
    if match is None:
        raise ValueError(
            f"unsupported ViT {name!r}: ctok builds vit_{{tiny,small,base,large}}_patch14_dinov2[.lvd142m] "
            "and their _movqv2 decoder variants"
        )
    size = VIT_SIZES[match["size"]]
    if override is not None:
        if len(override) != 3 or override[0] % override[2]:
            raise ValueError("a ViT size override is [width, depth, heads] with width divisible by heads, "
                             f"got {override}")
        size = ViTSize(*(int(v) for v in override))
    return size, match["movq"] is not None


RopeArgs = torch.Tensor  # one layer's complex rotation table, see rope.rotation_tables


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RopeArgs | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rotation(q, rope), apply_rotation(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def _add_scaled(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, drop_path: nn.Module) -> torch.Tensor:
    """x + drop_path(y * gamma), as one fused kernel when there is no drop path (inference)."""
    if isinstance(drop_path, nn.Identity):
        return torch.addcmul(x, y, gamma)
    return x + drop_path(y * gamma)


class Block(nn.Module):
    """DINOv2 block: pre-norm attention and MLP, each scaled by LayerScale."""

    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim, init_values=1e-5)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, latents: torch.Tensor | None = None, rope: RopeArgs | None = None):
        x = _add_scaled(x, self.attn(self.norm1(x), rope), self.ls1.gamma, self.drop_path)
        return _add_scaled(x, self.mlp(self.norm2(x)), self.ls2.gamma, self.drop_path)


def _modulate_tail(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Scale and shift the last ``shift.shape[1]`` positions (the latent tokens); others pass through.

    The modulation is ``h * scale + shift`` (not ``1 + scale``): the released weights use it so.
    """
    n = shift.shape[1]
    # Written into h (a fresh norm output) instead of concatenating a new sequence; the tail is
    # cloned because autograd keeps it for the gradient of ``scale``.
    h[:, -n:] = torch.addcmul(shift, h[:, -n:].clone(), scale)
    return h


class MoVQBlock(nn.Module):
    """Decoder block whose norms take their scale/shift at latent positions from the raw latents."""

    def __init__(self, dim: int, num_heads: int, latent_dim: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 4 * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, latents: torch.Tensor, rope: RopeArgs | None = None):
        shift1, scale1, shift2, scale2 = self.adaLN_modulation(latents).chunk(4, dim=-1)
        x = x + self.drop_path(self.attn(_modulate_tail(self.norm1(x), shift1, scale1), rope))
        return x + self.drop_path(self.mlp(_modulate_tail(self.norm2(x), shift2, scale2)))


class MoVQNorm(nn.Module):
    def __init__(self, dim: int, latent_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 2 * dim))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(latents).chunk(2, dim=-1)
        return _modulate_tail(self.norm(x), shift, scale)


class ViTBackbone(nn.Module):
    """The part named ``model`` in the checkpoints: patch embedding, tokens, blocks, final norm.

    ``pos_embed`` always has a row for the class token, even where the class token was removed
    (MAETok's decoder): the released checkpoints were made that way.
    """

    def __init__(self, image_size: int, patch_size: int, size: ViTSize, *, class_token: bool,
                 movq_latent_dim: int | None = None, drop_path_rate: float = 0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, size.width)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.width)) if class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches + 1, size.width) * 0.02)
        rates = [drop_path_rate * i / max(size.depth - 1, 1) for i in range(size.depth)]
        if movq_latent_dim is None:
            self.blocks = nn.ModuleList(Block(size.width, size.num_heads, r) for r in rates)
            self.norm = nn.LayerNorm(size.width, eps=1e-6)
        else:
            self.blocks = nn.ModuleList(MoVQBlock(size.width, size.num_heads, movq_latent_dim, r) for r in rates)
            self.norm = MoVQNorm(size.width, movq_latent_dim)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_linear)
        # MoVQ modulations start at zero: latent positions begin as plain normalised tokens.
        for module in self.modules():
            if hasattr(module, "adaLN_modulation"):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token is not None)

    def with_class_token(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return x
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class LatentViT(BlockStack, nn.Module):
    """What encoder and decoder share: the backbone, the latent position embedding and RoPE.

    Its blocks are recomputed in the backward pass under activation checkpointing
    (:mod:`ctok.models.checkpointing`).
    """

    def __init__(self, image_size: int, patch_size: int, size: ViTSize, num_latent_tokens: int, *,
                 class_token: bool, movq_latent_dim: int | None, drop_path_rate: float,
                 rope_theta: float | None, base_image_size: int | None):
        super().__init__()
        self.model = ViTBackbone(image_size, patch_size, size, class_token=class_token,
                                 movq_latent_dim=movq_latent_dim, drop_path_rate=drop_path_rate)
        self.grid = image_size // patch_size
        self.num_heads = size.num_heads
        self.num_latent_tokens = num_latent_tokens
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, num_latent_tokens, size.width))
        trunc_normal_(self.latent_pos_embed, std=0.02)
        self.use_rope = rope_theta is not None
        if self.use_rope:
            self.freqs = nn.Parameter(
                init_mixed_frequencies(size.depth, size.num_heads, size.width // size.num_heads, rope_theta)
            )
            # Patch grid the frequencies were trained on; stored in the checkpoints as buffers.
            base_grid = (base_image_size or image_size) // patch_size
            pos_x, pos_y = grid_positions(base_grid, base_grid)
            self.register_buffer("freqs_t_x", pos_x)
            self.register_buffer("freqs_t_y", pos_y)
            if base_grid != self.grid:
                # Trained at base_image_size: the rotations use the positions of the actual grid. Kept
                # as buffers outside the checkpoint, so they move with the model and a forward does not
                # rebuild them on the CPU and copy them to the device. Built on the CPU even when the
                # model is built on the meta device (from_pretrained): no checkpoint fills them in.
                pos_x, pos_y = grid_positions(self.grid, self.grid, device="cpu")
                self.register_buffer("grid_x", pos_x, persistent=False)
                self.register_buffer("grid_y", pos_y, persistent=False)

    def _rope_angles(self) -> torch.Tensor:
        if hasattr(self, "grid_x"):
            return rotation_angles(self.freqs, self.grid_x, self.grid_y, self.num_heads)
        return rotation_angles(self.freqs, self.freqs_t_x, self.freqs_t_y, self.num_heads)

    def run_blocks(self, x: torch.Tensor, latents: torch.Tensor | None) -> torch.Tensor:
        """The block stack; RoPE (if any) rotates the image tokens, which follow the prefix tokens."""
        if not self.use_rope:
            for block in self.model.blocks:
                x = self.run_block(block, x, latents)
            return x
        tables = rotation_tables(self._rope_angles(), self.model.num_prefix_tokens, x.shape[1])
        for block, table in zip(self.model.blocks, tables):
            x = self.run_block(block, x, latents, table)
        return x


class ViTEncoder(LatentViT):
    """Image (B, 3, H, W) -> latent tokens (B, num_latent_tokens, width) after the final norm.

    The encoder always adds its learned absolute position embedding (class slot included); RoPE,
    when configured, rotates the image tokens in addition. ``mask`` (B, num_patches, True =
    masked) replaces those patch embeddings by the learned mask token, for MAETok's mask modelling.
    """

    def __init__(self, *, image_size: int, patch_size: int, size: ViTSize, num_latent_tokens: int,
                 rope_theta: float | None = None, base_image_size: int | None = None,
                 mask_token: bool = False, drop_path_rate: float = 0.0):
        super().__init__(image_size, patch_size, size, num_latent_tokens, class_token=True, movq_latent_dim=None,
                         drop_path_rate=drop_path_rate, rope_theta=rope_theta, base_image_size=base_image_size)
        self.latent_tokens = nn.Parameter(torch.randn(1, num_latent_tokens, size.width) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(1, 1, size.width) * 0.02) if mask_token else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.model.patch_embed(x)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this encoder has no mask token (config enc_token_drop is 0)")
            h = torch.where(mask.unsqueeze(-1), self.mask_token.to(h.dtype), h)
        h = self.model.with_class_token(h) + self.model.pos_embed
        latents = (self.latent_tokens + self.latent_pos_embed).expand(h.shape[0], -1, -1)
        h = self.run_blocks(torch.cat([h, latents], dim=1), None)
        return self.model.norm(h)[:, -self.num_latent_tokens:]


class PixelHead(nn.Module):
    """Linear map of each image token to its patch's pixels, then the patches put back in place."""

    def __init__(self, width: int, patch_size: int, channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.channels = channels
        self.model = nn.Linear(width, channels * patch_size * patch_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        g, p = int(round(n ** 0.5)), self.patch_size
        patches = self.model(tokens).view(b, g, g, p, p, self.channels)
        return torch.einsum("bhwpqc->bchpwq", patches).reshape(b, self.channels, g * p, g * p)


class ViTDecoder(LatentViT):
    """Latents -> image tokens (``forward_tokens``) -> pixels (``forward``, when it has a pixel head).

    ``z`` is the latent projected to the decoder width; MoVQ decoders also take the raw latent
    ``latents`` (B, num_latent_tokens, latent_dim) that modulates their norms. The auxiliary
    decoders of MAETok training reuse this class with ``pixel_channels=None`` and a head of their own.
    """

    def __init__(self, *, image_size: int, patch_size: int, size: ViTSize, num_latent_tokens: int,
                 latent_dim: int | None = None, movq: bool = False, class_token: bool = True,
                 use_ape: bool = True, rope_theta: float | None = None, base_image_size: int | None = None,
                 drop_path_rate: float = 0.0, pixel_channels: int | None = 3):
        if movq and latent_dim is None:
            raise ValueError("a MoVQ decoder needs latent_dim")
        if use_ape and not class_token:
            raise ValueError("absolute position embeddings in the decoder need its class token (dec_cls_token)")
        super().__init__(image_size, patch_size, size, num_latent_tokens, class_token=class_token,
                         movq_latent_dim=latent_dim if movq else None, drop_path_rate=drop_path_rate,
                         rope_theta=rope_theta, base_image_size=base_image_size)
        # The released checkpoints carry a patch embedding (and, without APE, a position table)
        # that the decoder never uses; they are kept for a lossless round trip, and frozen.
        self.model.patch_embed.requires_grad_(False)
        self.model.pos_embed.requires_grad_(use_ape)
        self.movq = movq
        self.use_ape = use_ape
        self.mask_token = nn.Parameter(torch.randn(1, 1, size.width) * 0.02)
        self.to_pixel = PixelHead(size.width, patch_size, pixel_channels) if pixel_channels else None

    def forward_tokens(self, z: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder features at the image positions, (B, num_patches, width), after the final norm."""
        if self.movq and latents is None:
            raise ValueError("a MoVQ decoder needs the raw latents")
        n_img = self.grid * self.grid
        x = self.model.with_class_token(self.mask_token.expand(z.shape[0], n_img, -1))
        if self.use_ape:
            x = x + self.model.pos_embed
        x = self.run_blocks(torch.cat([x, z + self.latent_pos_embed], dim=1), latents if self.movq else None)
        x = self.model.norm(x, latents) if self.movq else self.model.norm(x)
        start = self.model.num_prefix_tokens
        return x[:, start:start + n_img]

    def forward(self, z: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        return self.to_pixel(self.forward_tokens(z, latents))
