"""Evaluation metrics, ADM-equivalent without TensorFlow: FID, sFID, IS, precision/recall, PSNR, SSIM, LPIPS.

Plain functions on arrays/tensors (each docstring gives the formula): ``frechet_distance``,
``gaussian_statistics``, ``fid``, ``sfid``, ``inception_score``, ``precision_recall``, ``psnr``,
``ssim``, ``lpips``. The feature network: ``load_inception`` (the TF FID graph's Inception-V3), or
any module with the interface described in :mod:`ctok.metrics.features`. Whole evaluations:
``evaluate`` (samples against a reference), ``reference_statistics``.
"""
# Eager imports on purpose: several functions share their module's name (inception_score, lpips),
# and a lazily imported submodule would replace the function of the same name on this package.
from ctok.metrics.evaluator import evaluate
from ctok.metrics.features import extract_features
from ctok.metrics.frechet import fid, frechet_distance, gaussian_statistics, sfid
from ctok.metrics.image_quality import psnr, ssim
from ctok.metrics.inception import InceptionV3Features, load_inception
from ctok.metrics.inception_score import inception_score
from ctok.metrics.lpips import load_lpips, lpips
from ctok.metrics.precision_recall import precision_recall
from ctok.metrics.reference import reference_statistics
from ctok.metrics.tf_resize import resize_bilinear_tf

__all__ = [
    "InceptionV3Features", "evaluate", "extract_features", "fid", "frechet_distance", "gaussian_statistics",
    "inception_score", "load_inception", "load_lpips", "lpips", "precision_recall", "psnr",
    "reference_statistics", "resize_bilinear_tf", "sfid", "ssim",
]
