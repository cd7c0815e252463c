"""Running a feature network over images: the interface every metric network in ctok implements.

A feature network is a ``torch.nn.Module`` whose forward takes float images (B, 3, H, W) in
[-1, 1] and returns a dict with ``"pool"`` (B, F) (FID, precision/recall) and optionally
``"spatial"`` (B, ...) (sFID; flattened per image) and ``"logits"`` (B, K) (Inception Score), and
which has an ``identity`` attribute naming its weights. :class:`~ctok.metrics.inception.InceptionV3Features`
is one; any other (e.g. a classifier trained on the data's own domain) can replace it.
"""
from __future__ import annotations

import importlib
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ctok.numerics import ieee_float32

FEATURE_KEYS = ("pool", "spatial", "logits")


def load_feature_network(spec: str | None, inception_weights: str | None, device) -> torch.nn.Module:
    """The feature network a command names: ``MODULE:FACTORY`` (``FACTORY()`` builds it), or Inception when None."""
    if spec is None:
        from ctok.metrics.inception import load_inception

        return load_inception(inception_weights, device=device)
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise ValueError(f"--feature-network must look like MODULE:FACTORY, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--feature-network {spec}: {err}") from None
    return factory().to(device).eval()


def network_identity(network: torch.nn.Module) -> str:
    identity = getattr(network, "identity", None)
    if not isinstance(identity, str) or not identity:
        raise ValueError(
            f"the feature network ({type(network).__name__}) needs an `identity` attribute, a string naming "
            "its weights (e.g. a checksum), so that results and cached statistics say what produced them"
        )
    return identity


def to_network_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float in [-1, 1] (x / 127.5 - 1) on ``device``; float images pass."""
    batch = batch.to(device, non_blocking=True)
    if batch.dtype == torch.uint8:
        return batch.float().div_(127.5).sub_(1.0)
    return batch.float()


def network_features(network: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The network's outputs for images in [-1, 1], each flattened to (B, F) float32, computed
    without TF32 (see :mod:`ctok.numerics`)."""
    with torch.no_grad(), ieee_float32():
        out = network(images)
    if not isinstance(out, dict) or "pool" not in out:
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise ValueError("a feature network must return a dict with 'pool' (and optionally 'spatial', 'logits'); "
                         f"got {got}")
    features = {}
    for key in FEATURE_KEYS:
        if key in out:
            value = out[key]
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] != images.shape[0]:
                raise ValueError(f"feature network output {key!r} must be a tensor (B, ...) with B = "
                                 f"{images.shape[0]}, got {getattr(value, 'shape', type(value).__name__)}")
            features[key] = value.flatten(1).float()
    return features


def extract_features(network: torch.nn.Module, batches: Iterable[torch.Tensor], *, device: torch.device,
                     total: int | None = None, desc: str = "features", progress: bool = True) -> dict[str, np.ndarray]:
    """Features of every image in ``batches`` (uint8 or [-1, 1] float tensors (B, 3, H, W)), as float32 arrays."""
    collected: dict[str, list[np.ndarray]] = {}
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            for key, value in network_features(network, to_network_input(batch, device)).items():
                collected.setdefault(key, []).append(value.cpu().numpy())
            bar.update(batch.shape[0])
    if not collected:
        raise ValueError(f"{desc}: no images to compute features of")
    return {key: np.concatenate(parts) for key, parts in collected.items()}
