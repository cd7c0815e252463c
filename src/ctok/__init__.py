"""ctok: compact 1-D continuous image tokenizers and the diffusion transformers on their latents.

Loading released or trained checkpoints (a local folder or a hub id such as ``MAETok/maetok-b-128``;
``device="auto"`` takes the GPU when there is one; the models come back in eval mode):
    load_tokenizer, load_sit, load_dit (also Tokenizer.from_pretrained, SiT.from_pretrained,
    DiT.from_pretrained), and load_pipeline for a tokenizer and its generator together.
Building a released architecture by preset name, with random weights (for training):
    build_tokenizer ("maetok-b-128", "softvq-l-64-512" ...), build_sit ("SiT-XL/1" ...),
    build_dit ("DiT-XL/1" ...).
Models and their configs: Tokenizer, TokenizerConfig, SiT, DiT.
Generation: LatentPipeline (encode, decode and generate in the generator's normalised latent
space), or the samplers themselves, sample_sit and sample_dit (with GaussianDiffusion, DiT's process).

The public API is imported lazily, so that ``import ctok`` stays cheap for the command line and
a user who only evaluates never imports the training stack.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_tokenizer": "ctok.loading",
    "load_sit": "ctok.loading",
    "load_dit": "ctok.loading",
    "load_pipeline": "ctok.pipeline",
    "LatentPipeline": "ctok.pipeline",
    "Tokenizer": "ctok.models.tokenizer",
    "TokenizerConfig": "ctok.models.tokenizer",
    "build_tokenizer": "ctok.models.tokenizer",
    "SiT": "ctok.models.diffusion_transformer",
    "DiT": "ctok.models.diffusion_transformer",
    "build_sit": "ctok.models.diffusion_transformer",
    "build_dit": "ctok.models.diffusion_transformer",
    "sample_sit": "ctok.sampling.flow",
    "sample_dit": "ctok.sampling.gaussian_diffusion",
    "GaussianDiffusion": "ctok.sampling.gaussian_diffusion",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ctok' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names are not in the module's namespace until first used; dir() and help() should
    # list them from the start.
    return sorted(set(globals()) | set(_API))
