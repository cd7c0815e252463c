"""The reference side of an evaluation: statistics and features of a reference set, and their cache.

A reference is an ADM reference batch ``.npz`` (``arr_0`` images and/or the TF Inception's stored
``mu``, ``sigma``, ``mu_s``, ``sigma_s``), a samples ``.npz``, or a folder of images.

* Stored statistics are used for FID and sFID exactly when the feature network is the published
  Inception (they are that network's statistics, often over far more images than ``arr_0``);
  precision/recall still needs the features of ``arr_0``.
* Anything computed from the images is cached in ctok's cache folder
  (``$CTOK_CACHE`` or ``$XDG_CACHE_HOME/ctok``, then ``reference-features``), never
  beside the reference: a file named by the reference's content (a file's sha256; a folder's
  listing with sizes and modification times) and the network's identity, reused while both match.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctok.atomic_files import atomic_write, file_sha256
from ctok.downloads import ctok_cache_dir
from ctok.metrics.features import extract_features, network_identity
from ctok.metrics.frechet import gaussian_statistics
from ctok.metrics.image_sets import has_images, open_image_set, stored_statistics
from ctok.metrics.inception import PUBLISHED_IDENTITY


@dataclass
class ReferenceStatistics:
    """What the metrics need of the reference set."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None  # spatial statistics (sFID), when the network has spatial features
    sigma_s: np.ndarray | None
    pool: np.ndarray | None  # pool features of the images (precision/recall), when there are images
    count: int | None  # images behind ``pool`` (None for statistics alone)
    origin: str  # how the statistics were obtained, for the report


def cache_path(reference: str | os.PathLike, identity: str) -> Path:
    """Where the features of ``reference`` under the network ``identity`` are cached."""
    reference = Path(reference).expanduser().resolve()
    if reference.is_file():
        content = file_sha256(reference)
    else:
        content = hashlib.sha256(open_image_set(reference, 1).fingerprint().encode()).hexdigest()
    network = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return ctok_cache_dir() / "reference-features" / f"{content[:32]}-{network}.npz"


def _read_cache(path: Path, identity: str, fingerprint: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["identity"]) != identity or str(data["fingerprint"]) != fingerprint:
                return None
            return {k: data[k] for k in data.files if k not in ("identity", "fingerprint")}
    except (OSError, ValueError, KeyError):
        return None  # unreadable or from an older layout: recompute


def _write_cache(path: Path, arrays: dict[str, np.ndarray], identity: str, fingerprint: str) -> bool:
    try:
        with atomic_write(path, "wb") as f:
            np.savez(f, identity=np.array(identity), fingerprint=np.array(fingerprint), **arrays)
    except OSError as err:  # a read-only home, say: still evaluate, just without the cache
        warnings.warn(f"cannot cache reference statistics at {path} ({err}); they will be recomputed next time")
        return False
    return True


def _image_statistics(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = {"pool": features["pool"]}
    arrays["mu"], arrays["sigma"] = gaussian_statistics(features["pool"])
    if "spatial" in features:
        arrays["mu_s"], arrays["sigma_s"] = gaussian_statistics(features["spatial"])
    return arrays


def reference_statistics(reference: str | os.PathLike, network: torch.nn.Module, *, device: torch.device,
                         batch_size: int = 100, image_size: int | None = None, use_cache: bool = True,
                         progress: bool = True, num_workers: int = 4) -> ReferenceStatistics:
    """Statistics (and features, for precision/recall) of ``reference`` under ``network``."""
    reference = Path(reference).expanduser()
    if not reference.exists():
        raise FileNotFoundError(f"no reference at {reference} (an ADM reference .npz or a folder of images)")
    identity = network_identity(network)
    stored = stored_statistics(reference)
    use_stored = identity == PUBLISHED_IDENTITY and {"mu", "sigma"} <= set(stored)
    if not has_images(reference):
        if use_stored:
            return ReferenceStatistics(stored["mu"], stored["sigma"], stored.get("mu_s"), stored.get("sigma_s"),
                                       None, None, f"statistics stored in {reference.name}")
        what = "statistics of the TF Inception" if stored else "no images and no statistics"
        raise ValueError(
            f"{reference} holds {what}, and the feature network is {identity}: it needs the reference "
            f"images (arr_0, or a folder) to compute its own statistics"
        )

    images = open_image_set(reference, image_size, num_workers)
    fingerprint = images.fingerprint()
    cache = cache_path(reference, identity)
    arrays = _read_cache(cache, identity, fingerprint) if use_cache else None
    if arrays is not None:
        origin = f"computed from the images, cached in {cache.name}"
    else:
        features = extract_features(network, images.batches(batch_size), device=device, total=len(images),
                                    desc=f"reference {reference.name}", progress=progress)
        arrays = _image_statistics(features)
        cached = use_cache and _write_cache(cache, arrays, identity, fingerprint)
        origin = "computed from the images" + (f", cached in {cache.name}" if cached else "")
    stats = ReferenceStatistics(arrays["mu"], arrays["sigma"], arrays.get("mu_s"), arrays.get("sigma_s"),
                                arrays["pool"], int(arrays["pool"].shape[0]), origin)
    if use_stored:
        stats.mu, stats.sigma = stored["mu"], stored["sigma"]
        if {"mu_s", "sigma_s"} <= set(stored):
            stats.mu_s, stats.sigma_s = stored["mu_s"], stored["sigma_s"]
        stats.origin = (f"FID/sFID statistics stored in {reference.name}; precision/recall features "
                        f"{origin.replace('computed from the images', 'of its arr_0 images')}")
    return stats
