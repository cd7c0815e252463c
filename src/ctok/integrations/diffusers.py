"""A ctok tokenizer as a diffusers autoencoder: ``CtokAutoencoder`` (``pip install 'ctok[diffusers]'``).

diffusers models are ``ModelMixin`` + ``ConfigMixin`` classes whose ``__init__`` arguments are
their config.json; :class:`CtokAutoencoder` takes one, ``tokenizer_config``, the ctok config dict
(:meth:`ctok.models.tokenizer.Tokenizer.to_config`), so the diffusers folder
(``config.json`` + ``diffusion_pytorch_model.safetensors``) holds everything a ctok checkpoint does::

    vae = CtokAutoencoder.from_ctok("MAETok/maetok-b-128")   # a ctok folder or hub id
    vae.save_pretrained("maetok-diffusers")                 # diffusers' layout
    vae = CtokAutoencoder.from_pretrained("maetok-diffusers")
    latents = vae.encode(images).latents                    # (B, N, D); images (B, 3, H, W) in [-1, 1]
    images = vae.decode(latents).sample
    vae.to_ctok("maetok-ctok")                              # back to a ctok checkpoint folder

Latents are 1-D token sequences (B, N, D), not the (B, C, h, w) grids of diffusers' image VAEs.
As with those, ``encode`` returns them unscaled, and the config's ``shift_factor`` and
``scaling_factor`` give the normalisation a generator works in: ``(z - shift_factor) *
scaling_factor``, which is the tokenizer's ``(z - vq_mean) / vq_std``.

This module imports diffusers at once (its class derives from diffusers'); ``import ctok`` never
imports it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.utils import BaseOutput
except ImportError as err:
    raise ImportError(f"ctok.integrations.diffusers needs diffusers ({err}): pip install 'ctok[diffusers]'") from err

from ctok.loading import load_tokenizer
from ctok.models.tokenizer import Tokenizer


@dataclass
class CtokEncoderOutput(BaseOutput):
    """What :meth:`CtokAutoencoder.encode` returns: ``latents`` (B, N, D), unscaled."""

    latents: torch.Tensor


class CtokAutoencoder(ModelMixin, ConfigMixin):
    """A ctok tokenizer (SoftVQ-VAE or MAETok) behind diffusers' autoencoder API.

    ``tokenizer_config`` is the ctok config dict; ``scaling_factor`` and ``shift_factor`` default
    to ``1 / vq_std`` and ``vq_mean`` of that config and, when given (a saved config.json gives
    them), must agree with it. Build one from a ctok checkpoint with :meth:`from_ctok`.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, tokenizer_config: dict, scaling_factor: float | None = None,
                 shift_factor: float | None = None):
        super().__init__()
        self.tokenizer = Tokenizer.from_config(tokenizer_config)
        c = self.tokenizer.config
        derived = {"scaling_factor": 1.0 / c.vq_std, "shift_factor": c.vq_mean}
        for name, given in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
            # A mismatch would make a pipeline scale latents unlike the generator trained on them.
            if given is not None and not math.isclose(given, derived[name], rel_tol=1e-6, abs_tol=1e-12):
                raise ValueError(f"{name} {given} disagrees with the tokenizer config (vq_mean {c.vq_mean}, "
                                 f"vq_std {c.vq_std} give {derived[name]})")
        self.register_to_config(**derived)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images (B, 3, H, W) in [-1, 1] -> ``CtokEncoderOutput(latents)``, or ``(latents,)`` without return_dict.

        The tokenizer's own ``encode``: the same checks, no autograd.
        """
        latents = self.tokenizer.encode(x)
        return CtokEncoderOutput(latents=latents) if return_dict else (latents,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Latents (B, N, D), unscaled -> ``DecoderOutput(sample)`` images in [-1, 1], or ``(sample,)``."""
        sample = self.tokenizer.decode(z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """The reconstruction ``decode(encode(sample))``, as diffusers' autoencoders define ``forward``."""
        return self.decode(self.encode(sample).latents, return_dict=return_dict)

    @classmethod
    def from_ctok(cls, src: str | os.PathLike, device: str | torch.device = "cpu") -> "CtokAutoencoder":
        """The tokenizer of a ctok checkpoint folder or hub id, wrapped, in eval mode."""
        tokenizer = load_tokenizer(src, device)
        with torch.device("meta"):  # its weights are the loaded tokenizer's: nothing to initialise
            model = cls(tokenizer_config=tokenizer.to_config())
        model.tokenizer = tokenizer
        return model.eval()

    def to_ctok(self, folder: str | os.PathLike) -> Path:
        """Write the tokenizer as a ctok checkpoint folder (config.json, the weights, the model card); returns it."""
        return self.tokenizer.save_pretrained(folder)
