"""The loaders: ``load_tokenizer``, ``load_sit``, ``load_dit`` and ``load_any`` (whatever a folder holds).

``src`` is a local checkpoint folder or a hub id (see :func:`ctok.hub.resolve`); ``device`` is
``"auto"`` (the GPU if there is one), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...; the model comes back
in eval mode. Each loader is its class's ``from_pretrained`` (:class:`ctok.models.base.PretrainedModel`),
which refuses a checkpoint of another kind by naming the loader to use.

This module sits above the models: it imports every model module, so each class has registered
its kind with :mod:`ctok.hub` before :func:`load_any` asks the registry which class serves a kind.
"""
from __future__ import annotations

import os

import torch

from ctok.hub import model_class, model_kind, resolve
from ctok.models.base import PretrainedModel
from ctok.models.diffusion_transformer import DiT, SiT
from ctok.models.files import LoadReport, read_config
from ctok.models.tokenizer import Tokenizer


def load_tokenizer(src: str | os.PathLike, device: str | torch.device = "cpu") -> Tokenizer:
    """A released or ctok-trained SoftVQ-VAE / MAETok tokenizer, in eval mode (``Tokenizer.from_pretrained``)."""
    return Tokenizer.from_pretrained(src, device)


def load_sit(src: str | os.PathLike, device: str | torch.device = "cpu") -> SiT:
    """A released or ctok-trained SiT, in eval mode (``SiT.from_pretrained``)."""
    return SiT.from_pretrained(src, device)


def load_dit(src: str | os.PathLike, device: str | torch.device = "cpu") -> DiT:
    """A released or ctok-trained DiT, in eval mode (``DiT.from_pretrained``)."""
    return DiT.from_pretrained(src, device)


def load_any(src: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[PretrainedModel, LoadReport]:
    """Whatever model the folder holds, with the load report (what ``ctok inspect`` shows)."""
    folder = resolve(src)
    return model_class(model_kind(read_config(folder))).load_checkpoint(folder, device)
