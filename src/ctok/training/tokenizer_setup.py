"""What a tokenizer training run is built from: its images, the pretrained networks it needs,
and the networks it trains, initialised as the ``init:`` section says.

The builders run in a fixed order in :func:`ctok.training.tokenizer.train_tokenizer`: each one that
initialises weights draws from the process-global generator, so the order is part of the run.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ctok.features.hog import hog_feature_dim
from ctok.hub import resolve
from ctok.losses.alignment import alignment_projection
from ctok.models.auxiliary_decoders import AuxiliaryDecoders, Positions
from ctok.models.discriminators import DinoDiscriminator, PatchGANDiscriminator
from ctok.models.files import load_weights, read_weights
from ctok.models.teachers import (
    VGG16,
    FrozenViTFeatures,
    WeightsRequest,
    create_vit,
    feature_teacher,
    load_pretrained_encoder,
)
from ctok.models.tokenizer import Tokenizer, TokenizerConfig
from ctok.training.masking import MaskSchedule
from ctok.training.tokenizer_config import GANSection, TokenizerTrainConfig


def reference_images(dataset: Dataset, count: int) -> torch.Tensor:
    """The first ``count`` readable images of ``dataset``: the grid's fixed originals."""
    from ctok.data.images import BrokenImage

    images = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if not isinstance(sample, BrokenImage):
            images.append(sample[0])
        if len(images) == count:
            break
    return torch.stack(images)


def pretrained_requests(cfg: TokenizerTrainConfig) -> list[WeightsRequest]:
    """Every pretrained network this config needs, for :func:`locate_all`."""
    needed = []
    if cfg.init.encoder:
        needed.append(WeightsRequest("encoder initialisation", cfg.init.encoder, cfg.init.encoder_file,
                                     "init.encoder_file"))
    if cfg.loss.perceptual_weight > 0:
        needed.append(WeightsRequest("LPIPS VGG16 trunk", VGG16, cfg.loss.lpips_vgg_file, "loss.lpips_vgg_file"))
    if cfg.gan.enabled and cfg.gan.discriminator == "dino":
        needed.append(WeightsRequest("DINO discriminator backbone", cfg.gan.dino_model, cfg.gan.dino_file,
                                     "gan.dino_file"))
    for name in teachers_needed(cfg):
        needed.append(WeightsRequest(f"{name} teacher", getattr(cfg.teachers, name),
                                     getattr(cfg.teachers, f"{name}_file"), f"teachers.{name}_file"))
    return needed


def teachers_needed(cfg: TokenizerTrainConfig) -> list[str]:
    """Names of the feature teachers the auxiliary decoders and the alignment regress."""
    names = []
    if cfg.auxiliary.enabled:
        names += [n for n in ("dinov2", "siglip") if getattr(cfg.auxiliary, f"{n}_weight") > 0]
    if cfg.alignment.enabled and cfg.alignment.teacher not in names:
        names.append(cfg.alignment.teacher)
    return names


def build_discriminator(gan: GANSection, weights: Path | None) -> nn.Module:
    """The ``gan.discriminator`` network; ``weights``: the DINO backbone's local file."""
    if gan.discriminator == "patchgan":
        return PatchGANDiscriminator(width=gan.patchgan_width, num_layers=gan.patchgan_layers)
    backbone = create_vit(gan.dino_model, image_size=gan.dino_input_size, patch_size=16, weights=weights)
    return DinoDiscriminator(backbone, input_size=gan.dino_input_size, key_blocks=tuple(gan.dino_key_blocks),
                             crop_prob=gan.dino_crop_prob)


def init_linear_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every trainable ``nn.Linear`` in ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and layer.weight.requires_grad:
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def build_tokenizer(cfg: TokenizerTrainConfig, tok_config: dict, found: dict[str, Path]) -> Tokenizer:
    """The tokenizer to train: its linear init, then a pretrained encoder or stage one's checkpoint folder, then
    the encoder frozen for decoder fine-tuning. ``found``: local weight files by request name."""
    tokenizer = Tokenizer.from_config(tok_config)
    c = tokenizer.config
    if cfg.init.linear == "xavier":
        init_linear_xavier(tokenizer)
    if cfg.init.encoder and not cfg.random_init_pretrained:
        load_pretrained_encoder(tokenizer.encoder.model, cfg.init.encoder, image_size=c.image_size,
                                patch_size=c.enc_patch_size, weights=found.get("encoder initialisation"))
    if cfg.init.tokenizer:
        load_weights(tokenizer, read_weights(resolve(cfg.init.tokenizer)), cfg.init.tokenizer)
    if cfg.init.freeze_encoder:
        tokenizer.encoder.requires_grad_(False)
        tokenizer.quant_conv.requires_grad_(False)
        if tokenizer.quantize is not None:
            tokenizer.quantize.requires_grad_(False)
    return tokenizer


def build_teachers(cfg: TokenizerTrainConfig, c: TokenizerConfig,
                   found: dict[str, Path]) -> dict[str, FrozenViTFeatures]:
    """The frozen feature teachers, by name, at the tokenizer's resolution and patch size, fed
    ImageNet-normalised images (SigLIP: ``teachers.siglip_normalization``)."""
    normalization = {"dinov2": "imagenet", "siglip": cfg.teachers.siglip_normalization}
    return {name: feature_teacher(getattr(cfg.teachers, name), image_size=c.image_size,
                                  patch_size=c.enc_patch_size, weights=found.get(f"{name} teacher"),
                                  normalization=normalization[name])
            for name in teachers_needed(cfg)}


def build_heads(cfg: TokenizerTrainConfig, c: TokenizerConfig, teachers: dict[str, FrozenViTFeatures]
                ) -> tuple[nn.Module | None, AuxiliaryDecoders | None]:
    """The training-only heads on the latents: SoftVQ's alignment projection, MAETok's auxiliary decoders."""
    projection = None
    if cfg.alignment.enabled:
        width = teachers[cfg.alignment.teacher].feature_dim
        projection = alignment_projection(c.codebook_embed_dim, width, cfg.alignment.hidden_dim)
    auxiliary = None
    if cfg.auxiliary.enabled:
        targets = {"hog": (hog_feature_dim(patch_size=c.enc_patch_size), "mse")} if cfg.auxiliary.hog_weight > 0 else {}
        targets.update({n: (teachers[n].feature_dim, "cosine") for n in ("dinov2", "siglip") if n in teachers})
        auxiliary = AuxiliaryDecoders(targets, image_size=c.image_size, patch_size=c.enc_patch_size,
                                      num_latent_tokens=c.num_latent_tokens, latent_dim=c.codebook_embed_dim,
                                      width=cfg.auxiliary.width, depth=cfg.auxiliary.depth,
                                      num_heads=cfg.auxiliary.num_heads, positions=decoder_positions(c))
    return projection, auxiliary


def decoder_positions(c: TokenizerConfig) -> Positions:
    """The position encoding of the tokenizer's decoder, for the auxiliary decoders: with ``use_rope``
    RoPE-Mixed replaces the absolute table (the rule :class:`ctok.models.tokenizer.Tokenizer` builds
    its decoder by), and the class token follows ``dec_cls_token``."""
    return Positions(class_token=c.dec_cls_token, use_ape=not c.use_rope,
                     rope_theta=c.rope_theta if c.use_rope else None, base_image_size=c.base_image_size)


def build_mask_schedule(cfg: TokenizerTrainConfig, tokenizer: Tokenizer) -> MaskSchedule | None:
    """MAETok's mask ratio per step, as ``masking:`` says; None for a tokenizer without a mask token."""
    if not tokenizer.masks_tokens:
        return None
    c = tokenizer.config
    return MaskSchedule(c.enc_token_drop, c.enc_token_drop_max, schedule=cfg.masking.schedule,
                        start=cfg.masking.anneal_from, steps=cfg.masking.anneal_steps)


def skips_parameters(tokenizer: Tokenizer, masks: MaskSchedule | None) -> bool:
    """Whether a step may leave a trainable parameter out of the loss, which DDP must be told of.

    That is the encoder's mask token at an unmasked step (the ratio rounds to no patch: annealed
    to 0, or a published lowest ratio under half a patch), unless the encoder is frozen. Every
    other parameter takes part in every step: the auxiliary decoders' losses average over all
    patches when nothing is masked, and the discriminator is only run on the steps it is trained.
    """
    return (masks is not None and masks.may_mask_nothing(tokenizer.num_patches)
            and tokenizer.encoder.mask_token.requires_grad)
