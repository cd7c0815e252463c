"""ctok: compact 1-D continuous image tokenizers and the diffusion transformers on their latents.

The public API is imported lazily, so that ``import ctok`` stays cheap for the command line and
a user who only evaluates never imports the training stack.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_tokenizer": "ctok.hub",
    "load_sit": "ctok.hub",
    "load_dit": "ctok.hub",
    "load_pipeline": "ctok.pipeline",
    "LatentPipeline": "ctok.pipeline",
    "Tokenizer": "ctok.models.tokenizer",
    "TokenizerConfig": "ctok.models.tokenizer",
    "SiT": "ctok.models.diffusion_transformer",
    "DiT": "ctok.models.diffusion_transformer",
    "sample_sit": "ctok.sampling.flow",
    "sample_dit": "ctok.sampling.gaussian_diffusion",
    "GaussianDiffusion": "ctok.sampling.gaussian_diffusion",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ctok' has no attribute {name!r}")
