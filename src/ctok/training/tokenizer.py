"""Training SoftVQ-VAE and MAETok tokenizers: ``ctok train-tokenizer``.

One step, for a batch of images x in [-1, 1] (mirrored per sample when ``data.flip``)::

    mask    MAETok: a share r of image patches per sample, r drawn once per step (below)
    x̂, z    the tokenizer's training forward (masked encoder, decoder)
    L_G =   w_rec |x - x̂|^2  +  w_p(step) LPIPS(x, x̂)                     (nll)
          + SoftVQ entropy loss  +  w_align L_align(z)                     (SoftVQ)
          + sum_t w_t L_aux,t(z, mask)                                      (MAETok)
          + λ(step) w_gan  L_gen(D(A(x̂)))                                  (from gan.start_step)
    L_D =   w_gan (L_disc(D(A(x)), D(A(x̂))) + w_lecam R_LeCAM)  +  w_cr L_cr  (from gan.start_step)

``w_p`` ramps linearly over ``loss.perceptual_warmup`` steps; ``λ`` is the adaptive weight
``||∇L_nll|| / ||∇L_gen||`` at the decoder's last layer; ``A`` is DiffAugment. Scaling the
discriminator loss by ``w_gan`` while the consistency term is not follows the original code.
The mask ratio is drawn from the published truncated normal on [enc_token_drop,
enc_token_drop_max] (loc = the upper bound, scale 0.25) in stage one, and annealed linearly from
``masking.anneal_from`` to 0 over ``masking.anneal_steps`` in MAETok's decoder fine-tuning stage,
which starts from a stage-one export (``init.tokenizer``) with the encoder frozen and no
auxiliary decoders.

All the shared machinery (DDP, accumulation, AdamW with the warm-up + cosine schedule, clipping,
EMA, checkpoints, logs) is :class:`ctok.training.runner.Runner`'s; this module plugs in a task. Every
random number a step uses is drawn per sample from the step's :class:`BatchRandom` (or, for the
per-step mask ratio, from a generator seeded by (seed, step)), and every batch statistic (batch
norm in the discriminator, LeCAM anchors, the adaptive weight) spans all processes, so N
processes train like one process with the whole batch. Random crops (``data.crop: random``) are
the exception: the dataset draws them in each process.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import truncnorm
from torch.utils.data import Dataset
from tqdm import tqdm

from ctok.features.hog import hog_feature_dim, hog_patch_targets
from ctok.losses.adversarial import LeCAM, adaptive_generator_weight, gan_losses, gan_weight_at
from ctok.losses.alignment import alignment_loss, alignment_projection
from ctok.losses.consistency import consistency_loss, strong_augment
from ctok.losses.diffaugment import DiffAugment, Uniform
from ctok.losses.perceptual import LPIPSLoss, perceptual_weight_at
from ctok.models.auxiliary_decoders import AuxiliaryDecoders
from ctok.models.discriminators import DinoDiscriminator, PatchGANDiscriminator
from ctok.models.teachers import (DINO_DISCRIMINATOR, DINOV2_TEACHER, SIGLIP_TEACHER, VGG16, FrozenViTFeatures,
                                  WeightsRequest, create_vit, feature_teacher, load_pretrained_encoder, locate_all)
from ctok.models.tokenizer import Tokenizer, TokenizerConfig, config_from_dict, preset_config
from ctok.training.config import config_to_dict
from ctok.training.distributed import init_distributed, shutdown_distributed
from ctok.training.runner import EMASection, OptimSection, Runner, RunSection
from ctok.training.sharding import BatchRandom, derived_seed

_MASK_STREAM = 2  # seed stream of the per-step mask ratio (0 and 1 are the runner's)


# -- configuration ---------------------------------------------------------------------------
@dataclass
class DataSection:
    """``data:`` the training images."""

    images: str | None = None  # an image folder (ImageNet class sub-folders, or flat) or Fashion-MNIST's folder
    crop: Literal["random", "center"] = "random"  # ADM's random or centre crop (image folders only)
    flip: bool = True  # mirror each image with probability 1/2
    batch_size: int = 256  # global: over all processes and accumulation steps
    num_workers: int = 8


@dataclass
class InitSection:
    """``init:`` where the weights start."""

    encoder: str | None = None  # timm name of a pretrained ViT for the encoder (SoftVQ: DINOv2)
    encoder_file: str | None = None  # a local copy of its weights
    tokenizer: str | None = None  # a stage-one export (folder or hub id) to continue from
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
    """``masking:`` MAETok's mask ratio per step (only for tokenizers with enc_token_drop > 0)."""

    schedule: Literal["published", "anneal"] = "published"
    anneal_from: float = 0.6
    anneal_steps: int = 50000


@dataclass
class SamplesSection:
    """``samples:`` the reconstruction grid (originals beside EMA reconstructions)."""

    num_images: int = 8


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
    # Build every pretrained network (teachers, discriminator backbone, LPIPS trunk, encoder
    # initialisation) with random weights instead: for tests and smoke runs only.
    random_init_pretrained: bool = False


_TOKENIZER_KEYS = {f.name for f in dataclasses.fields(TokenizerConfig)} - {"extra"}


def tokenizer_config(model: dict) -> dict:
    """The tokenizer config of the ``model:`` section: a preset, then explicit fields over it."""
    if not isinstance(model, dict):
        raise ValueError(f"config section 'model' must be a mapping, got {model!r}")
    allowed = _TOKENIZER_KEYS | {"preset", "tokenizer_kind"}
    unknown = sorted(set(model) - allowed)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'model.{k}' for k in unknown]}; valid keys of 'model': "
                         f"{sorted(allowed)}")
    fields = {k: v for k, v in model.items() if k != "preset"}
    if model.get("preset"):
        return preset_config(model["preset"], **fields)
    return fields


# -- the mask --------------------------------------------------------------------------------
class MaskSchedule:
    """The share of image patches masked at each step.

    ``published``: one draw per step from a normal (loc ``high``, scale 0.25) truncated to
    [``low``, ``high``], by inverse CDF from a uniform ``u``. ``anneal``: ``start`` x (1 - step /
    steps), floored at 0.
    """

    def __init__(self, low: float, high: float, *, schedule: str = "published", start: float = 0.6,
                 steps: int = 50000):
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"mask ratios need 0 <= enc_token_drop <= enc_token_drop_max < 1, got {low}, {high}")
        if schedule == "anneal" and steps < 1:
            raise ValueError(f"masking.anneal_steps must be at least 1, got {steps}")
        self.schedule = schedule
        self.start = start
        self.steps = steps
        self.distribution = truncnorm((low - high) / 0.25, 0.0, loc=high, scale=0.25)

    def ratio(self, step: int, u: float) -> float:
        if self.schedule == "anneal":
            return max(0.0, self.start * (1.0 - step / self.steps))
        return float(self.distribution.ppf(u))


def random_patch_mask(uniform: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """(B, P) bool masking ``round(ratio * P)`` patches per row, chosen by ``uniform`` (B, P) draws."""
    k = int(round(ratio * uniform.shape[1]))
    if k == 0:
        return None
    return uniform.argsort(dim=1).argsort(dim=1) < k


# -- the trained modules ---------------------------------------------------------------------
@dataclass
class TokenizerForward:
    rec: torch.Tensor
    z: torch.Tensor
    entropy_loss: torch.Tensor
    codebook_usage: float
    alignment: torch.Tensor | None  # projected latents (B, N, teacher width)
    auxiliary: dict[str, torch.Tensor]  # loss per auxiliary target


class TokenizerTrainingModel(nn.Module):
    """What the main optimizer trains: the tokenizer and its training-only heads.

    One forward pass runs all of them, so that DistributedDataParallel sees a single graph. The
    alignment MLP is ``projection`` (``projection.0/2/4``, the original's names).
    """

    def __init__(self, tokenizer: Tokenizer, projection: nn.Module | None, auxiliary: AuxiliaryDecoders | None):
        super().__init__()
        self.tokenizer = tokenizer
        self.projection = projection
        self.auxiliary = auxiliary

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None,
                aux_targets: dict[str, torch.Tensor]) -> TokenizerForward:
        # The trainer decides the masking: None is an unmasked step (an annealed ratio that reached
        # 0, or rounds to no patch), which must not fall back to the tokenizer's own published draw.
        out = self.tokenizer.training_forward(images, mask_ratio=0.0 if mask is None else None, mask=mask)
        projected = self.projection(out.z) if self.projection is not None else None
        aux = self.auxiliary(out.z, mask, aux_targets) if self.auxiliary is not None else {}
        return TokenizerForward(out.rec, out.z, out.entropy_loss, out.codebook_usage, projected, aux)


class DiscriminatorObjective(nn.Module):
    """The discriminator and its loss; one forward computes L_D (see the module docstring)."""

    def __init__(self, discriminator: nn.Module, *, loss: str, lecam_weight: float, consistency_weight: float,
                 diffaugment: bool):
        super().__init__()
        self.discriminator = discriminator
        self.loss, _ = gan_losses(loss)
        self.lecam = LeCAM() if lecam_weight > 0 else None
        self.lecam_weight = lecam_weight
        self.consistency_weight = consistency_weight
        self.augment = DiffAugment() if diffaugment else None
        self.strong_augment = strong_augment()

    def forward(self, real: torch.Tensor, fake: torch.Tensor, rand: Uniform, gan_weight: float) -> dict[str, torch.Tensor]:
        real, fake = real.detach(), fake.detach()
        seen_real = self.augment(real, rand) if self.augment else real
        seen_fake = self.augment(fake, rand) if self.augment else fake
        logits_real = self.discriminator(seen_real)
        logits_fake = self.discriminator(seen_fake)
        loss = self.loss(logits_real, logits_fake)
        out = {"disc/logits_real": logits_real.detach().mean(), "disc/logits_fake": logits_fake.detach().mean(),
               "disc/adversarial": loss.detach()}
        if self.lecam is not None:
            self.lecam.update(logits_real, logits_fake)
            lecam = self.lecam(logits_real, logits_fake)
            loss = loss + self.lecam_weight * lecam
            out["disc/lecam"] = lecam.detach()
        loss = gan_weight * loss
        if self.consistency_weight > 0:
            cr = consistency_loss(self.discriminator, real, fake, logits_real, logits_fake, self.strong_augment, rand)
            loss = loss + self.consistency_weight * cr
            out["disc/consistency"] = cr.detach()
        out["loss/discriminator"] = loss
        return out


# -- the task --------------------------------------------------------------------------------
class TokenizerTask:
    """The runner's task: L_G for ``model`` and L_D for ``discriminator`` per micro-batch."""

    def __init__(self, cfg: TokenizerTrainConfig, runner: Runner, model: nn.Module, discriminator: nn.Module | None,
                 lpips: LPIPSLoss | None, teachers: dict[str, FrozenViTFeatures], masks: MaskSchedule | None,
                 sample_images: torch.Tensor):
        self.cfg = cfg
        self.runner = runner
        self.model = model  # what to call: DDP-wrapped under torchrun
        self.plain = runner.module("model")
        self.discriminator = discriminator
        self.lpips = lpips
        self.teachers = teachers
        self.masks = masks
        self.fixed_images = sample_images
        self.patch_size = self.plain.tokenizer.config.enc_patch_size
        self.gen_loss = gan_losses(cfg.gan.loss)[1]
        self.gen_augment = DiffAugment() if cfg.gan.diffaugment else None

    def training_step(self, batch, step: int, rng: BatchRandom) -> dict[str, torch.Tensor]:
        images, skipped = batch[0], getattr(batch, "skipped", ())
        if skipped:
            tqdm.write(f"step {step}: skipped {len(skipped)} unreadable image file(s): {', '.join(skipped[:3])}"
                       + (" ..." if len(skipped) > 3 else ""))
        n = images.shape[0]
        if n == 0:
            raise ValueError(f"every file of a micro-batch at step {step} was unreadable: {list(skipped)[:5]}")

        def rand(*shape: int) -> torch.Tensor:  # per-sample draws; a batch short of broken files uses the first rows
            return rng.rand(*shape)[:n]

        if self.cfg.data.flip:
            images = torch.where((rand() < 0.5)[:, None, None, None], images.flip(-1), images)
        metrics: dict[str, torch.Tensor] = {"skipped_files": torch.tensor(float(len(skipped)))}

        mask = None
        if self.masks is not None:
            g = torch.Generator().manual_seed(derived_seed(self.cfg.run.seed, _MASK_STREAM, step))
            ratio = self.masks.ratio(step, float(torch.rand((), generator=g)))
            mask = random_patch_mask(rand(self.plain.tokenizer.num_patches), ratio)
            metrics["mask_ratio"] = torch.tensor(ratio)

        out = self.model(images, mask, self._aux_targets(images))
        rec = out.rec.float()
        rec_loss = (F.mse_loss if self.cfg.loss.reconstruction == "mse" else F.l1_loss)(rec, images)
        nll = self.cfg.loss.reconstruction_weight * rec_loss
        if self.lpips is not None:
            p_loss = self.lpips(images, rec)
            nll = nll + perceptual_weight_at(step, self.cfg.loss.perceptual_weight, self.cfg.loss.perceptual_warmup) * p_loss
            metrics["lpips"] = p_loss.detach()
        loss = nll + out.entropy_loss
        metrics["rec"] = rec_loss.detach()
        if self.plain.tokenizer.quantize is not None:
            metrics.update({"entropy": out.entropy_loss.detach(), "codebook_usage": torch.tensor(float(out.codebook_usage))})
        if out.alignment is not None:
            align = alignment_loss(out.alignment.float(), self.teachers[self.cfg.alignment.teacher](images))
            loss = loss + self.cfg.alignment.weight * align
            metrics["align"] = align.detach()
        for name, value in out.auxiliary.items():
            loss = loss + getattr(self.cfg.auxiliary, f"{name}_weight") * value
            metrics[f"aux/{name}"] = value.detach()

        gan_weight = gan_weight_at(step, self.cfg.gan.weight, self.cfg.gan.start_step)
        disc_out = {}
        if self.discriminator is not None and gan_weight > 0:
            critic = self.runner.module("discriminator").discriminator
            seen = self.gen_augment(rec, rand) if self.gen_augment else rec
            g_loss = self.gen_loss(critic(seen))
            adaptive = (adaptive_generator_weight(nll, g_loss, self.plain.tokenizer.last_layer)
                        if self.cfg.gan.adaptive_weight else torch.tensor(1.0))
            loss = loss + adaptive * gan_weight * g_loss
            metrics.update({"gan/generator": g_loss.detach(), "gan/adaptive_weight": adaptive})
            disc_out = self.discriminator(images, rec, rand, gan_weight)
        # "loss" first: the runner back-propagates in this order, keeping the graph for the next.
        return {"loss": loss, **disc_out, **metrics}

    @torch.no_grad()
    def _aux_targets(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        aux = self.plain.auxiliary
        if aux is None:
            return {}
        targets = {}
        for name in aux.decoders:
            targets[name] = (hog_patch_targets(images.float(), patch_size=self.patch_size) if name == "hog"
                             else self.teachers[name](images))
        return targets

    @torch.no_grad()
    def sample_images(self, step: int) -> torch.Tensor:
        """Pairs (original, EMA reconstruction), side by side."""
        tokenizer = self.runner.ema_module("model").tokenizer.eval()
        x = self.fixed_images
        rec = tokenizer(x).float().clamp(-1, 1)
        return torch.stack([x, rec], dim=1).flatten(0, 1)


# -- building the run ------------------------------------------------------------------------
def open_training_images(data: DataSection, image_size: int) -> Dataset:
    """Fashion-MNIST when ``data.images`` holds its files, else an image folder with ADM crops."""
    from ctok.data import fashion_mnist
    from ctok.data.images import ImageFolder

    try:
        folder = fashion_mnist.find_fashion_mnist(data.images, download=False)
    except FileNotFoundError:
        return ImageFolder(data.images, image_size, crop=data.crop)
    if data.crop != "center":
        raise ValueError("Fashion-MNIST images are used whole (padded to 32 px), not cropped: set data.crop=center")
    if image_size != fashion_mnist.IMAGE_SIZE:
        raise ValueError(f"Fashion-MNIST images are {fashion_mnist.IMAGE_SIZE} px but the tokenizer's image_size "
                         f"is {image_size}: set model.image_size={fashion_mnist.IMAGE_SIZE}")
    return fashion_mnist.FashionMNIST("train", folder, download=False)


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
    names = []
    if cfg.auxiliary.enabled:
        names += [n for n in ("dinov2", "siglip") if getattr(cfg.auxiliary, f"{n}_weight") > 0]
    if cfg.alignment.enabled and cfg.alignment.teacher not in names:
        names.append(cfg.alignment.teacher)
    return names


def _check_options(cfg: TokenizerTrainConfig, tok_config: TokenizerConfig) -> None:
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


def build_discriminator(gan: GANSection, weights: Path | None) -> nn.Module:
    if gan.discriminator == "patchgan":
        return PatchGANDiscriminator(width=gan.patchgan_width, num_layers=gan.patchgan_layers)
    backbone = create_vit(gan.dino_model, image_size=gan.dino_input_size, patch_size=16, weights=weights)
    return DinoDiscriminator(backbone, input_size=gan.dino_input_size, key_blocks=tuple(gan.dino_key_blocks))


def init_linear_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every trainable ``nn.Linear`` in ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and layer.weight.requires_grad:
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train a tokenizer as ``cfg`` says; returns the folder of the exported EMA tokenizer."""
    from ctok.hub import load_weights, read_weights, resolve

    # Everything that can be wrong with the inputs is checked before a process group exists.
    if cfg.data.images is None:
        raise ValueError("set data.images to the training images: an image folder (ImageNet class sub-folders, "
                         "or flat) or a folder holding Fashion-MNIST's files")
    tok_config = tokenizer_config(cfg.model)
    _check_options(cfg, config_from_dict(tok_config)[1])
    dataset = open_training_images(cfg.data, config_from_dict(tok_config)[1].image_size)
    found = {} if cfg.random_init_pretrained else locate_all(pretrained_requests(cfg))

    ctx = init_distributed(cfg.run.device)
    try:
        runner = Runner(cfg.run, config_to_dict(cfg), ctx, global_batch=cfg.data.batch_size)
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

        teachers = {name: feature_teacher(getattr(cfg.teachers, name), image_size=c.image_size,
                                          patch_size=c.enc_patch_size, weights=found.get(f"{name} teacher"))
                    for name in teachers_needed(cfg)}
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
                                          num_heads=cfg.auxiliary.num_heads)
        training_model = TokenizerTrainingModel(tokenizer, projection, auxiliary).train()
        model = runner.add_module("model", training_model, optim=cfg.optim, ema_decay=cfg.ema.decay)
        discriminator = None
        if cfg.gan.enabled:
            objective = DiscriminatorObjective(
                build_discriminator(cfg.gan, found.get("DINO discriminator backbone")), loss=cfg.gan.loss,
                lecam_weight=cfg.gan.lecam_weight, consistency_weight=cfg.gan.consistency_weight,
                diffaugment=cfg.gan.diffaugment).train()
            discriminator = runner.add_module("discriminator", objective, optim=cfg.gan.optim)
        lpips = LPIPSLoss(found.get("LPIPS VGG16 trunk")).to(ctx.device) if cfg.loss.perceptual_weight > 0 else None
        teachers = {name: t.to(ctx.device) for name, t in teachers.items()}
        masks = None
        if tokenizer.masks_tokens:
            masks = MaskSchedule(c.enc_token_drop, c.enc_token_drop_max, schedule=cfg.masking.schedule,
                                 start=cfg.masking.anneal_from, steps=cfg.masking.anneal_steps)
        fixed = reference_images(dataset, cfg.samples.num_images).to(ctx.device)
        task = TokenizerTask(cfg, runner, model, discriminator, lpips, teachers, masks, fixed)
        if ctx.is_main:
            trainable = sum(p.numel() for p in training_model.parameters() if p.requires_grad)
            tqdm.write(f"{tokenizer.kind} tokenizer {c.num_latent_tokens} x {c.codebook_embed_dim} at "
                       f"{c.image_size} px: {trainable:,} trainable parameters; {len(dataset):,} training images")
        runner.fit(task, dataset, num_workers=cfg.data.num_workers)
        out = Path(cfg.run.out_dir) / "final"
        if ctx.is_main:
            runner.ema_module("model").tokenizer.save_pretrained(out)
            tqdm.write(f"exported the EMA tokenizer to {out}")
        return out
    finally:
        shutdown_distributed()
