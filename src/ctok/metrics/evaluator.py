"""ADM's evaluation of a sample set against a reference set: FID, sFID, IS, precision and recall.

:func:`evaluate` runs the feature network over the samples (batched, with a progress bar, on
the GPU when there is one), gets the reference's statistics (stored, cached or computed; see
:mod:`ctok.metrics.reference`) and compares them. A metric the feature network or the reference
cannot support is reported as None, with the reason under ``"unavailable"``. The result carries
the protocol card (:mod:`ctok.protocol`) and, for fewer than 50,000 samples against an ImageNet
reference, a one-line warning under ``"warnings"``.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ctok.metrics.features import extract_features, network_identity
from ctok.metrics.frechet import frechet_distance, gaussian_statistics
from ctok.metrics.image_sets import open_image_set
from ctok.metrics.inception import PUBLISHED_IDENTITY
from ctok.metrics.inception_score import ADM_SPLIT_SIZE, inception_score
from ctok.metrics.precision_recall import precision_recall
from ctok.metrics.reference import ReferenceStatistics, reference_statistics
from ctok.protocol import ProtocolCard, few_samples_warning
from ctok.validation import parse_device

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def compare(samples: dict[str, np.ndarray], reference: ReferenceStatistics, *, k: int = 3,
            device: torch.device | None = None,
            adm_fp16: bool = True) -> tuple[dict[str, float | None], dict[str, str]]:
    """(metrics, reasons) for sample features against reference statistics; metrics without data are None."""
    metrics: dict[str, float | None] = dict.fromkeys(METRICS)
    reasons: dict[str, str] = {}
    metrics["fid"] = frechet_distance(*gaussian_statistics(samples["pool"]), reference.mu, reference.sigma)
    if "spatial" not in samples:
        reasons["sfid"] = "the feature network gives no 'spatial' features"
    elif reference.mu_s is None:
        reasons["sfid"] = "the reference has no spatial statistics (mu_s, sigma_s)"
    else:
        metrics["sfid"] = frechet_distance(*gaussian_statistics(samples["spatial"]), reference.mu_s, reference.sigma_s)
    if "logits" in samples:
        metrics["inception_score"] = inception_score(samples["logits"], split_size=ADM_SPLIT_SIZE)
    else:
        reasons["inception_score"] = "the feature network gives no 'logits'"
    if reference.pool is None:
        reasons["precision"] = reasons["recall"] = "the reference holds statistics only, no images to compare with"
    elif min(len(reference.pool), len(samples["pool"])) <= k:
        reasons["precision"] = reasons["recall"] = f"precision/recall needs more than k={k} images on each side"
    else:
        metrics["precision"], metrics["recall"] = precision_recall(reference.pool, samples["pool"], k=k, device=device,
                                                                   adm_fp16=adm_fp16)
    return metrics, reasons


def evaluate(samples: str | os.PathLike, reference: str | os.PathLike, network: torch.nn.Module, *,
             batch_size: int = 100, device: str | torch.device = "auto", k: int = 3,
             image_size: int | None = None, use_cache: bool = True, progress: bool = True,
             num_workers: int = 4, adm_fp16: bool = True) -> dict:
    """Evaluate the images in ``samples`` (an ``.npz`` with ``arr_0``, or a folder) against ``reference``.

    ``network``: the feature network (e.g. :func:`~ctok.metrics.inception.load_inception`'s), moved to
    ``device`` (``"auto"``: the GPU when there is one; see :func:`ctok.validation.parse_device`). A folder
    reference is centre-cropped to ``image_size`` (default: the samples' size). Returns a JSON-ready
    dict: ``fid``, ``sfid``, ``inception_score``, ``precision``, ``recall`` (None where unavailable,
    with the reason under ``unavailable``), ``num_samples``, ``num_reference``, ``feature_network``
    (its identity, and whether it is the published Inception whose numbers compare with papers),
    ``protocol`` (the card) and ``warnings``. ``adm_fp16``: precision/recall in ADM's half-precision
    arithmetic (the default) or in float32 (see :func:`~ctok.metrics.precision_recall.precision_recall`).
    """
    device = parse_device(device)
    identity = network_identity(network)
    network = network.to(device).eval()
    sample_set = open_image_set(samples, image_size, num_workers)
    ref = reference_statistics(reference, network, device=device, batch_size=batch_size,
                               image_size=image_size or sample_set.image_size, use_cache=use_cache,
                               progress=progress, num_workers=num_workers)
    features = extract_features(network, sample_set.batches(batch_size), device=device, total=len(sample_set),
                                desc="samples", progress=progress)
    metrics, reasons = compare(features, ref, k=k, device=device, adm_fp16=adm_fp16)
    count = int(features["pool"].shape[0])
    card = ProtocolCard.here(device, feature_network=identity, num_samples=count, num_reference=ref.count,
                             precision_recall=f"{'adm-fp16' if adm_fp16 else 'float32'}, k={k}")
    warning = few_samples_warning(count, str(reference))
    return {
        **metrics,
        "num_samples": count,
        "num_reference": ref.count,
        "feature_network": {"identity": identity, "published_inception": identity == PUBLISHED_IDENTITY},
        "unavailable": reasons,
        "samples": str(samples),
        "reference": {"path": str(reference), "statistics": ref.origin},
        "precision_recall_k": k,
        "protocol": card.to_dict(),
        "warnings": [warning] if warning else [],
    }
