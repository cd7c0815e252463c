"""Fréchet distance between Gaussians fitted to features: FID on Inception's pool_3, sFID on mixed_6/conv."""
from __future__ import annotations

import numpy as np
import scipy.linalg


def _float64(name: str, x, ndim: int | None) -> np.ndarray:
    """``x`` (array or tensor) as float64 numpy; ``ndim`` None accepts any batch of at least 1-D items."""
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if (x.ndim != ndim) if ndim is not None else (x.ndim < 2):
        raise ValueError(f"{name} must be {ndim or 'at least 2'}-D, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features (N, D): the mean and the unbiased covariance, in float64 (ADM's statistics)."""
    x = _float64("features", features, 2)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _covariance(name: str, sigma, dim: int) -> np.ndarray:
    s = _float64(name, sigma, 2)
    if s.shape != (dim, dim):
        raise ValueError(f"{name} must have shape ({dim}, {dim}) to match the means, got {s.shape}")
    scale = max(float(np.abs(s).max()), 1e-300)
    if float(np.abs(s - s.T).max()) > 1e-6 * scale:
        raise ValueError(f"{name} is not symmetric, so it is not a covariance matrix")
    return (s + s.T) / 2


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = scipy.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):

        d² = ||mu1 - mu2||² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½)

    The trace of the square root is computed as  sum_i sqrt(λ_i),  λ_i the eigenvalues of the
    symmetric positive semi-definite  sigma1^½ sigma2 sigma1^½,  which has the eigenvalues of
    sigma1 sigma2. ADM instead takes scipy's ``sqrtm`` of the non-symmetric product, retries with
    1e-6 added to the diagonals when that returns non-finite values (near-singular products), and
    drops small imaginary parts; the symmetric form gives the same trace (to rounding) without
    those failure modes, and stays exact for singular covariances (fewer samples than dimensions).
    Inputs are arrays or tensors; the computation is in float64.
    """
    m1 = _float64("mu1", mu1, 1)
    m2 = _float64("mu2", mu2, 1)
    if m1.shape != m2.shape:
        raise ValueError(f"mu1 and mu2 must have the same length, got {m1.shape[0]} and {m2.shape[0]}")
    s1 = _covariance("sigma1", sigma1, m1.shape[0])
    s2 = _covariance("sigma2", sigma2, m1.shape[0])
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eigenvalues = scipy.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def fid(real_features, fake_features) -> float:
    """FID between two sets of features (N, D): ``frechet_distance`` of their Gaussian statistics."""
    return frechet_distance(*gaussian_statistics(real_features), *gaussian_statistics(fake_features))


def sfid(real_spatial, fake_spatial) -> float:
    """sFID: the Fréchet distance of spatial features (N, ...), each flattened to one vector.

    With Inception these are the first 7 channels of ``mixed_6/conv``, 17 x 17 x 7 = 2023-d per image
    (``InceptionV3Features(...)["spatial"]``). The flattening order does not change the distance.
    """
    real = _float64("real_spatial", real_spatial, None)
    fake = _float64("fake_spatial", fake_spatial, None)
    return fid(real.reshape(real.shape[0], -1), fake.reshape(fake.shape[0], -1))
