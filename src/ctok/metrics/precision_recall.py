"""Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's ManifoldEstimator computes them.

ADM's arithmetic is the default: features are cast to float16 and each distance block
``||u||^2 - 2 u.v + ||v||^2`` (clamped at 0) is computed in half precision; only a block with a
non-finite value (an overflow past 65504) is recomputed in float32. Radii and comparisons are in
float32, on the half-precision distances. Half rounding moves a distance by about one part in a
thousand, enough to flip a few borderline neighbours, so the two modes differ in the third decimal
place on real data; ``adm_fp16=False`` gives the float32 numbers. On a CPU the half matmul is
about 3x slower than float32.
"""
from __future__ import annotations

import torch

from ctok.numerics import ieee_float32


def _as_features(name: str, x, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t.to(device=device, dtype=torch.float32)


class Features:
    """One feature set in float32 and, for ADM's arithmetic, its float16 copy."""

    def __init__(self, float32: torch.Tensor, adm_fp16: bool):
        self.float32 = float32
        self.float16 = float32.half() if adm_fp16 else None

    def __len__(self) -> int:
        return self.float32.shape[0]


def _distance_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ||a||^2 - 2 a.b + ||b||^2 in the inputs' dtype and in this order (each step rounds as ADM's
    # does), clamped at 0 against cancellation: one matmul per block.
    d = a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None, :]
    return d.clamp_min_(0)


def _squared_distances(a: Features, b: Features, rows: slice, cols: slice) -> torch.Tensor:
    """Float32 squared distances between a[rows] and b[cols]: from the half block when it is finite."""
    if a.float16 is not None:
        d = _distance_block(a.float16[rows], b.float16[cols])
        if bool(torch.isfinite(d).all()):
            return d.float()
    return _distance_block(a.float32[rows], b.float32[cols])


def _blocks(n: int, size: int):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def knn_radii(features: Features, k: int, block_size: int) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest other row (the (k+1)-th smallest, self included)."""
    n = len(features)
    radii = torch.empty(n, dtype=torch.float32, device=features.float32.device)
    for rows in _blocks(n, block_size):
        nearest = None  # the k+1 smallest distances seen so far, per row
        for cols in _blocks(n, block_size):
            d = _squared_distances(features, features, rows, cols)
            candidates = d if nearest is None else torch.cat([nearest, d], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[rows] = nearest[:, k]
    return radii


def precision_recall(real_feats, fake_feats, k: int = 3, *, adm_fp16: bool = True, block_size: int = 10000,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """(precision, recall) of fake features against real ones, each (N, D), ADM's k = 3.

    Each set's manifold is the union of balls around its points, a ball's radius being the
    distance to the point's k-th nearest neighbour within its own set (the point itself excluded):

        precision = (1/M) sum_j 1[ exists i: ||fake_j - real_i|| <= r_real(i) ]
        recall    = (1/N) sum_i 1[ exists j: ||real_i - fake_j|| <= r_fake(j) ]

    Distances are computed in (block_size x block_size) blocks, in float16 with ADM's float32
    fallback (``adm_fp16=True``, the default) or in float32, so 50k x 10k sets need a few hundred
    MB, on ``device`` (default: the GPU when there is one).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    real = _as_features("real_feats", real_feats, device)
    fake = _as_features("fake_feats", fake_feats, device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs {fake.shape[1]}")
    for name, feats in (("real_feats", real), ("fake_feats", fake)):
        if feats.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} samples to have k neighbours, got {feats.shape[0]}")
    with ieee_float32():  # the float32 distances (and the fallback) without TF32
        return _precision_recall(Features(real, adm_fp16), Features(fake, adm_fp16), k, block_size)


def _precision_recall(real: Features, fake: Features, k: int, block_size: int) -> tuple[float, float]:
    device = real.float32.device
    real_radii = knn_radii(real, k, block_size)
    fake_radii = knn_radii(fake, k, block_size)
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=device)
    for rows in _blocks(len(real), block_size):
        for cols in _blocks(len(fake), block_size):
            d = _squared_distances(real, fake, rows, cols)
            fake_in_real[cols] |= (d <= real_radii[rows, None]).any(dim=0)
            real_in_fake[rows] |= (d <= fake_radii[None, cols]).any(dim=1)
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())
