"""The metric functions against independent computations: closed forms, scipy, scikit-learn, scikit-image."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.neighbors import NearestNeighbors

from ctok.metrics import fid, frechet_distance, gaussian_statistics, inception_score, precision_recall, psnr, sfid, ssim
from ctok.metrics.image_quality import identical_pairs, psnr_cap


def random_spd(rng, dim: int, condition: float) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * np.logspace(0, -np.log10(condition), dim)) @ q.T


def adm_frechet(mu1, s1, mu2, s2):
    """ADM's evaluator formula: scipy's sqrtm of the product, 1e-6 on the diagonals if it fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(s1)) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


# -- Fréchet distance --------------------------------------------------------------------------

def test_frechet_distance_of_gaussians_with_shared_axes_matches_closed_form():
    # Covariances diagonal in the same rotated basis commute: tr sqrt(S1 S2) = sum sqrt(a_i b_i),
    # so d² = |mu1 - mu2|² + sum (sqrt(a_i) - sqrt(b_i))².
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_of_samples_from_two_gaussians_approaches_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, size=(200_000, 3))
    y = rng.normal(0.5, 2.0, size=(200_000, 3))
    expected = 3 * 0.5**2 + 3 * (1.0 - 2.0) ** 2  # 3.75
    assert fid(x, y) == pytest.approx(expected, rel=0.02)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("condition", [1e2, 1e8, 1e12, 1e16])
def test_frechet_distance_agrees_with_scipy_sqrtm_including_near_singular(condition):
    rng = np.random.default_rng(int(np.log10(condition)))
    s1, s2 = random_spd(rng, 48, condition), random_spd(rng, 48, condition)
    mu1, mu2 = rng.standard_normal(48), rng.standard_normal(48)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(adm_frechet(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_distance_with_singular_covariances_from_few_samples():
    # 20 and 30 samples in 64 dimensions: both covariances are singular, ADM's eps fallback path.
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((20, 64)), rng.standard_normal((30, 64)) + 0.5
    (m1, s1), (m2, s2) = gaussian_statistics(x), gaussian_statistics(y)
    got = frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(adm_frechet(m1, s1, m2, s2), rel=1e-6)


def test_frechet_distance_accepts_tensors_and_rejects_bad_shapes():
    mu, sigma = torch.zeros(4), torch.eye(4)
    assert frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"sigma2 must have shape \(4, 4\)"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


def test_gaussian_statistics_are_mean_and_unbiased_covariance():
    x = np.random.default_rng(3).standard_normal((50, 5)).astype(np.float32)
    mu, sigma = gaussian_statistics(x)
    assert mu.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    centred = x.astype(np.float64) - mu
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_statistics(x[:1])


def test_sfid_flattens_spatial_maps_per_image():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((40, 2, 3, 2)), rng.standard_normal((40, 2, 3, 2)) + 1
    assert sfid(a, b) == pytest.approx(fid(a.reshape(40, -1), b.reshape(40, -1)))
    # The order of the flattened coordinates does not matter.
    assert sfid(a, b) == pytest.approx(sfid(a.transpose(0, 3, 1, 2), b.transpose(0, 3, 1, 2)), rel=1e-9)


# -- Inception Score -------------------------------------------------------------------------

def test_inception_score_of_confident_even_predictions_is_the_class_count():
    classes = 10
    logits = 50.0 * torch.eye(classes).repeat(20, 1)  # 200 one-hot predictions, 20 per class
    assert inception_score(logits, splits=10) == pytest.approx(classes, rel=1e-6)


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(torch.zeros(100, 1008), splits=10) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_matches_adm_formula_and_split_size():
    logits = np.random.default_rng(5).standard_normal((120, 7)) * 3

    def adm(split_size):  # evaluator.compute_inception_score, with numpy
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        scores = []
        for i in range(0, len(p), split_size):
            part = p[i:i + split_size]
            kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
            scores.append(np.exp(kl.sum(1).mean()))
        return np.mean(scores)

    assert inception_score(logits, split_size=50) == pytest.approx(adm(50), rel=1e-10)  # 50, 50, 20
    assert inception_score(logits, splits=4) == pytest.approx(adm(30), rel=1e-10)
    with pytest.raises(ValueError, match="splits must be between 1 and the number of samples"):
        inception_score(logits[:5], splits=10)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        inception_score(torch.zeros(10))


# -- Precision and recall ----------------------------------------------------------------------

def brute_force_precision_recall(real, fake, k):
    """k-NN radii from scikit-learn (self excluded), then the definition, one pair at a time."""
    def radii(x):
        dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
        return dist[:, k]

    r_real, r_fake = radii(real), radii(fake)
    d = np.linalg.norm(real[:, None, :] - fake[None, :, :], axis=-1)
    precision = np.mean([(d[:, j] <= r_real).any() for j in range(len(fake))])
    recall = np.mean([(d[i, :] <= r_fake).any() for i in range(len(real))])
    return precision, recall


def test_precision_recall_of_a_set_against_itself_is_one():
    x = np.random.default_rng(6).standard_normal((80, 16))
    assert precision_recall(x, x, k=3, device="cpu") == (1.0, 1.0)


def test_precision_recall_against_a_far_away_set_is_zero():
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((50, 8)), rng.standard_normal((60, 8)) + 100
    assert precision_recall(real, fake, k=3, device="cpu") == (0.0, 0.0)


@pytest.mark.parametrize("block_size", [7, 10000])
def test_precision_recall_matches_brute_force_knn(block_size):
    rng = np.random.default_rng(8)
    real = rng.standard_normal((70, 5))
    fake = np.concatenate([rng.standard_normal((30, 5)) * 0.5, rng.standard_normal((25, 5)) * 2 + 2])
    expected = brute_force_precision_recall(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case where both sides matter
    got = precision_recall(torch.tensor(real), torch.tensor(fake), k=3, block_size=block_size, adm_fp16=False,
                           device="cpu")
    assert got == pytest.approx(expected, abs=1e-12)


def adm_fp16_precision_recall(real, fake, k):
    """ADM's arithmetic written with numpy: every step of a distance block rounded to float16 (sums and
    the matmul accumulated in float32 first), a block with inf/NaN redone in float32, radii and
    comparisons in float32."""
    h, f = np.float16, np.float32

    @np.errstate(over="ignore", invalid="ignore")
    def block(u, v):
        u16, v16 = u.astype(h), v.astype(h)
        nu = (u16 * u16).astype(f).sum(1).astype(h)[:, None]
        nv = (v16 * v16).astype(f).sum(1).astype(h)[None, :]
        dot = (u16.astype(f) @ v16.astype(f).T).astype(h)
        d = np.maximum((nu - h(2) * dot).astype(h) + nv, h(0)).astype(h)
        if np.isfinite(d).all():
            return d.astype(f)
        u, v = u.astype(f), v.astype(f)
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0)

    r_real = np.sort(block(real, real), axis=1)[:, k]
    r_fake = np.sort(block(fake, fake), axis=1)[:, k]
    d = block(real, fake)
    return (d <= r_real[:, None]).any(0).mean(), (d <= r_fake[None, :]).any(1).mean()


@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: the half blocks overflow and ADM falls back to float32
def test_precision_recall_uses_adm_half_precision_arithmetic(scale):
    rng = np.random.default_rng(9)
    # Many near-ties: 64-d points on a coarse grid, so half rounding decides some neighbours.
    real = (rng.integers(0, 3, (300, 64)) + rng.standard_normal((300, 64)) * 0.05).astype(np.float32) * scale
    fake = (rng.integers(0, 3, (200, 64)) + rng.standard_normal((200, 64)) * 0.05).astype(np.float32) * scale
    got = precision_recall(real, fake, k=3, device="cpu")
    assert got == adm_fp16_precision_recall(real, fake, 3)
    full = precision_recall(real, fake, k=3, adm_fp16=False, device="cpu")
    if scale == 1.0:
        assert got != full  # half precision changes the answer here: the two modes are really different
    else:
        assert got == full


def test_precision_recall_rejects_too_few_samples_and_mismatched_widths():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(x, np.ones((10, 4)), k=3, device="cpu")
    with pytest.raises(ValueError, match="differ in width"):
        precision_recall(np.ones((10, 4)), np.ones((10, 5)), device="cpu")


# -- PSNR and SSIM ---------------------------------------------------------------------------

def image_pairs(seed: int = 9):
    """Smooth uint8 images (B, 3, 40, 48) and noisy copies of them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:48]
    base = np.stack([np.sin(xx / (5 + i)) + np.cos(yy / (4 + c)) for i in range(4) for c in range(3)])
    base = ((base - base.min()) / np.ptp(base) * 255).reshape(4, 3, 40, 48)
    noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255)
    return torch.from_numpy(base.round().astype(np.uint8)), torch.from_numpy(noisy.round().astype(np.uint8))


def test_psnr_and_ssim_of_uint8_images_match_scikit_image():
    a, b = image_pairs()
    got_psnr, got_ssim = psnr(a, b), ssim(a, b)
    for i in range(len(a)):
        x, y = a[i].permute(1, 2, 0).numpy(), b[i].permute(1, 2, 0).numpy()
        assert float(got_psnr[i]) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=255), rel=1e-12)
        assert float(got_ssim[i]) == pytest.approx(
            structural_similarity(x, y, channel_axis=-1, data_range=255), rel=1e-10)


@pytest.mark.parametrize("scale,offset,data_range", [(1 / 255, 0.0, 1.0), (2 / 255, -1.0, 2.0)])
def test_ssim_of_float_images_uses_the_range_given(scale, offset, data_range):
    a, b = image_pairs(10)
    fa, fb = a.double() * scale + offset, b.double() * scale + offset
    got = ssim(fa, fb, data_range=data_range)
    for i in range(len(a)):
        x, y = fa[i].permute(1, 2, 0).numpy(), fb[i].permute(1, 2, 0).numpy()
        assert float(got[i]) == pytest.approx(
            structural_similarity(x, y, channel_axis=-1, data_range=data_range), rel=1e-10)
    # A data range twice too wide inflates SSIM, the error this module guards against.
    assert (ssim(fa, fb, data_range=2 * data_range) > got).all()


def test_psnr_ssim_require_a_data_range_for_float_images():
    a, b = image_pairs()
    with pytest.raises(ValueError, match="data_range is needed"):
        ssim(a.float(), b.float())
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, b[:, :, :20])
    assert ssim(a, a) == pytest.approx(torch.ones(len(a), dtype=torch.float64))
    with pytest.raises(ValueError, match="convention must be one of"):
        ssim(a, b, convention="torchmetrics")


def test_psnr_of_identical_pairs_is_capped_just_above_a_one_level_error():
    a, b = image_pairs()
    mixed = torch.cat([a[:2], b[2:]])
    values = psnr(a, mixed)
    cap = psnr_cap(a)
    assert cap == pytest.approx(10 * math.log10(255**2 * 3 * 40 * 48))
    assert (values[:2] == cap).all() and (values[2:] < cap).all() and torch.isfinite(values).all()
    assert identical_pairs(a, mixed) == 2 and identical_pairs(a, b) == 0
    one_level = a.clone()
    one_level[0, 0, 0, 0] += 1 if one_level[0, 0, 0, 0] < 255 else -1
    assert float(psnr(a[:1], one_level[:1])) == pytest.approx(cap)  # the cap is that smallest possible error


def test_llamagen_ssim_is_scikit_image_with_data_range_2_on_unit_images():
    a, b = image_pairs(11)
    got = ssim(a, b, convention="llamagen")
    for i in range(len(a)):
        x, y = a[i].permute(1, 2, 0).numpy() / 255.0, b[i].permute(1, 2, 0).numpy() / 255.0
        assert float(got[i]) == pytest.approx(structural_similarity(x, y, channel_axis=-1, data_range=2.0), rel=1e-10)
    assert (got > ssim(a, b)).all()  # the inflation the convention is known for


# -- Evaluation arithmetic ---------------------------------------------------------------------

def test_metric_networks_and_distances_run_without_tf32_and_restore_the_callers_settings(monkeypatch):
    import importlib

    from ctok.metrics.features import network_features
    from ctok.numerics import float32_modes

    precision_recall_module = importlib.import_module("ctok.metrics.precision_recall")  # the function shadows it
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, images):
            seen.append(float32_modes())
            return {"pool": images.flatten(1)}

    before = float32_modes()
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # what training leaves behind
    try:
        network_features(Probe(), torch.zeros(2, 3, 4, 4))
        distances = precision_recall_module._squared_distances
        monkeypatch.setattr(precision_recall_module, "_squared_distances",
                            lambda *args: seen.append(float32_modes()) or distances(*args))
        precision_recall(np.eye(5), np.eye(5), k=1, device="cpu")
        assert float32_modes()["cuda.matmul"] == "tf32" and float32_modes()["cudnn.conv"] == before["cudnn.conv"]
    finally:
        torch.backends.cuda.matmul.fp32_precision = before["cuda.matmul"]
    assert len(seen) > 1 and all(set(modes.values()) == {"ieee"} for modes in seen)


def test_generation_allows_tf32_on_cuda_only_and_restores_the_callers_settings():
    from ctok.numerics import float32_modes, ieee_float32, tf32_on_cuda

    with ieee_float32():  # a caller that had everything in IEEE float32
        with tf32_on_cuda(torch.device("cpu")):
            assert set(float32_modes().values()) == {"ieee"}
        with tf32_on_cuda(torch.device("cuda")):
            inside = float32_modes()
        assert set(float32_modes().values()) == {"ieee"}
    assert inside == {"cuda.matmul": "tf32", "cudnn.conv": "tf32", "mkldnn.matmul": "ieee", "mkldnn.conv": "ieee"}
