"""The latent dashboard of tokenizer training: every ``eval.every`` steps, how good the EMA
tokenizer's latent space looks for a generator, measured on a fixed held-out set.

MAETok's point is that reconstruction quality alone does not predict how well a generator learns
a latent space; the GMM fit and the linear probe of :mod:`ctok.latent_analysis` are cheap proxies
for it. Each evaluation logs, into the run's ``log.jsonl`` (keys ``eval/...``):

- ``eval/psnr_db``: reconstruction PSNR on the uint8 images (as ``ctok reconstruct`` reports it);
- ``eval/rfid``: FID between the feature network's features of the reconstructions and of the
  held-out originals (only with ``eval.feature_network``; the packaged Fashion-MNIST classifier);
- ``eval/gmm_nll_k<K>``: held-out GMM NLL per dimension for each K of ``eval.components``;
- ``eval/probe_mean_pooled``, ``eval/probe_flattened``: linear-probe accuracy, when the images have labels;
- ``eval/seconds``: what the evaluation cost.

and redraws ``dashboard.png`` (each metric against the step) in the run folder from ``log.jsonl``.

The held-out set: ``eval.data`` when set, else Fashion-MNIST's test split when training on
Fashion-MNIST, else the last ``eval.images`` training images (an image folder has no held-out
split; those images are then seen in training, which the log says). The evaluation runs on the main
process only, under ``torch.no_grad``, and puts every global random generator back as it found it,
so a run with the dashboard trains bit for bit as one without it.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from ctok.atomic_files import save_figure
from ctok.training.checkpoint import capture_rng_state, restore_rng_state
from ctok.training.run_log import read_log
from ctok.uint8 import to_uint8

PLOT_NAME = "dashboard.png"


class HeldOutImages(Dataset):
    """Fixed images (n, 3, S, S) in [-1, 1] and their labels (n,) or None, as (image, label) pairs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None):
        self.images = images
        self.labels = labels
        self.has_labels = labels is not None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], (int(self.labels[i]) if self.labels is not None else -1)


def held_out_set(section, train_images: Dataset, train_path: str, image_size: int) -> tuple[HeldOutImages, str]:
    """The dashboard's fixed images (see the module docstring for which) and a note saying which."""
    from ctok.data import open_images
    from ctok.data.fashion_mnist import FashionMNIST, find_fashion_mnist
    from ctok.data.images import BrokenImage

    count = section.images
    if section.data is not None:
        source, note = open_images(section.data, image_size, crop="center"), f"the first images of {section.data}"
    else:
        try:
            folder = find_fashion_mnist(train_path, download=False)
            source, note = FashionMNIST("test", folder, download=False), "the first Fashion-MNIST test images"
        except FileNotFoundError:
            start = max(0, len(train_images) - count)
            source = Subset(train_images, range(start, len(train_images)))
            note = "the last training images (an image folder has no held-out split: they are also trained on)"
    items = [source[i] for i in range(min(count, len(source)))]
    items = [item for item in items if not isinstance(item, BrokenImage)]
    if not items:
        raise ValueError(f"the latent dashboard found no readable held-out images ({note})")
    labelled = getattr(source, "has_labels", getattr(getattr(source, "dataset", None), "has_labels", True))
    labels = torch.tensor([int(label) for _, label in items]) if labelled else None
    return HeldOutImages(torch.stack([image for image, _ in items]), labels), f"{len(items)} of {note}"


class LatentDashboard:
    """Evaluates a tokenizer on :func:`held_out_set`'s images and plots the history (module docstring).

    ``feature_network``: a module returning ``{"pool": features}`` for images in [-1, 1], or None
    (no rFID); ``components``: the GMM component counts; ``run_dir``: where log.jsonl and the plot live.
    """

    def __init__(self, images: HeldOutImages, feature_network: torch.nn.Module | None, components, run_dir: Path,
                 *, seed: int = 0):
        self.images = images
        self.feature_network = feature_network
        self.components = tuple(components)
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.real_features = None if feature_network is None else self._features(images.images)
        self.cost_reported = False

    def _features(self, images: torch.Tensor) -> np.ndarray:
        from ctok.metrics.features import network_features

        pool = [network_features(self.feature_network, batch)["pool"] for batch in images.split(250)]
        return torch.cat(pool).double().numpy()

    def evaluate(self, tokenizer, step: int) -> dict[str, float]:
        """The ``eval/...`` scores of ``tokenizer`` at ``step``; redraws the plot with them."""
        state = capture_rng_state()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                scores = self._scores(tokenizer.eval())
        finally:
            restore_rng_state(state)  # the training streams continue as if nothing had run
        scores["eval/seconds"] = time.perf_counter() - start
        if not self.cost_reported:
            tqdm.write(f"latent dashboard: one evaluation of {len(self.images)} held-out images takes "
                       f"{scores['eval/seconds']:.1f} s")
            self.cost_reported = True
        plot_dashboard(self.run_dir / "log.jsonl", self.run_dir / PLOT_NAME, {"step": step, **scores})
        return scores

    def _scores(self, tokenizer) -> dict[str, float]:
        from ctok.latent_analysis import analyze_latents, encode_images, summary_scores
        from ctok.metrics import psnr
        from ctok.metrics.frechet import fid

        device = next(tokenizer.parameters()).device
        sample = encode_images(tokenizer, self.images, batch_size=250, seed=self.seed)
        # encode_images keeps the images' order when it takes all of them: latent i is image i.
        latents = torch.from_numpy(sample.latents)
        recs = torch.cat([tokenizer.decode(z.to(device)).float().cpu() for z in latents.split(250)])
        originals = self.images.images
        scores = {"eval/psnr_db": float(psnr(to_uint8(recs), to_uint8(originals)).mean())}
        if self.feature_network is not None:
            scores["eval/rfid"] = fid(self.real_features, self._features(recs.clamp(-1, 1)))
        analysis = analyze_latents(sample.normalized(), sample.labels, components=self.components, seed=self.seed)
        scores.update({f"eval/{key}": value for key, value in summary_scores(analysis).items()})
        return scores


def plot_dashboard(log_path: Path, out: Path, latest: dict | None = None) -> Path:
    """``dashboard.png``: one panel per ``eval/...`` metric against the step, from the ``log.jsonl``
    records (and ``latest``, a record not written yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_log(log_path) if any(k.startswith("eval/") for k in r)] + ([latest] if latest else [])
    keys = sorted({k for r in records for k in r if k.startswith("eval/") and k != "eval/seconds"})
    cols = min(3, max(1, len(keys)))
    rows = -(-len(keys) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = sorted((r["step"], r[key]) for r in records if key in r)
        ax.plot(*zip(*points), "o-")
        ax.set_title(key.removeprefix("eval/"), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return save_figure(fig, out, dpi=100)


def build_dashboard(cfg, train_images: Dataset, image_size: int) -> LatentDashboard:
    """The dashboard a tokenizer config's ``eval:`` section asks for (call it where ``eval.every`` > 0,
    on the main process only). Loading the images and the feature network leaves the global random
    generators as they were, so that the other processes, which build nothing, stay in step."""
    from ctok.models.fmnist_classifier import load_fmnist_classifier

    state = capture_rng_state()
    try:
        # Shards are never Fashion-MNIST's folder, so they fall back to the last training images.
        images, note = held_out_set(cfg.eval, train_images, cfg.data.images or cfg.data.shards, image_size)
        network = load_fmnist_classifier() if cfg.eval.feature_network == "fmnist-classifier" else None
    finally:
        restore_rng_state(state)
    rfid = (f"rFID with {network.identity}" if network is not None
            else "no rFID (eval.feature_network is none: no feature network for these images)")
    tqdm.write(f"latent dashboard every {cfg.eval.every} steps on {note}: PSNR, {rfid}, GMM NLL at K = "
               f"{', '.join(map(str, cfg.eval.components))}, linear probe"
               + ("" if images.has_labels else " (off: the images have no labels)"))
    return LatentDashboard(images, network, cfg.eval.components, Path(cfg.run.out_dir), seed=cfg.run.seed)
