"""How good a latent space is for a generator, measured without training one (MAETok's analysis).

MAETok's argument is about the latents rather than the reconstructions: a tokenizer trained with
mask modelling gives latents whose distribution has fewer, better separated Gaussian-mixture modes
and more discriminative features, and a diffusion model learns such a distribution faster. This
module measures those properties of a set of latents (n, N tokens, D):

- **GMM fits** (:func:`fit_gmms`): scikit-learn's ``GaussianMixture`` with diagonal covariances,
  fitted by EM on the flattened latents (optionally after PCA) for each component count K;
  train and held-out negative log-likelihood per dimension (nats), BIC, and per-component
  weights, mean norms and the smallest distance between two means.
- **Linear probe** (:func:`linear_probe`): logistic regression on the mean-pooled tokens and on
  the flattened latents, held-out accuracy against the majority-class baseline.
- **Geometry** (:func:`latent_geometry`): per-channel mean and std, per-token variance, the
  eigenvalue spectrum of the flattened latents' covariance and the share of variance in its top
  principal components.

Every fit uses one seeded split (:func:`split_indices`), so the numbers are deterministic, and the
GMM's and the probe's held-out latents are the same. :func:`analyze_latents` runs all three on an
array (cheap enough for a training dashboard on a few hundred latents with :data:`QUICK_COMPONENTS`);
:func:`encode_images` and :func:`read_latent_cache` gather the latents of a tokenizer or of a
finished latent cache with the normalisation a generator would apply; :func:`plot_analyses` draws
several analyses into one plot per metric. ``ctok analyze-latents`` is the command on top.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ctok.atomic_files import save_figure, write_json
from ctok.latent_cache import LatentCache, LatentStatistics
from ctok.latent_encoding import encode_latents
from ctok.models.diffusion_transformer import LatentStats
from ctok.numerics import PRECISIONS, effective_precision
from ctok.training.generator_data import stats_subset

ANALYSIS_FORMAT = "ctok-latent-analysis"
ANALYSIS_VERSION = 1
DEFAULT_COMPONENTS = (1, 2, 4, 8, 16, 32, 64)
# A few hundred latents cannot support 64 components; these few show the trend at a fraction of the cost.
QUICK_COMPONENTS = (1, 4, 16)
# EM stops when an iteration improves the mean log-likelihood by less than GMM_TOL_PER_DIM nats per
# dimension, or after GMM_MAX_ITER iterations (reported as converged: false). sklearn's default, 1e-3
# nats per *sample*, is 4e-6 per dimension for 256-wide latents: on the demo tokenizer's 10,000
# latents it ran 3.6 times as many EM iterations over K = 1 ... 64 and moved no held-out NLL by
# more than 0.003 nats per dimension over this setting.
GMM_MAX_ITER = 100
GMM_TOL_PER_DIM = 1e-4
# lbfgs on whitened features (see _probe_one) converged in 30-60 iterations on the demo's latents.
PROBE_MAX_ITER = 500
# Covariance eigenvalue shares are reported at these numbers of principal components (up to the width).
TOP_COMPONENTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def split_indices(n: int, held_out: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of ``n`` samples: a seeded permutation, ``round(held_out * n)`` held out.

    Both parts are sorted and non-empty; a ``held_out`` outside (0, 1), or one that leaves a part
    empty, is a ValueError.
    """
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    count = round(held_out * n)
    if count < 1 or count >= n:
        raise ValueError(f"a held-out fraction of {held_out} of {n} latents leaves no train or no held-out latents; "
                         "analyse more latents")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[count:]), np.sort(order[:count])


def _as_array(name: str, x, ndim: tuple[int, ...]) -> np.ndarray:
    """``x`` (numpy or torch) as a finite float64 array with one of the ``ndim`` numbers of axes."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} axes, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: there is nothing to analyse")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def _as_tokens(latents) -> np.ndarray:
    """Latents (n, N, D); features (n, d) are taken as one token of width d."""
    latents = _as_array("latents", latents, (2, 3))
    return latents[:, None] if latents.ndim == 2 else latents


def _one_thread():
    """A context in which BLAS and OpenMP run on one thread.

    EM and lbfgs make thousands of small matrix products on thin (n, d) arrays; between them
    OpenBLAS's worker threads spin. On a 2-core machine shared with other work, two threads made
    the default analysis of 10,000 demo latents 10x slower (GMMs 60 s instead of 5 s, the probe
    30 s instead of 1 s); with one thread the whole analysis takes seconds at these sizes.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _check_components(components, num_train: int) -> tuple[int, ...]:
    components = tuple(int(k) for k in components)
    if not components or min(components) < 1:
        raise ValueError(f"components must be positive component counts, got {list(components)}")
    if max(components) > num_train:
        raise ValueError(f"a {max(components)}-component mixture needs at least {max(components)} training latents, "
                         f"got {num_train}: analyse more latents or use fewer components")
    return components


def _project(train: np.ndarray, held: np.ndarray, pca_dim: int | None, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                                            float | None]:
    """Both parts projected on the top ``pca_dim`` principal axes of the train part, and the variance share kept."""
    if pca_dim is None:
        return train, held, None
    from sklearn.decomposition import PCA

    if not 1 <= pca_dim <= min(train.shape):
        raise ValueError(f"pca_dim must be between 1 and {min(train.shape)} (the latent width and the training "
                         f"latents), got {pca_dim}")
    pca = PCA(pca_dim, random_state=seed).fit(train)
    return pca.transform(train), pca.transform(held), float(pca.explained_variance_ratio_.sum())


def _component_stats(gmm) -> dict:
    """Weights, mean norms and the smallest distance between two means of a fitted mixture."""
    means = gmm.means_
    gaps = None
    if len(means) > 1:
        squared = (means**2).sum(1)
        distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * means @ means.T, 0.0))
        gaps = float(distances[np.triu_indices(len(means), 1)].min())
    return {"weights": gmm.weights_.tolist(), "mean_norms": np.linalg.norm(means, axis=1).tolist(),
            "min_mean_distance": gaps}


def fit_gmms(x, components=DEFAULT_COMPONENTS, *, pca_dim: int | None = None, held_out: float = 0.2, seed: int = 0,
             max_iter: int = GMM_MAX_ITER, tol_per_dim: float = GMM_TOL_PER_DIM, n_init: int = 1) -> dict:
    """Diagonal Gaussian mixtures fitted by EM to ``x`` for each component count in ``components``.

    ``x``: latents (n, N, D), flattened to (n, N * D), or features (n, d). The fits see the train
    part of :func:`split_indices` (``held_out``, ``seed``), after PCA to ``pca_dim`` (fitted on that
    part) if given. scikit-learn's ``GaussianMixture(covariance_type="diag")`` with k-means
    initialisation, ``random_state=seed``, ``max_iter``, ``tol_per_dim`` (EM stops when the mean
    log-likelihood per sample rises by less than ``tol_per_dim`` times the dimension) and ``n_init``
    restarts: deterministic for a given input. The defaults bound the time (see
    :data:`GMM_TOL_PER_DIM`): 10,000 latents of 8 x 32 through K = 1 ... 64 take about 5 s on one
    CPU core (the fits run single-threaded, see :func:`_one_thread`). A fit that hit ``max_iter``
    says ``converged: false``.

    Returns ``{"dim", "input_dim", "pca_dim", "pca_explained_variance", "num_train", "num_held_out",
    "max_iter", "tol_per_dim", "n_init", "best_held_out_components", "fits"}``; each of ``fits`` has
    ``components``, ``train_nll_per_dim`` and ``held_out_nll_per_dim`` (mean negative log-likelihood
    per sample divided by ``dim``, in nats), ``bic`` (on the train part), ``converged``,
    ``iterations``, and per component ``weights``, ``mean_norms``, ``min_mean_distance`` (None for K = 1).
    """
    x = _as_array("latents", x, (2, 3))
    x = x.reshape(len(x), -1)
    train_idx, held_idx = split_indices(len(x), held_out, seed)
    components = _check_components(components, len(train_idx))
    with _one_thread():
        train, held, kept = _project(x[train_idx], x[held_idx], pca_dim, seed)
        fits = [_fit_gmm(train, held, k, seed=seed, max_iter=max_iter, tol_per_dim=tol_per_dim, n_init=n_init)
                for k in components]
    best = min(fits, key=lambda f: f["held_out_nll_per_dim"])["components"]
    return {"dim": train.shape[1], "input_dim": x.shape[1], "pca_dim": pca_dim, "pca_explained_variance": kept,
            "num_train": len(train_idx), "num_held_out": len(held_idx), "max_iter": max_iter,
            "tol_per_dim": tol_per_dim, "n_init": n_init, "best_held_out_components": best, "fits": fits}


def _fit_gmm(train: np.ndarray, held: np.ndarray, k: int, *, seed: int, max_iter: int, tol_per_dim: float,
             n_init: int) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    dim = train.shape[1]
    gmm = GaussianMixture(k, covariance_type="diag", max_iter=max_iter, tol=tol_per_dim * dim, n_init=n_init,
                          random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as "converged" instead
        gmm.fit(train)
    return {"components": k, "train_nll_per_dim": -float(gmm.score(train)) / dim,
            "held_out_nll_per_dim": -float(gmm.score(held)) / dim, "bic": float(gmm.bic(train)),
            "converged": bool(gmm.converged_), "iterations": int(gmm.n_iter_), **_component_stats(gmm)}


def _check_labels(labels, n: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers, one per latent, got {labels.dtype} of shape {labels.shape}")
    return labels


def _whitener(train: np.ndarray):
    """x -> its coordinates on the train part's principal axes, each scaled to unit variance.

    Axes with almost no variance (below 1e-6 of the largest singular value: collinear or constant
    features, or fewer samples than features) are dropped rather than blown up.
    """
    mean = train.mean(0)
    _, singular, axes = np.linalg.svd(train - mean, full_matrices=False)
    keep = singular > singular[0] * 1e-6 if singular[0] > 0 else np.zeros_like(singular, dtype=bool)
    if not keep.any():
        raise ValueError("the probe's features do not vary over the train part: every latent is the same")
    scale = np.sqrt(len(train)) / singular[keep]
    return lambda x: (x - mean) @ axes[keep].T * scale


def _probe_one(features: np.ndarray, labels: np.ndarray, train: np.ndarray, held: np.ndarray, seed: int,
               max_iter: int) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # Whitened features: a linear probe's accuracy does not depend on an invertible linear map of its
    # inputs, but lbfgs's speed does. Latents whose variance sits in a few directions made it run
    # for ~1000 iterations (minutes) on the demo's latents; whitened, it converges in ~50.
    whiten = _whitener(features[train])
    model = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as "converged" instead
        model.fit(whiten(features[train]), labels[train])
    iterations = int(model.n_iter_.max())
    return {"features": features.shape[1], "whitened_features": int(whiten(features[:1]).shape[1]),
            "train_accuracy": float(model.score(whiten(features[train]), labels[train])),
            "held_out_accuracy": float(model.score(whiten(features[held]), labels[held])),
            "converged": iterations < max_iter, "iterations": iterations}


def linear_probe(latents, labels, *, held_out: float = 0.2, seed: int = 0, max_iter: int = PROBE_MAX_ITER) -> dict:
    """Held-out accuracy of logistic regression on latents (n, N, D): mean-pooled tokens and flattened.

    The split is :func:`split_indices` (``held_out``, ``seed``), the same as :func:`fit_gmms`'s; each
    feature set is whitened with the train part's principal axes, then fitted by scikit-learn's
    ``LogisticRegression`` (lbfgs, L2, C = 1, ``max_iter``; the L2 penalty acts on the whitened
    coordinates). ``chance`` is the held-out share of the
    most frequent class: what always guessing it scores. Labels of fewer than two classes (in all,
    or in the train part) are a ValueError.

    Returns ``{"num_classes", "num_train", "num_held_out", "chance", "mean_pooled", "flattened"}``,
    the last two with ``features``, ``whitened_features`` (the directions kept), ``train_accuracy``,
    ``held_out_accuracy``, ``converged``, ``iterations``.
    """
    latents = _as_tokens(latents)
    labels = _check_labels(labels, len(latents))
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"the linear probe needs latents of at least two classes, but all {len(labels)} are of "
                         f"class {classes[0]}: analyse labelled data or turn the probe off (--no-probe)")
    train, held = split_indices(len(latents), held_out, seed)
    if len(np.unique(labels[train])) < 2:
        raise ValueError("the probe's train part holds a single class: analyse more latents")
    majority = np.unique(labels[held], return_counts=True)[1].max()
    with _one_thread():
        pooled = _probe_one(latents.mean(1), labels, train, held, seed, max_iter)
        flattened = _probe_one(latents.reshape(len(latents), -1), labels, train, held, seed, max_iter)
    return {"num_classes": len(classes), "num_train": len(train), "num_held_out": len(held),
            "chance": float(majority / len(held)), "mean_pooled": pooled, "flattened": flattened}


def latent_geometry(latents) -> dict:
    """Second-order shape of latents (n, N, D), population statistics over all n.

    ``channel_mean`` / ``channel_std`` (D): over samples and tokens. ``token_variance`` (N): each
    token's variance over samples, summed over its channels (how the variance is spread over the
    tokens). ``variance_spectrum``: the eigenvalues of the flattened (N * D) latents' covariance,
    largest first, as shares of the total; ``top_share``: the share held by the top k principal
    components, for k in :data:`TOP_COMPONENTS` up to N * D; ``effective_dim``: the participation
    ratio (sum of eigenvalues)^2 / sum of squares, the number of equally strong directions that
    would hold the same variance.
    """
    latents = _as_tokens(latents)
    n, tokens, dim = latents.shape
    flat = latents.reshape(n, -1)
    centred = flat - flat.mean(0)
    eigenvalues = np.clip(np.linalg.eigvalsh(centred.T @ centred / n)[::-1], 0.0, None)
    total = float(eigenvalues.sum())
    shares = eigenvalues / total if total > 0 else np.zeros_like(eigenvalues)
    cumulative = np.cumsum(shares)
    channels = latents.reshape(-1, dim)
    return {"channel_mean": channels.mean(0).tolist(), "channel_std": channels.std(0).tolist(),
            "token_variance": latents.var(0).sum(1).tolist(), "total_variance": total,
            "variance_spectrum": shares.tolist(),
            "top_share": {str(k): float(cumulative[k - 1]) for k in TOP_COMPONENTS if k <= flat.shape[1]},
            "effective_dim": total**2 / float((eigenvalues**2).sum()) if total > 0 else 0.0}


def analyze_latents(latents, labels=None, *, components=DEFAULT_COMPONENTS, pca_dim: int | None = None,
                    held_out: float = 0.2, seed: int = 0, probe: bool = True, max_iter: int = GMM_MAX_ITER,
                    tol_per_dim: float = GMM_TOL_PER_DIM) -> dict:
    """GMM fits, linear probe and geometry of latents (n, N, D) (numpy or torch; features (n, d) are
    one token), as a JSON-ready dict.

    ``latents`` are analysed as given: normalise them first as the generator would (see
    :class:`LatentSample`). ``labels`` (n,) integers, or None: the probe needs them (``probe=False``
    skips it). ``components``, ``pca_dim``, ``max_iter``, ``tol_per_dim``: :func:`fit_gmms`; ``held_out``,
    ``seed``: the one split both the GMMs and the probe use. For a cheap look (a training dashboard,
    a few hundred latents) pass ``components=QUICK_COMPONENTS``.

    Returns ``{"num_latents", "num_tokens", "latent_dim", "settings", "gmm", "probe", "probe_note",
    "geometry", "seconds"}``: ``probe`` is None when it did not run, and ``probe_note`` says why.
    """
    latents = _as_tokens(latents)
    settings = {"components": [int(k) for k in components], "pca_dim": pca_dim, "held_out": held_out, "seed": seed,
                "gmm_max_iter": max_iter,
                "gmm_tol_per_dim": tol_per_dim, "probe": probe}
    seconds = {}
    start = time.perf_counter()
    gmm = fit_gmms(latents, components, pca_dim=pca_dim, held_out=held_out, seed=seed, max_iter=max_iter,
                   tol_per_dim=tol_per_dim)
    seconds["gmm"] = time.perf_counter() - start
    probe_result, note = None, None
    if not probe:
        note = "turned off"
    elif labels is None:
        note = "no labels: the images carry no classes"
    else:
        start = time.perf_counter()
        probe_result = linear_probe(latents, labels, held_out=held_out, seed=seed)
        seconds["probe"] = time.perf_counter() - start
    start = time.perf_counter()
    geometry = latent_geometry(latents)
    seconds["geometry"] = time.perf_counter() - start
    return {"num_latents": latents.shape[0], "num_tokens": latents.shape[1], "latent_dim": latents.shape[2],
            "settings": settings, "gmm": gmm, "probe": probe_result, "probe_note": note, "geometry": geometry,
            "seconds": seconds}


def summary_scores(analysis: dict) -> dict[str, float]:
    """The scalar scores of an :func:`analyze_latents` result that runs are compared by: held-out GMM
    NLL per dimension for each K (``gmm_nll_k<K>``) and, when the probe ran, its two held-out accuracies."""
    scores = {f"gmm_nll_k{fit['components']}": fit["held_out_nll_per_dim"] for fit in analysis["gmm"]["fits"]}
    if analysis["probe"] is not None:
        scores["probe_mean_pooled"] = analysis["probe"]["mean_pooled"]["held_out_accuracy"]
        scores["probe_flattened"] = analysis["probe"]["flattened"]["held_out_accuracy"]
    return scores


@dataclass(frozen=True)
class LatentSample:
    """Latents to analyse, with the normalisation a generator trained on them would apply.

    ``latents``: float32 (n, N, D) as the tokenizer returns them; ``labels``: int64 (n,), or None
    for images without classes; ``stats``: the generator's ``(z - mean) / std``; ``source``: what
    was analysed (JSON-ready: the tokenizer or cache, the data, how the subset was drawn).
    """

    latents: np.ndarray
    labels: np.ndarray | None
    stats: LatentStats
    source: dict

    def normalized(self) -> np.ndarray:
        """The latents as the generator sees them, float64."""
        return (self.latents.astype(np.float64) - self.stats.mean) / self.stats.std


def _generator_stats(own: LatentStats, of_data) -> LatentStats:
    # The order choose_latent_stats (training/generator_data.py) follows, so that the analysis sees
    # the space a generator trains in: the tokenizer's own vq_mean/vq_std when set, else the data's.
    return own if (own.mean, own.std) != (0.0, 1.0) else of_data()


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for all), got {limit}")


def _subset_note(chosen: int, total: int, seed: int) -> str:
    return f"all {total}" if chosen == total else f"{chosen} of {total} drawn at random (seed {seed})"


@torch.no_grad()
def encode_images(tokenizer, images: Dataset, *, limit: int | None = None, seed: int = 0, batch_size: int = 64,
                  num_workers: int = 0, data_source: str = "", precision: str = "fp32") -> LatentSample:
    """The latents of ``images`` ((image, label) pairs, e.g. :func:`ctok.data.open_images`) by ``tokenizer``.

    ``limit`` images drawn at random with ``seed`` (all when None or larger), encoded on the
    tokenizer's device in batches, through the latent cache's own encoding path
    (:func:`ctok.latent_encoding.encode_latents`) in ``precision``, which the source records: a cache
    of the same images built in the same precision holds the same latents. Normalised with the
    tokenizer config's vq_mean/vq_std when set, else with the scalar mean and std of the encoded
    latents themselves (for such a cache, the cache's statistics are the same numbers). A dataset
    with ``has_labels`` False (a flat image folder) gives ``labels`` None. Unreadable images are
    skipped and listed in ``source``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    _check_limit(limit)
    indices = stats_subset(len(images), len(images) if limit is None else limit, seed)
    loader = DataLoader(Subset(images, indices), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=getattr(images, "collate", None))
    device = next(tokenizer.parameters()).device
    latents, labels, skipped = [], [], []
    for batch in loader:
        skipped.extend(getattr(batch, "skipped", ()))
        latents.append(encode_latents(tokenizer, batch[0].to(device), precision=precision).cpu().numpy())
        labels.append(torch.as_tensor(batch[1], dtype=torch.int64).numpy())
    latents = np.concatenate(latents) if latents else np.empty((0,))
    if len(latents) == 0:
        raise ValueError(f"none of the {len(indices)} images could be read: there are no latents to analyse")

    def of_data() -> LatentStats:
        stats = LatentStatistics(latents.shape[-1])
        stats.update(torch.from_numpy(latents))
        summary = stats.summary()
        return LatentStats(summary["mean"], summary["std"], f"statistics of the {len(latents)} analysed latents")

    source = {"kind": "tokenizer", "tokenizer": tokenizer.identity(), "data": data_source,
              "precision": effective_precision(precision, device),
              "images": _subset_note(len(indices), len(images), seed), "num_latents": len(latents),
              "skipped": skipped}
    return LatentSample(latents, np.concatenate(labels) if getattr(images, "has_labels", True) else None,
                        _generator_stats(LatentStats.of_tokenizer(tokenizer), of_data), source)


def read_latent_cache(folder: str | Path, *, limit: int | None = None, seed: int = 0, view: int = 0) -> LatentSample:
    """The latents of a finished latent cache (:class:`ctok.latent_cache.LatentCache`) and their labels.

    ``limit`` samples drawn at random with ``seed`` (all when None or larger), the same ones
    :func:`encode_images` draws from the images the cache was built from; ``view`` 0 is the image
    itself, 1 its mirror (caches built with ``--flip``). Normalised as a generator trained on the
    cache is: with the tokenizer config's vq_mean/vq_std when set, else the cache's statistics
    (over all its samples and views).
    """
    _check_limit(limit)
    cache = LatentCache(folder)
    if len(cache) == 0:
        raise ValueError(f"the latent cache {folder} holds no latents: there is nothing to analyse")
    if not 0 <= view < cache.info.num_views:
        raise ValueError(f"view must be between 0 and {cache.info.num_views - 1} for the cache {folder}, got {view}")
    indices = stats_subset(len(cache), len(cache) if limit is None else limit, seed)
    items = [cache[i] for i in indices]
    latents = np.stack([z[view].numpy() for z, _ in items])
    labels = np.array([y for _, y in items], dtype=np.int64)
    record = cache.index["tokenizer"]
    own = LatentStats(float(record["vq_mean"]), float(record["vq_std"]), "tokenizer config (vq_mean, vq_std)")
    stats = _generator_stats(own, lambda: LatentStats(cache.info.mean, cache.info.std, f"latent cache {folder}"))
    source = {"kind": "latent cache", "cache": str(folder), "tokenizer": cache.info.tokenizer_identity,
              "data": cache.index["dataset"], "images": _subset_note(len(indices), len(cache), seed),
              "num_latents": len(latents), "view": view}
    return LatentSample(latents, labels, stats, source)


def analyze_sample(sample: LatentSample, **settings) -> dict:
    """:func:`analyze_latents` of ``sample``'s normalised latents and labels, with its ``source`` and
    ``normalization`` (the mean, std and where they came from) in the result."""
    return {"source": sample.source, "normalization": sample.stats.to_dict(),
            **analyze_latents(sample.normalized(), sample.labels, **settings)}


def _plot_gmm(analyses: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    nll, nll_ax = plt.subplots(figsize=(6, 4))
    bic, bic_ax = plt.subplots(figsize=(6, 4))
    for (name, analysis), colour in zip(analyses.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        fits = analysis["gmm"]["fits"]
        ks = [f["components"] for f in fits]
        nll_ax.plot(ks, [f["held_out_nll_per_dim"] for f in fits], "o-", color=colour, label=f"{name} (held out)")
        nll_ax.plot(ks, [f["train_nll_per_dim"] for f in fits], "o--", color=colour, alpha=0.6,
                    label=f"{name} (train)")
        bic_ax.plot(ks, [f["bic"] for f in fits], "o-", color=colour, label=name)
    for ax, ylabel in ((nll_ax, "GMM NLL per dimension (nats)"), (bic_ax, "BIC (train part)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mixture components K")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return [save_figure(nll, out / "gmm_nll.png"), save_figure(bic, out / "gmm_bic.png")]


def _plot_probe(analyses: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    probed = {name: a["probe"] for name, a in analyses.items() if a["probe"] is not None}
    if not probed:
        return []
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(probed) + 2), 4))
    positions = np.arange(len(probed))
    for offset, kind in ((-0.2, "mean_pooled"), (0.2, "flattened")):
        ax.bar(positions + offset, [p[kind]["held_out_accuracy"] for p in probed.values()], width=0.4,
               label=kind.replace("_", "-"))
    ax.scatter(positions, [p["chance"] for p in probed.values()], marker="_", s=600, color="black",
               label="chance (majority class)", zorder=3)
    ax.set_xticks(positions, list(probed), fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("linear-probe accuracy (held out)")
    ax.legend(fontsize=7)
    return [save_figure(fig, out / "probe_accuracy.png")]


def _plot_spectrum(analyses: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, analysis in analyses.items():
        shares = analysis["geometry"]["variance_spectrum"]
        ax.plot(np.arange(1, len(shares) + 1), np.cumsum(shares), label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("principal components")
    ax.set_ylabel("share of the variance")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return [save_figure(fig, out / "variance_spectrum.png")]


def plot_analyses(analyses: dict[str, dict], out: str | Path) -> list[Path]:
    """One PNG per metric in folder ``out``, every analysis (name -> :func:`analyze_latents` result) in each.

    ``gmm_nll.png`` (held-out solid, train dashed, against K), ``gmm_bic.png``,
    ``probe_accuracy.png`` (when some analysis has a probe; chance marked) and
    ``variance_spectrum.png`` (cumulative share against the number of principal components).
    Returns the paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [*_plot_gmm(analyses, out), *_plot_probe(analyses, out), *_plot_spectrum(analyses, out)]


def analyze_to_folder(samples: dict[str, LatentSample], out: str | Path, **settings) -> dict:
    """Analyse each named sample (:func:`analyze_sample` with ``settings``), plot them together
    (:func:`plot_analyses`) and write ``analysis.json`` in ``out``; returns what was written.

    ``analysis.json``: ``{"format", "version", "analyses": {name: analysis}, "plots": [file names],
    "seconds"}``; each analysis records its source, normalisation and settings.
    """
    if not samples:
        raise ValueError("nothing to analyse: give at least one tokenizer or latent cache")
    start = time.perf_counter()
    analyses = {name: analyze_sample(sample, **settings) for name, sample in samples.items()}
    out = Path(out)
    plots = plot_analyses(analyses, out)
    record = {"format": ANALYSIS_FORMAT, "version": ANALYSIS_VERSION, "analyses": analyses,
              "plots": [p.name for p in plots], "seconds": time.perf_counter() - start}
    write_json(out / "analysis.json", record)
    return record
