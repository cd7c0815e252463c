"""Training SoftVQ-VAE and MAETok tokenizers: ``ctok train-tokenizer``.

One step, for a batch of images x in [-1, 1] (mirrored per sample when ``data.flip``)::

    mask    MAETok: a share r of image patches per sample, r once per step (ctok.training.masking)
    x̂, z    the tokenizer's training forward (masked encoder, decoder)
    L_G =   w_rec |x - x̂|^2  +  w_p(step) LPIPS(x, x̂)                     (nll)
          + SoftVQ entropy loss  +  w_align L_align(z)                     (SoftVQ)
          + sum_t w_t L_aux,t(z, mask)                                      (MAETok)
          + λ(step) w_gan  L_gen(D(A(x̂)))                                  (from gan.start_step)
    L_D =   w_gan (L_disc(D(A(x)), D(A(x̂))) + w_lecam R_LeCAM)  +  w_cr L_cr  (from gan.start_step)

``w_p`` ramps linearly over ``loss.perceptual_warmup`` steps; ``λ`` is the adaptive weight
``||∇L_nll|| / ||∇L_gen||`` at the decoder's last layer; ``A`` is DiffAugment; the DINO ``D``
reads images larger than its 224 px input through a random view (one crop window or an area
resize, see :func:`judge`). Scaling the discriminator loss by ``w_gan`` while the consistency
term is not follows the original code.
The mask ratio follows the published distribution in stage one and is annealed to 0 in MAETok's
decoder fine-tuning stage, which starts from stage one's checkpoint folder (``init.tokenizer``) with the
encoder frozen and no auxiliary decoders.

All the shared machinery (DDP, accumulation, AdamW with the warm-up + cosine schedule, clipping,
EMA, checkpoints, logs) is :class:`ctok.training.runner.Runner`'s; this module plugs in a task.
The config schema lives in :mod:`ctok.training.tokenizer_config`, the building of the networks in
:mod:`ctok.training.tokenizer_setup`. Every random number a step uses is drawn per sample from the
step's :class:`BatchRandom` (or, for the per-step mask ratio, from a generator seeded by (seed,
step); for the discriminator's crop windows, from the step's draws shared by the whole batch),
and every batch statistic (batch norm in the discriminator, LeCAM anchors, the adaptive weight,
SoftVQ's average code assignment) spans all processes, so N processes train like one process
with the whole batch. Random crops (``data.crop: random``) are drawn by the dataset, in the
DataLoader workers, from each sample's own seed of (seed, epoch, index) (see
:class:`ctok.seeding.SeededIndex`), so they too are the same for any split and after a resume.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ctok.data import open_images_or_shards
from ctok.features.hog import hog_patch_targets
from ctok.losses.adversarial import LeCAM, adaptive_generator_weight, gan_losses, gan_weight_at
from ctok.losses.alignment import alignment_loss
from ctok.losses.consistency import consistency_loss, strong_augment
from ctok.losses.diffaugment import DiffAugment, Uniform
from ctok.losses.perceptual import LPIPSLoss, perceptual_weight_at
from ctok.models.auxiliary_decoders import AuxiliaryDecoders
from ctok.models.discriminators import training_view
from ctok.models.teachers import FrozenViTFeatures, locate_all
from ctok.models.tokenizer import Tokenizer, TrainingOutput
from ctok.training.config import config_to_dict
from ctok.training.dashboard import LatentDashboard, build_dashboard
from ctok.training.distributed import init_distributed, shutdown_distributed
from ctok.training.masking import MaskSchedule, random_patch_mask
from ctok.training.runner import Runner
from ctok.training.sharding import BatchRandom
from ctok.training.task import StepLosses, TrainedModule
from ctok.training.tokenizer_config import EvalSection, TokenizerTrainConfig, check_options, tokenizer_config
from ctok.training.tokenizer_setup import (
    build_discriminator,
    build_heads,
    build_mask_schedule,
    build_teachers,
    build_tokenizer,
    pretrained_requests,
    reference_images,
    skips_parameters,
)


# -- the trained modules ---------------------------------------------------------------------
@dataclass
class TokenizerForward(TrainingOutput):
    """The tokenizer's training forward and what the training-only heads made of its latents."""

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
        out = self.tokenizer.training_forward(images, mask)
        projected = self.projection(out.z) if self.projection is not None else None
        aux = self.auxiliary(out.z, mask, aux_targets) if self.auxiliary is not None else {}
        return TokenizerForward(**vars(out), alignment=projected, auxiliary=aux)


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

    def forward(self, real: torch.Tensor, fake: torch.Tensor, rand: Uniform, gan_weight: float,
                shared_rand: Uniform | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_D of a micro-batch (real images, reconstructions; both detached here) and its terms for the log.

        ``rand`` gives the per-sample draws (DiffAugment), ``shared_rand`` the whole batch's (the
        DINO discriminator's crop window; see :func:`judge`).
        """
        real, fake = real.detach(), fake.detach()

        def critic(images: torch.Tensor) -> torch.Tensor:
            return judge(self.discriminator, images, shared_rand)

        seen_real = self.augment(real, rand) if self.augment else real
        seen_fake = self.augment(fake, rand) if self.augment else fake
        logits_real = critic(seen_real)
        logits_fake = critic(seen_fake)
        loss = self.loss(logits_real, logits_fake)
        logs = {"disc/logits_real": logits_real.detach().mean(), "disc/logits_fake": logits_fake.detach().mean(),
                "disc/adversarial": loss.detach()}
        if self.lecam is not None:
            self.lecam.update(logits_real, logits_fake)
            lecam = self.lecam(logits_real, logits_fake)
            loss = loss + self.lecam_weight * lecam
            logs["disc/lecam"] = lecam.detach()
        loss = gan_weight * loss
        if self.consistency_weight > 0:
            cr = consistency_loss(critic, real, fake, logits_real, logits_fake, self.strong_augment, rand)
            loss = loss + self.consistency_weight * cr
            logs["disc/consistency"] = cr.detach()
        return loss, logs


def judge(discriminator: nn.Module, images: torch.Tensor, shared_rand: Uniform | None) -> torch.Tensor:
    """The discriminator's logits for ``images``, on its training view of them.

    Every call draws its own view: the original's DINO discriminator decides crop or resize, and
    the crop window, inside each forward pass, so its real, fake, generator and consistency passes
    each see their own window (one window per call, shared by the images of that call). The draws
    come from the step's shared stream, so every process and every micro-step crops alike.
    """
    return discriminator(training_view(discriminator, images, shared_rand))


# -- the task --------------------------------------------------------------------------------
class TokenizerTask:
    """The runner's task: per micro-batch, L_G for ``model``, then (from gan.start_step) L_D for ``discriminator``.

    ``model`` is the registered :class:`TokenizerTrainingModel`, ``discriminator`` the registered
    :class:`DiscriminatorObjective` (None without a GAN).
    """

    def __init__(self, cfg: TokenizerTrainConfig, model: TrainedModule, discriminator: TrainedModule | None,
                 lpips: LPIPSLoss | None, teachers: dict[str, FrozenViTFeatures], masks: MaskSchedule | None,
                 sample_images: torch.Tensor, dashboard: LatentDashboard | None = None):
        self.cfg = cfg
        self.model = model
        self.tokenizer = model.module.tokenizer  # the plain network: its config, quantiser and last layer
        self.discriminator = discriminator
        self.lpips = lpips
        self.teachers = teachers
        self.masks = masks
        self.fixed_images = sample_images
        self.gen_loss = gan_losses(cfg.gan.loss)[1]
        self.gen_augment = DiffAugment() if cfg.gan.diffaugment else None
        self.dashboard = dashboard  # on the main process only, where eval.every > 0

    def training_step(self, batch, step: int, rng: BatchRandom) -> StepLosses:
        """L_G, from gan.start_step L_D, and the logs of a micro-batch (terms named as in the module docstring)."""
        images, rand, logs = self._inputs(batch, step, rng)
        mask = None  # no masking: SoftVQ, or a ratio that rounds to no patch (an annealed one reaching 0)
        if self.masks is not None:
            ratio = self.masks.step_ratio(self.cfg.run.seed, step)
            mask = random_patch_mask(rand(self.tokenizer.num_patches), ratio)
            logs["mask_ratio"] = torch.tensor(ratio)

        # Generator phase: reconstruct, then L_G = nll + the latents' terms (+ from gan.start_step the GAN term).
        out = self.model.wrapped(images, mask, self._aux_targets(images))
        rec = out.rec.float()
        nll, terms = self._nll(images, rec, step)
        logs.update(terms)
        latent, terms = self._latent_loss(out, images)
        logs.update(terms)
        model_loss = nll + latent
        gan_weight = gan_weight_at(step, self.cfg.gan.weight, self.cfg.gan.start_step)
        if self.discriminator is None or gan_weight <= 0:
            return StepLosses(model=model_loss, discriminator=None, logs=logs)
        adversarial, terms = self._adversarial_term(nll, rec, rand, rng, gan_weight)
        logs.update(terms)

        # Discriminator phase: L_D on the real images and the (detached) reconstructions.
        disc_loss, terms = self.discriminator.wrapped(images, rec, rand, gan_weight, rng.shared_rand)
        return StepLosses(model=model_loss + adversarial, discriminator=disc_loss, logs={**logs, **terms})

    def _inputs(self, batch, step: int, rng: BatchRandom) -> tuple[torch.Tensor, Uniform, dict[str, torch.Tensor]]:
        """The readable images (mirrored per sample with data.flip), the per-sample draws, the first logs."""
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
        return images, rand, {"skipped_files": torch.tensor(float(len(skipped)))}

    def _nll(self, images: torch.Tensor, rec: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """w_rec |x - x̂|^2 (or |x - x̂|) + w_p(step) LPIPS(x, x̂)."""
        rec_loss = (F.mse_loss if self.cfg.loss.reconstruction == "mse" else F.l1_loss)(rec, images)
        nll = self.cfg.loss.reconstruction_weight * rec_loss
        logs = {"rec": rec_loss.detach()}
        if self.lpips is not None:
            p_loss = self.lpips(images, rec)
            nll = nll + perceptual_weight_at(step, self.cfg.loss.perceptual_weight,
                                             self.cfg.loss.perceptual_warmup) * p_loss
            logs["lpips"] = p_loss.detach()
        return nll, logs

    def _latent_loss(self, out: TokenizerForward, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SoftVQ's entropy loss + w_align L_align(z) + sum_t w_t L_aux,t(z, mask) (zero terms where absent)."""
        loss = out.entropy_loss
        logs = {}
        if self.tokenizer.quantize is not None:
            logs["entropy"] = out.entropy_loss.detach()
            logs["codebook_usage"] = out.codebook_usage  # a device tensor: read back only when logged
        if out.alignment is not None:
            align = alignment_loss(out.alignment.float(), self.teachers[self.cfg.alignment.teacher](images))
            loss = loss + self.cfg.alignment.weight * align
            logs["align"] = align.detach()
        for name, value in out.auxiliary.items():
            loss = loss + getattr(self.cfg.auxiliary, f"{name}_weight") * value
            logs[f"aux/{name}"] = value.detach()
        return loss, logs

    def _adversarial_term(self, nll: torch.Tensor, rec: torch.Tensor, rand: Uniform, rng: BatchRandom,
                          gan_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """λ(step) w_gan L_gen(D(A(x̂))), judged by the plain discriminator (see TrainedModule)."""
        critic = self.discriminator.module.discriminator
        seen = self.gen_augment(rec, rand) if self.gen_augment else rec
        g_loss = self.gen_loss(judge(critic, seen, rng.shared_rand))
        adaptive = (adaptive_generator_weight(nll, g_loss, self.tokenizer.last_layer)
                    if self.cfg.gan.adaptive_weight else torch.tensor(1.0))
        return adaptive * gan_weight * g_loss, {"gan/generator": g_loss.detach(), "gan/adaptive_weight": adaptive}

    @torch.no_grad()
    def _aux_targets(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        aux = self.model.module.auxiliary
        if aux is None:
            return {}
        targets = {}
        for name in aux.decoders:
            targets[name] = (hog_patch_targets(images.float(), patch_size=self.tokenizer.config.enc_patch_size)
                             if name == "hog" else self.teachers[name](images))
        return targets

    @torch.no_grad()
    def sample_images(self, step: int) -> torch.Tensor:
        """Pairs (original, EMA reconstruction), side by side."""
        tokenizer = self.model.ema.tokenizer.eval()
        x = self.fixed_images
        rec = tokenizer(x).float().clamp(-1, 1)
        return torch.stack([x, rec], dim=1).flatten(0, 1)


    def evaluates_at(self, step: int) -> bool:
        """Whether the runner calls :meth:`evaluate` after ``step`` (the same answer in every process)."""
        return self.cfg.eval.every > 0 and step % self.cfg.eval.every == 0

    def evaluate(self, step: int) -> dict[str, float]:
        """The latent dashboard's scores of the EMA tokenizer (main process only)."""
        return self.dashboard.evaluate(self.model.ema.tokenizer, step)


# -- the run ---------------------------------------------------------------------------------
def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train a tokenizer as ``cfg`` says; returns the checkpoint folder of the EMA tokenizer."""
    # Everything that can be wrong with the inputs is checked before a process group exists.
    tok_config = tokenizer_config(cfg.model)
    check_options(cfg, Tokenizer.split_config(tok_config)[0])
    dataset = open_images_or_shards(cfg.data.images, cfg.data.shards, Tokenizer.split_config(tok_config)[0].image_size,
                                    crop=cfg.data.crop)
    found = {} if cfg.random_init_pretrained else locate_all(pretrained_requests(cfg))

    ctx = init_distributed(cfg.run.device, cfg.run.dist_timeout_min)
    try:
        # The dashboard watches the run without changing it: it may be turned on, off or changed on resume.
        runner = Runner(cfg.run, config_to_dict(cfg), ctx, global_batch=cfg.data.batch_size,
                        free_on_resume=[f"eval.{f.name}" for f in dataclasses.fields(EvalSection)])
        # Built in this order: each builder that initialises weights draws from the global generator.
        tokenizer = build_tokenizer(cfg, tok_config, found)
        c = tokenizer.config
        teachers = build_teachers(cfg, c, found)
        training_model = TokenizerTrainingModel(tokenizer, *build_heads(cfg, c, teachers)).train()
        masks = build_mask_schedule(cfg, tokenizer)
        model = runner.add_model(training_model, optim=cfg.optim, ema_decay=cfg.ema.decay,
                                 find_unused_parameters=skips_parameters(tokenizer, masks))
        discriminator = None
        if cfg.gan.enabled:
            objective = DiscriminatorObjective(
                build_discriminator(cfg.gan, found.get("DINO discriminator backbone")), loss=cfg.gan.loss,
                lecam_weight=cfg.gan.lecam_weight, consistency_weight=cfg.gan.consistency_weight,
                diffaugment=cfg.gan.diffaugment).train()
            discriminator = runner.add_discriminator(objective, optim=cfg.gan.optim)
        lpips = LPIPSLoss(found.get("LPIPS VGG16 trunk")).to(ctx.device) if cfg.loss.perceptual_weight > 0 else None
        teachers = {name: t.to(ctx.device) for name, t in teachers.items()}
        fixed = reference_images(dataset, cfg.samples.num_images).to(ctx.device)
        dashboard = build_dashboard(cfg, dataset, c.image_size) if ctx.is_main and cfg.eval.every else None
        task = TokenizerTask(cfg, model, discriminator, lpips, teachers, masks, fixed, dashboard)
        if ctx.is_main:
            trainable = sum(p.numel() for p in training_model.parameters() if p.requires_grad)
            tqdm.write(f"{tokenizer.variant} tokenizer {c.num_latent_tokens} x {c.codebook_embed_dim} at "
                       f"{c.image_size} px: {trainable:,} trainable parameters; {len(dataset):,} training images")
        runner.fit(task, dataset, num_workers=cfg.data.num_workers)
        out = Path(cfg.run.out_dir) / "final"
        if ctx.is_main and cfg.run.save_weights:
            # The card records the resolved config the runner wrote, by its sha256.
            model.ema.tokenizer.save_pretrained(out, training_config=runner.run_dir / "config.yaml")
            tqdm.write(f"saved the EMA tokenizer to {out}")
        return out
    finally:
        shutdown_distributed()
