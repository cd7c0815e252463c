"""The schema of ``ctok train-tokenizer`` configs: one dataclass per YAML section, and the checks
that need more than one section.

The ``model:`` section is a mapping (a ``preset`` and/or fields of the released tokenizer
config.json), checked by :func:`tokenizer_config`. What each setting does in a step is described
in :mod:`ctok.training.tokenizer`; masking in :mod:`ctok.training.masking`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ctok.latent_analysis import QUICK_COMPONENTS
from ctok.models.teachers import DINO_DISCRIMINATOR, DINOV2_TEACHER, SIGLIP_TEACHER
from ctok.models.tokenizer import TokenizerConfig, preset_config
from ctok.training.sections import EMASection, OptimSection, RunSection


@dataclass
class DataSection:
    """``data:`` the training images."""

    images: str | None = None  # an image folder (ImageNet class sub-folders, or flat) or Fashion-MNIST's folder
    # Or webdataset shards from `ctok make-shards`: DIR/train-{000000..000127}.tar, or DIR. Item i is the
    # folder's item i, so a run on the shards is bit-identical to one on the folder.
    shards: str | None = None
    crop: Literal["random", "center"] = "random"  # ADM's random or centre crop (image folders and shards)
    flip: bool = True  # mirror each image with probability 1/2
    batch_size: int = 256  # global: over all processes and accumulation steps
    num_workers: int = 8


@dataclass
class InitSection:
    """``init:`` where the weights start."""

    encoder: str | None = None  # timm name of a pretrained ViT for the encoder (SoftVQ: DINOv2)
    encoder_file: str | None = None  # a local copy of its weights
    tokenizer: str | None = None  # stage one's checkpoint folder (or hub id) to continue from
    freeze_encoder: bool = False  # train the decoder only (MAETok's decoder fine-tuning)
    # How the tokenizer's linear layers start before any weights above are loaded: "trunc_normal"
    # (std 0.02 with zero MoVQ modulations, timm's ViT default and the original's) or "xavier"
    # (xavier-uniform weights and zero biases in every trainable linear layer, modulations included).
    # The default starts slowly, which a long run does not notice and a short one does: the MoVQ
    # decoder computes h * scale + shift at the latent positions, so zero modulations hide the
    # latents from it, and std-0.02 attention averages all patches into near-identical latent
    # tokens (on the CPU demo's tokenizer, 8 directions held 99% of the 256-number latent's
    # variance after 500 steps). With xavier it reached 22 dB PSNR in 800 steps instead of 17 dB.
    linear: Literal["trunc_normal", "xavier"] = "trunc_normal"


@dataclass
class LossSection:
    """``loss:`` reconstruction and perceptual terms."""

    reconstruction: Literal["mse", "l1"] = "mse"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_warmup: int = 10000
    lpips_vgg_file: str | None = None  # local torchvision vgg16-397923af.pth


@dataclass
class GANSection:
    """``gan:`` the discriminator, its losses and its optimizer."""

    enabled: bool = True
    discriminator: Literal["dino", "patchgan"] = "dino"
    dino_model: str = DINO_DISCRIMINATOR
    dino_file: str | None = None
    dino_input_size: int = 224
    # Larger images are shown to the DINO discriminator as one random dino_input_size window (the
    # same for the whole batch) with this probability, else area-resized: the original's 0.5.
    dino_crop_prob: float = 0.5
    dino_key_blocks: tuple[int, ...] = (2, 5, 8, 11)
    patchgan_width: int = 64
    patchgan_layers: int = 3
    loss: Literal["hinge", "non_saturating"] = "hinge"
    weight: float = 0.4
    adaptive_weight: bool = True
    start_step: int = 30000
    lecam_weight: float = 0.001
    diffaugment: bool = True
    consistency_weight: float = 4.0
    optim: OptimSection = field(default_factory=OptimSection)


@dataclass
class TeachersSection:
    """``teachers:`` the frozen feature networks (timm names) that auxiliary decoders and alignment
    regress, run at the training resolution with patch enc_patch_size; ``*_file``: local weights."""

    dinov2: str = DINOV2_TEACHER
    dinov2_file: str | None = None
    siglip: str = SIGLIP_TEACHER
    siglip_file: str | None = None
    # The statistics SigLIP's input is normalised with (teachers.INPUT_STATISTICS): ImageNet's, as
    # MAETok's training code does, or SigLIP's own 0.5 / 0.5. DINOv2 always gets ImageNet's, its own.
    siglip_normalization: Literal["imagenet", "siglip"] = "imagenet"


@dataclass
class AuxiliarySection:
    """``auxiliary:`` MAETok's shallow decoders predicting masked patches' features (weight 0: off)."""

    enabled: bool = False
    hog_weight: float = 1.0
    dinov2_weight: float = 1.0
    siglip_weight: float = 1.0
    width: int = 192
    depth: int = 3
    num_heads: int = 3


@dataclass
class AlignmentSection:
    """``alignment:`` SoftVQ's representation alignment of latent tokens with a teacher."""

    enabled: bool = False
    weight: float = 0.1
    teacher: Literal["dinov2", "siglip"] = "dinov2"
    hidden_dim: int = 1024


@dataclass
class MaskingSection:
    """``masking:`` MAETok's mask ratio per step (only for tokenizers with enc_token_drop > 0; see
    :mod:`ctok.training.masking`)."""

    schedule: Literal["published", "anneal"] = "published"
    anneal_from: float = 0.6
    anneal_steps: int = 50000


@dataclass
class SamplesSection:
    """``samples:`` the reconstruction grid (originals beside EMA reconstructions)."""

    num_images: int = 8


@dataclass
class EvalSection:
    """``eval:`` the latent dashboard (:mod:`ctok.training.dashboard`): every ``every`` steps (0: off),
    PSNR, rFID, GMM NLL and linear probe of the EMA tokenizer on ``images`` held-out images."""

    every: int = 0
    images: int = 256
    data: str | None = None  # the held-out images; None: Fashion-MNIST's test split, or the last training images
    # The rFID's feature network: the packaged Fashion-MNIST classifier (32 px images), or none (no rFID).
    feature_network: Literal["none", "fmnist-classifier"] = "none"
    components: list[int] = field(default_factory=lambda: list(QUICK_COMPONENTS))


@dataclass
class TokenizerTrainConfig:
    run: RunSection
    data: DataSection
    model: Any  # a mapping: ``preset`` and/or tokenizer config fields (checked by tokenizer_config)
    init: InitSection = field(default_factory=InitSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)
    loss: LossSection = field(default_factory=LossSection)
    gan: GANSection = field(default_factory=GANSection)
    teachers: TeachersSection = field(default_factory=TeachersSection)
    auxiliary: AuxiliarySection = field(default_factory=AuxiliarySection)
    alignment: AlignmentSection = field(default_factory=AlignmentSection)
    masking: MaskingSection = field(default_factory=MaskingSection)
    samples: SamplesSection = field(default_factory=SamplesSection)
    eval: EvalSection = field(default_factory=EvalSection)
    # Build every pretrained network (teachers, discriminator backbone, LPIPS trunk, encoder
    # initialisation) with random weights instead: for tests and smoke runs only.
    random_init_pretrained: bool = False


_TOKENIZER_KEYS = {f.name for f in dataclasses.fields(TokenizerConfig)}


def tokenizer_config(model: dict) -> dict:
    """The tokenizer config of the ``model:`` section: a preset, then explicit fields over it."""
    if not isinstance(model, dict):
        raise ValueError(f"config section 'model' must be a mapping, got {model!r}")
    allowed = _TOKENIZER_KEYS | {"preset"}
    unknown = sorted(set(model) - allowed)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'model.{k}' for k in unknown]}; valid keys of 'model': "
                         f"{sorted(allowed)}")
    fields = {k: v for k, v in model.items() if k != "preset"}
    if model.get("preset"):
        return preset_config(model["preset"], **fields)
    return fields


def check_options(cfg: TokenizerTrainConfig, tok_config: TokenizerConfig) -> None:
    """Raise ValueError, naming the keys, for settings that cannot work together."""
    masked = tok_config.enc_token_drop > 0
    if cfg.auxiliary.enabled and not masked:
        raise ValueError("auxiliary decoders predict masked patches: they need a tokenizer with "
                         "model.enc_token_drop > 0 (MAETok)")
    if cfg.init.freeze_encoder and cfg.auxiliary.enabled:
        raise ValueError("init.freeze_encoder (decoder fine-tuning) drops the auxiliary decoders: set "
                         "auxiliary.enabled=false")
    if cfg.masking.schedule == "anneal" and not masked:
        raise ValueError("masking.schedule=anneal needs a tokenizer with model.enc_token_drop > 0")
    if cfg.samples.num_images < 1:
        raise ValueError(f"samples.num_images must be at least 1, got {cfg.samples.num_images}")
    if cfg.eval.every < 0 or cfg.eval.images < 10:
        raise ValueError(f"eval.every must be >= 0 (0: no dashboard) and eval.images >= 10, got "
                         f"{cfg.eval.every} and {cfg.eval.images}")
    if cfg.eval.every and cfg.eval.feature_network == "fmnist-classifier" and tok_config.image_size != 32:
        raise ValueError(f"eval.feature_network=fmnist-classifier reads 32 px images; this tokenizer makes "
                         f"{tok_config.image_size} px ones: set eval.feature_network=none")

