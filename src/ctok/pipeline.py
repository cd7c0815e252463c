"""A tokenizer and the SiT or DiT trained on its latents, as one object that owns the latent contract.

A generator does not work in the tokenizer's latent space but in a normalised one, ``(z - mean) /
std``. Which two numbers apply depends on where the generator comes from: one trained by ctok
records them in its config (``latent_stats``, with the identity of the tokenizer it learned);
a released one records nothing and was trained with the tokenizer config's ``vq_mean`` / ``vq_std``.
Getting this wrong does not fail, it decodes grey blobs; so :class:`LatentPipeline` applies the
right normalisation itself, refuses a tokenizer the generator was not trained on, and samples
exactly as ``ctok generate`` does (:func:`ctok.generation.generate_to_folder` calls it for every
batch), so that the same seed gives the same pixels from Python and from the command line.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ctok.hub import KIND_NAMES, model_kind, resolve
from ctok.loading import load_dit, load_sit, load_tokenizer
from ctok.models.diffusion_transformer import DiT, LatentStats, SiT
from ctok.models.files import read_config
from ctok.models.tokenizer import Tokenizer
from ctok.sampling import flow, gaussian_diffusion
from ctok.sampling.flow import SOLVERS as SIT_SOLVERS
from ctok.sampling.flow import sample_sit
from ctok.sampling.gaussian_diffusion import SOLVERS as DIT_SOLVERS
from ctok.sampling.gaussian_diffusion import sample_dit
from ctok.sampling.noise import image_generators
from ctok.uint8 import DEFAULT_QUANTISATION, check_quantisation, to_uint8_hwc

OUTPUTS = ("uint8", "float")
# Each generator kind's solvers and its default one.
SOLVERS = {"sit": (SIT_SOLVERS, "euler-maruyama"), "dit": (DIT_SOLVERS, "ddpm")}


@dataclass(frozen=True)
class PipelineSources:
    """Where :func:`load_pipeline` found the two models: the tokenizer and generator as given
    (folder or hub id), and the generator's checkpoint folder (whose weight files fingerprint it)."""

    tokenizer: str
    generator: str
    generator_folder: Path


class LatentPipeline:
    """``tokenizer`` + the ``generator`` (SiT or DiT) trained on its latents, for inference.

    ``encode`` and ``decode`` work in the normalised latent space the generator sees; ``generate``
    draws class-conditional images. Both models are put in eval mode and every call runs without
    gradients; on CUDA, as in ``ctok generate``, encoding and sampling run under bfloat16 autocast,
    while decoding stays in the tokenizer's float32 (:meth:`ctok.Tokenizer.decode` leaves autocast,
    as bf16 pixels would land on the wrong uint8 level for about 8% of them).

    Attributes:
        tokenizer, generator: the two models.
        kind: ``"sit"`` or ``"dit"``.
        latent_stats: the normalisation the generator was trained with: the one its config records,
            else (released generators) the tokenizer config's vq_mean / vq_std.
        device: where both models live.
        sources: where the models were loaded from (:class:`PipelineSources`), None for models built
            in memory; :func:`ctok.generation.generate_to_folder` records them.

    Raises:
        ValueError: when the generator's latents do not have the tokenizer's shape, when the
            generator records that it was trained on another tokenizer (both identities are named),
            or when the two models are on different devices.
    """

    def __init__(self, tokenizer: Tokenizer, generator: SiT | DiT, *, sources: PipelineSources | None = None):
        if not isinstance(generator, (SiT, DiT)):
            raise ValueError(f"generator must be a SiT or DiT, got {type(generator).__name__}")
        self.kind = generator.kind
        if (generator.num_tokens, generator.in_channels) != (tokenizer.num_tokens, tokenizer.latent_dim):
            raise ValueError(
                f"the {self.kind.upper()} generates {generator.num_tokens} tokens x {generator.in_channels} channels "
                f"but the tokenizer decodes {tokenizer.num_tokens} tokens x {tokenizer.latent_dim}; pair the "
                "generator with the tokenizer it was trained on"
            )
        trained_on = generator.config.tokenizer
        if trained_on is not None and trained_on.identity != tokenizer.identity():
            raise ValueError(
                f"the {self.kind.upper()} was trained on latents of tokenizer {trained_on.identity} "
                f"({trained_on.source}), but the tokenizer given is {tokenizer.identity()}; pair the generator "
                "with the tokenizer it was trained on"
            )
        self.device = next(generator.parameters()).device
        tokenizer_device = next(tokenizer.parameters()).device
        if tokenizer_device != self.device:
            raise ValueError(f"the tokenizer is on {tokenizer_device} but the generator on {self.device}; "
                             "move both to one device")
        self.tokenizer = tokenizer.eval()
        self.generator = generator.eval()
        self.latent_stats = generator.config.latent_stats or LatentStats.of_tokenizer(tokenizer)
        self.sources = sources

    @contextmanager
    def _inference(self):
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
            yield

    # -- latents -------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, N, D), float32, as the generator sees them."""
        with self._inference():
            return self.latent_stats.normalize(self.tokenizer.encode(images.to(self.device))).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, N, D) -> images (B, 3, H, W), float32, in about [-1, 1] (not clamped).

        Computed in float32 also where sampling ran in bf16: the latents are cast first, and the
        tokenizer decodes outside autocast.
        """
        with torch.no_grad():
            z = self.latent_stats.denormalize(latents.to(self.device, torch.float32))
            return self.tokenizer.decode(z).float()

    # -- sampling ------------------------------------------------------------------------------
    def sampler_arguments(self, *, num_steps: int = 250, solver: str | None = None, cfg_scale: float = 1.0,
                          guidance_interval: tuple[float, float] | None = None,
                          noise_schedule: str | None = None) -> dict:
        """The keyword arguments of :func:`~ctok.sampling.sample_sit` or :func:`~ctok.sampling.sample_dit`
        that :meth:`generate` uses for these settings, defaults filled in.

        SiT: ``solver`` one of euler, heun, euler-maruyama (default), guided only while
        ``guidance_interval[0] <= t <= guidance_interval[1]`` (default (0, 1)). DiT: ``solver`` ddpm
        (default) or ddim, guided at every step, on ``noise_schedule``, by default the one its config
        records, else cosine (every released DiT's).
        """
        solver = self._solver(solver)
        if self.kind == "sit":
            if noise_schedule is not None:
                raise ValueError("noise_schedule applies to DiT only; a SiT integrates a flow")
            interval = tuple(float(t) for t in guidance_interval) if guidance_interval is not None else (0.0, 1.0)
            return dict(num_steps=num_steps, solver=solver, cfg_scale=cfg_scale, guidance_interval=interval)
        if guidance_interval is not None:
            raise ValueError("guidance_interval applies to SiT only; a DiT is guided at every step")
        schedule = noise_schedule or self.generator.config.noise_schedule or "cosine"
        return dict(num_steps=num_steps, solver=solver, noise_schedule=schedule, cfg_scale=cfg_scale)

    def sampler_card(self, **settings) -> dict:
        """The protocol card's ``sampler`` entry for :meth:`sampler_arguments` ``(**settings)``: the model
        kind, every argument, the model evaluations per sample (NFE, a guided step counting two) and,
        for a SiT, its flow path."""
        arguments = self.sampler_arguments(**settings)
        if self.kind == "sit":
            nfe = flow.function_evaluations(arguments["solver"], arguments["num_steps"], arguments["cfg_scale"],
                                            arguments["guidance_interval"])
            return {"model": "sit", **arguments, "path_type": self.generator.config.path_type, "nfe_per_sample": nfe}
        nfe = gaussian_diffusion.function_evaluations(arguments["num_steps"], arguments["cfg_scale"])
        return {"model": "dit", **arguments, "nfe_per_sample": nfe}

    def _solver(self, solver: str | None) -> str:
        """``solver``, or this generator kind's default; a solver of the other kind is named as such."""
        names, default = SOLVERS[self.kind]
        solver = solver or default
        if solver not in names:
            other = next((k for k, (theirs, _) in SOLVERS.items() if k != self.kind and solver in theirs), None)
            what = f"a {KIND_NAMES[other]} solver" if other else "unknown"
            raise ValueError(f"solver {solver!r} is {what}; a {KIND_NAMES[self.kind]} takes one of {names}")
        return solver

    def generate(self, labels: Sequence[int] | torch.Tensor, *, num_steps: int = 250, solver: str | None = None,
                 cfg_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None,
                 noise_schedule: str | None = None, seed: int | None = None,
                 generators: Sequence[torch.Generator] | None = None, output: str = "uint8",
                 quantisation: str = DEFAULT_QUANTISATION):
        """One image per class id in ``labels``, drawn in one batch.

        Image j draws its starting noise and every later random number from its own generator:
        ``generators[j]`` (on the pipeline's device), or, with ``seed``, one seeded from (seed, j)
        by :func:`ctok.sampling.noise.image_seed`; with neither, the seed comes from torch's global
        generator. So ``generate(labels, seed=s)`` gives exactly the images 0 .. N-1 of ``ctok generate
        --seed s --labels ...`` with ``--batch-size`` N or more; a later batch of that command is
        ``generate(batch_labels, generators=image_generators(s, batch_indices, device))``. (The
        batch matters only through a matmul's rounding, but exact equality needs the same batches.)

        The sampler settings are those of :meth:`sampler_arguments`. The null class
        ``generator.num_classes`` samples unconditionally.

        Returns:
            ``output="uint8"``: a NumPy uint8 array (N, H, W, 3), quantised by
            :func:`ctok.uint8.to_uint8` with ``quantisation`` (round half up by default, as DiT's and
            SiT's scripts; "truncate" as ADM's), the pixels ``ctok generate`` writes.
            ``output="float"``: a float32 tensor (N, 3, H, W) on the
            pipeline's device, the decoder's output in about [-1, 1], not clamped.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        check_quantisation(quantisation)
        arguments = self.sampler_arguments(num_steps=num_steps, solver=solver, cfg_scale=cfg_scale,
                                           guidance_interval=guidance_interval, noise_schedule=noise_schedule)
        y = torch.as_tensor(labels, device=self.device)
        if y.ndim != 1 or len(y) == 0:
            raise ValueError(f"labels must be a non-empty sequence of class ids, got shape {tuple(y.shape)}")
        if seed is not None and generators is not None:
            raise ValueError("pass seed or generators, not both")
        if generators is None:
            if seed is None:
                seed = int(torch.randint(2**62, ()))
            generators = image_generators(seed, range(len(y)), self.device)
        elif isinstance(generators, torch.Generator) or len(generators) != len(y):
            got = "one torch.Generator" if isinstance(generators, torch.Generator) else f"{len(generators)}"
            raise ValueError(f"generators must hold one torch.Generator per label ({len(y)}), got {got}")
        model = self.generator
        noise = torch.stack([torch.randn(model.num_tokens, model.in_channels, generator=g, device=self.device)
                             for g in generators])
        sample = sample_sit if self.kind == "sit" else sample_dit
        with self._inference():
            images = self.decode(sample(model, noise, y, generator=generators, **arguments))
        return to_uint8_hwc(images, quantisation) if output == "uint8" else images


def load_pipeline(tokenizer: str | os.PathLike, generator: str | os.PathLike, *,
                  device: str | torch.device = "cpu") -> LatentPipeline:
    """A :class:`LatentPipeline` from two checkpoint folders or hub ids, both loaded onto ``device``
    (``"auto"``: the GPU when there is one).

    The generator's kind (SiT or DiT) is read from its config.json.
    """
    folder = resolve(generator)
    kind = model_kind(read_config(folder))
    if kind == "tokenizer":
        raise ValueError(f"generator {generator} is a tokenizer; pass a SiT or DiT checkpoint")
    model = (load_sit if kind == "sit" else load_dit)(folder, device)
    return LatentPipeline(load_tokenizer(tokenizer, device), model,
                          sources=PipelineSources(str(tokenizer), str(generator), folder))
