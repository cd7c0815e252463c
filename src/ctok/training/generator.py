"""Training SiT and DiT on a tokenizer's latents: ``ctok train-sit`` and ``ctok train-dit``.

The latents come from a cache made by ``ctok cache-latents`` (``data.latents``), or, for small
runs, from images encoded on the fly (``data.images``, or their shards ``data.shards``), normalised on the way
(:mod:`ctok.training.generator_data`). The saved generator's config.json records the
normalisation in ``latent_stats`` together with the tokenizer's identity, so sampling can undo it
and refuse to decode with another tokenizer.

Objectives (one per command):

* SiT, flow matching: ``x_t = alpha_t x_0 + sigma_t eps`` (t = 1 is noise) on the linear or
  cosine path, trained to predict the velocity ``v = alpha'_t x_0 + sigma'_t eps`` with a mean
  squared error; time is uniform, or log-normal in the noise-to-signal ratio sigma_t / alpha_t.
  The path, its time distribution and the loss are :class:`ctok.sampling.flow.FlowPath`'s, the
  object the SiT samplers integrate with.
* DiT, Gaussian diffusion: 1000 steps of a linear or cosine schedule, t uniform over the steps,
  epsilon MSE plus (with learned sigma) the variational bound that trains the variance, as
  :class:`ctok.sampling.gaussian_diffusion.GaussianDiffusion` computes it (the sampler's process).

Label dropout for classifier-free guidance replaces a share ``model.class_dropout_prob`` of the
labels by the null class. It is drawn here, from the step's per-sample random numbers, instead of
inside the network (whose embedder draws from the process-global generator), so that a sample's
dropout does not depend on which process holds it. The network therefore trains in eval mode: label
dropout is its only train-time behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn as nn
from tqdm import tqdm

from ctok.data import open_images_or_shards
from ctok.latent_cache import LatentCache
from ctok.loading import load_tokenizer
from ctok.models.diffusion_transformer import DiT, LatentStats, SiT, TokenizerRecord, build_preset
from ctok.sampling.flow import FlowPath, inputs_checked, sample_sit
from ctok.sampling.gaussian_diffusion import GaussianDiffusion, sample_dit
from ctok.training.config import config_to_dict
from ctok.training.distributed import init_distributed, shutdown_distributed
from ctok.training.generator_data import CachedLatents, EncodedImages, check_cache_precision, choose_latent_stats
from ctok.training.runner import Runner
from ctok.training.sections import EMASection, OptimSection, RunSection
from ctok.training.sharding import BatchRandom
from ctok.training.task import StepLosses, TrainedModule


# -- configuration ---------------------------------------------------------------------------
@dataclass
class DataSection:
    """``data:`` where the latents come from."""

    latents: str | None = None  # a folder written by `ctok cache-latents`
    images: str | None = None  # or images encoded on the fly: an image folder or Fashion-MNIST's folder
    shards: str | None = None  # or their webdataset shards (`ctok make-shards`): DIR/train-{000000..000127}.tar, DIR
    flip: bool = True  # on the fly: mirror each image with probability 1/2 (a cache picks one of its views)
    stats_images: int = 1024  # on the fly: random images whose latents normalise, if the tokenizer has no stats
    batch_size: int = 256  # global: over all processes and accumulation steps
    num_workers: int = 4


@dataclass
class ModelSection:
    """``model:`` a preset (``SiT-XL/1``, ``DiT-B/1`` ...) and optional changes to it."""

    preset: str
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    input_size: int | None = None  # latent tokens; None: the tokenizer's
    in_channels: int | None = None  # latent width; None: the tokenizer's


@dataclass
class FlowSection:
    """``flow:`` SiT's interpolation path, prediction target and time distribution."""

    # The path's key is named as in SiT configs and the samplers; a config with the old name is told so.
    renamed_keys: ClassVar[dict[str, str]] = {"path": "path_type"}
    path_type: Literal["linear", "cosine"] = "linear"
    prediction: Literal["v"] = "v"  # velocity, as the published recipe; the only target implemented
    time_sampling: Literal["uniform", "lognormal"] = "lognormal"


@dataclass
class DiffusionSection:
    """``diffusion:`` DiT's noise schedule and variance parameterisation."""

    # Over 1000 steps. DiT's paper trains with linear, the released DiTs (SoftVQ-VAE's) with cosine, which
    # dit-xl.yaml sets and sampling assumes when a checkpoint does not record its schedule.
    schedule: Literal["linear", "cosine"] = "linear"
    learn_sigma: bool = True


@dataclass
class SamplesSection:
    """``samples:`` the picture grid written every ``run.sample_every`` steps (from the EMA weights)."""

    num_images: int = 16
    steps: int = 50
    cfg_scale: float = 1.0
    seed: int = 0


@dataclass
class GeneratorTrainConfig:
    run: RunSection
    data: DataSection
    model: ModelSection
    tokenizer: str | None = None  # folder or hub id; None: the one recorded in the latent cache
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)
    samples: SamplesSection = field(default_factory=SamplesSection)


@dataclass
class SiTTrainConfig(GeneratorTrainConfig):
    flow: FlowSection = field(default_factory=FlowSection)


@dataclass
class DiTTrainConfig(GeneratorTrainConfig):
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)


# Keys that do not change what a training step computes: the tokenizer may be named differently (its
# identity is checked against the cache either way), and the picture grids are only looked at.
FREE_ON_RESUME = ("tokenizer", "data.num_workers", "samples.num_images", "samples.steps", "samples.cfg_scale",
                  "samples.seed")


# -- objectives ------------------------------------------------------------------------------
def drop_labels(labels: torch.Tensor, rng: BatchRandom, prob: float, null_class: int) -> torch.Tensor:
    if prob <= 0:
        return labels
    return torch.where(rng.rand() < prob, torch.full_like(labels, null_class), labels)


class GeneratorTask:
    """What SiT and DiT training share: the latent source, label dropout, the sample grid."""

    def __init__(self, net: TrainedModule, latents, tokenizer: nn.Module, stats: LatentStats, samples: SamplesSection):
        self.model = net.wrapped
        self.module = net.module
        self.ema = ema = net.ema
        self.latents = latents
        self.tokenizer = tokenizer
        self.stats = stats
        self.samples = samples
        self.dropout = ema.config.class_dropout_prob
        self.null_class = ema.num_classes

    def checked_inputs(self):
        """The training forward's context: the data's labels were checked against the model when the
        data was opened (:func:`check_labels_fit`) and the times are drawn here, so the model skips
        its per-call checks, whose reads of device values would stall every step."""
        return inputs_checked(self.module)

    def inputs(self, batch, rng: BatchRandom) -> tuple[torch.Tensor, torch.Tensor]:
        x0, labels = self.latents(batch, rng)
        return x0, drop_labels(labels, rng, self.dropout, self.null_class)

    def sample_noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same noise and labels at every grid, so that grids of successive steps compare."""
        device = next(self.ema.parameters()).device
        g = torch.Generator(device=device).manual_seed(self.samples.seed)
        n = self.samples.num_images
        noise = torch.randn(n, self.ema.num_tokens, self.ema.in_channels, generator=g, device=device)
        return noise, torch.arange(n, device=device) % self.null_class

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(self.stats.denormalize(latents.float()))


class FlowMatchingTask(GeneratorTask):
    def __init__(self, *args, flow: FlowSection, **kwargs):
        super().__init__(*args, **kwargs)
        self.time_sampling = flow.time_sampling
        self.path = FlowPath(flow.path_type)

    def training_step(self, batch, step: int, rng: BatchRandom) -> StepLosses:
        """The velocity-matching loss of a micro-batch."""
        x0, labels = self.inputs(batch, rng)
        t = self.path.sample_time(rng, self.time_sampling)
        noise = rng.randn(*x0.shape[1:])
        with self.checked_inputs():
            return StepLosses(model=self.path.training_loss(self.model, x0, t, labels, noise))

    def sample_images(self, step: int) -> torch.Tensor:
        noise, labels = self.sample_noise()
        z = sample_sit(self.ema, noise, labels, num_steps=self.samples.steps, solver="euler",
                       cfg_scale=self.samples.cfg_scale, path_type=self.path.path_type)
        return self.decode(z)


class DiffusionTask(GeneratorTask):
    def __init__(self, *args, diffusion: DiffusionSection, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = diffusion
        self.diffusion = GaussianDiffusion(diffusion.schedule, 1000)

    def training_step(self, batch, step: int, rng: BatchRandom) -> StepLosses:
        """The hybrid loss of a micro-batch; its terms (``mse``, ``vb`` with learned sigma) are logged."""
        x0, labels = self.inputs(batch, rng)
        t = rng.randint(self.diffusion.num_timesteps)
        noise = rng.randn(*x0.shape[1:])
        with self.checked_inputs():
            losses = self.diffusion.training_losses(self.model, x0, t, labels, noise)
        terms = {name: value.mean() for name, value in losses.items() if name != "loss"}
        return StepLosses(model=losses["loss"].mean(), logs=terms)

    def sample_images(self, step: int) -> torch.Tensor:
        noise, labels = self.sample_noise()
        z = sample_dit(self.ema, noise, labels, num_steps=min(self.samples.steps, 1000),
                       solver="ddpm", noise_schedule=self.settings.schedule, cfg_scale=self.samples.cfg_scale,
                       generator=torch.Generator(device=noise.device).manual_seed(self.samples.seed + 1))
        return self.decode(z)


# -- the command -----------------------------------------------------------------------------
def check_model_section(kind: str, m: ModelSection, num_tokens: int | None = None,
                        latent_dim: int | None = None) -> None:
    """The preset must be of the family being trained, and sizes given in the config must fit the latents."""
    family = {"sit": "SiT", "dit": "DiT"}[kind]
    if not m.preset.startswith(f"{family}-"):
        raise ValueError(f"model.preset {m.preset!r} is not a {family} preset (e.g. {family}-XL/1); "
                         f"`ctok train-{kind}` trains {family}")
    if num_tokens is None:
        return
    for key, ours, what in (("input_size", num_tokens, "tokens"), ("in_channels", latent_dim, "channels")):
        theirs = getattr(m, key)
        if theirs is not None and theirs != ours:
            raise ValueError(f"model.{key} is {theirs} but the latents have {ours} {what} "
                             f"({num_tokens} x {latent_dim})")


def build_generator(kind: str, cfg: GeneratorTrainConfig, num_tokens: int, latent_dim: int,
                    stats: LatentStats | None = None, tokenizer: TokenizerRecord | None = None) -> SiT | DiT:
    """The network of ``model.preset`` sized for the tokenizer's latents.

    ``stats`` and ``tokenizer`` go into its config, so that the saved config.json tells sampling
    how to undo the normalisation and which tokenizer decodes the latents (a DiT's also records its
    noise schedule).
    """
    m = cfg.model
    check_model_section(kind, m, num_tokens, latent_dim)
    overrides = {k: v for k, v in (("hidden_size", m.hidden_size), ("depth", m.depth), ("num_heads", m.num_heads))
                 if v is not None}
    overrides.update(mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm, class_dropout_prob=m.class_dropout_prob,
                     latent_stats=stats, tokenizer=tokenizer)
    if kind == "sit":
        overrides["path_type"] = cfg.flow.path_type
    else:
        overrides.update(learn_sigma=cfg.diffusion.learn_sigma, noise_schedule=cfg.diffusion.schedule)
    return build_preset(m.preset, input_size=num_tokens, in_channels=latent_dim, num_classes=m.num_classes,
                        **overrides)


def check_labels_fit(label_range: tuple[int, int], num_classes: int, where: str) -> None:
    low, high = label_range
    if low is not None and (low < 0 or high >= num_classes):
        raise ValueError(f"{where} has class ids in [{low}, {high}] but model.num_classes is {num_classes}: "
                         f"set model.num_classes to at least {high + 1}")


def open_training_data(kind: str, cfg: GeneratorTrainConfig):
    """The latent cache or the image dataset of ``cfg.data``, and the frozen tokenizer, checked against the config.

    Returns ``(cache, images, tokenizer, source)``: exactly one of ``cache`` and ``images`` is set;
    ``source`` is the tokenizer's folder or hub id. Everything that can be wrong with the inputs is
    checked here, before a process group or a network exists, the cheap checks first.
    """
    if sum(source is not None for source in (cfg.data.latents, cfg.data.images, cfg.data.shards)) != 1:
        raise ValueError("set exactly one of data.latents (a cache from `ctok cache-latents`), data.images and "
                         "data.shards")
    check_model_section(kind, cfg.model)
    cache = LatentCache(cfg.data.latents) if cfg.data.latents else None
    if cache is not None:
        check_model_section(kind, cfg.model, cache.info.num_tokens, cache.info.latent_dim)
        check_labels_fit(cache.info.label_range, cfg.model.num_classes, f"latent cache {cache.info.folder}")
        if cfg.data.batch_size > len(cache):
            raise ValueError(f"the dataset has {len(cache)} samples, fewer than one global batch of "
                             f"{cfg.data.batch_size} (data.batch_size)")
    source = cfg.tokenizer or (cache.info.tokenizer_source if cache else None)
    if source is None:
        raise ValueError("training on images needs a tokenizer: set tokenizer: to a folder or hub id")
    tokenizer = load_tokenizer(source)
    tokenizer.requires_grad_(False)
    images = None
    if cache is not None:
        if (cache.info.num_tokens, cache.info.latent_dim) != (tokenizer.num_tokens, tokenizer.latent_dim):
            raise ValueError(f"latent cache {cache.info.folder} holds "
                             f"{cache.info.num_tokens} x {cache.info.latent_dim} "
                             f"latents but tokenizer {source} makes {tokenizer.num_tokens} x {tokenizer.latent_dim}")
        if cache.info.tokenizer_identity != tokenizer.identity():
            raise ValueError(f"latent cache {cache.info.folder} was made by tokenizer {cache.info.tokenizer_identity} "
                             f"({cache.info.tokenizer_source}), not by {source} ({tokenizer.identity()})")
    else:
        images = open_images_or_shards(cfg.data.images, cfg.data.shards, tokenizer.image_size)
        where = f"data.images {cfg.data.images}" if cfg.data.images else f"data.shards {cfg.data.shards}"
        labels = getattr(images, "labels", None)
        if labels is not None:
            check_labels_fit((int(min(labels)), int(max(labels))), cfg.model.num_classes, where)
        elif getattr(images, "classes", None):
            check_labels_fit((0, len(images.classes) - 1), cfg.model.num_classes, where)
    return cache, images, tokenizer, source


def default_out_dir(preset: str, tokenizer_source: str) -> str:
    """``runs/<family>-<size>_<tokenizer name>``, named like the released checkpoints
    (``SiT-XL/1`` on ``MAETok/maetok-b-128`` -> ``runs/sit-xl_maetok-b-128``)."""
    model = preset.partition("/")[0].lower()
    return f"runs/{model}_{Path(str(tokenizer_source).rstrip('/')).name}"


def train_generator(kind: str, cfg: GeneratorTrainConfig) -> Path:
    """Train a SiT (``kind="sit"``) or DiT (``"dit"``) as ``cfg`` says; returns its checkpoint folder (``final``).

    One recipe serves every tokenizer (``sit-xl.yaml`` with ``tokenizer=...``): the latent shape
    comes from the tokenizer, and an unset ``run.out_dir`` from its name (:func:`default_out_dir`).
    """
    cache, images, tokenizer, source = open_training_data(kind, cfg)
    if cfg.run.out_dir is None:
        cfg.run.out_dir = default_out_dir(cfg.model.preset, source)
    ctx = init_distributed(cfg.run.device, cfg.run.dist_timeout_min)
    try:
        runner = Runner(cfg.run, config_to_dict(cfg), ctx, global_batch=cfg.data.batch_size,
                        free_on_resume=FREE_ON_RESUME)
        tokenizer = tokenizer.to(ctx.device).eval()
        stats = choose_latent_stats(tokenizer, cache, images, cfg.data.stats_images, cfg.run.seed, cfg.run.precision)
        if cache is not None and ctx.is_main:
            check_cache_precision(cache, cfg.run.precision, ctx.device)
        network = build_generator(kind, cfg, tokenizer.num_tokens, tokenizer.latent_dim, stats,
                                  TokenizerRecord(tokenizer.identity(), str(source)))
        network.eval()  # see the module docstring: label dropout is drawn by the task
        model = runner.add_model(network, optim=cfg.optim, ema_decay=cfg.ema.decay)
        latents = (CachedLatents(stats) if cache is not None
                   else EncodedImages(tokenizer, stats, cfg.data.flip, cfg.run.precision))
        common = dict(net=model, latents=latents, tokenizer=tokenizer, stats=stats,
                      samples=cfg.samples)
        task = (FlowMatchingTask(**common, flow=cfg.flow) if kind == "sit"
                else DiffusionTask(**common, diffusion=cfg.diffusion))
        if ctx.is_main:
            tqdm.write(f"{cfg.model.preset}: {network.num_parameters():,} parameters on {tokenizer.num_tokens} x "
                       f"{tokenizer.latent_dim} latents of {source}; normalising with mean {stats.mean:.6g}, "
                       f"std {stats.std:.6g} from {stats.source}")
        runner.fit(task, cache if cache is not None else images, num_workers=cfg.data.num_workers)
        out = Path(cfg.run.out_dir) / "final"
        if ctx.is_main and cfg.run.save_weights:
            # The EMA copy carries the network's config, latent statistics and tokenizer included; the
            # card records the resolved config the runner wrote, by its sha256.
            model.ema.save_pretrained(out, training_config=runner.run_dir / "config.yaml")
            tqdm.write(f"saved the EMA weights to {out}")
        return out
    finally:
        shutdown_distributed()
