"""A tokenizer's reconstructions of a folder of images, and their rFID, PSNR, SSIM and LPIPS.

Every image is centre-cropped the ADM way, encoded and decoded, and both the crop and its
reconstruction are quantised to uint8 (what a saved image holds; :func:`ctok.uint8.to_uint8`). rFID
compares the reconstructions with the same crops; PSNR and SSIM are computed on the uint8 images
(data range 255) and averaged over images (identical pairs get PSNR's cap and are counted; SSIM in
the standard or the llamagen convention); LPIPS (AlexNet by default, or VGG) needs its trunk's
weights and is null, with the reason, without them. :func:`reconstruct_folder` writes
``metrics.json`` (with the protocol card), ``reconstructions.npz`` (``arr_0``, uint8 (N, S, S, 3),
dataset order) and ``reconstructions.png`` (originals beside their reconstructions).

Under torchrun each process takes a contiguous slice of the images and writes a shard to
``out/.shards``; the first process merges them (``ctok reconstruct`` is this function on flags).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ctok.atomic_files import save_image_grid, write_json
from ctok.data.images import ImageFolder, usable_workers
from ctok.locking import folder_lock
from ctok.metrics.features import network_features, network_identity, to_network_input
from ctok.metrics.frechet import fid
from ctok.metrics.image_quality import SSIM_CONVENTIONS, psnr, ssim
from ctok.metrics.inception import PUBLISHED_IDENTITY, load_inception
from ctok.metrics.lpips import DEFAULT_NET, lpips
from ctok.metrics.sample_npz import write_npz_images
from ctok.models.tokenizer import Tokenizer
from ctok.protocol import ProtocolCard
from ctok.training.distributed import DistContext, barrier, gather_objects
from ctok.uint8 import DEFAULT_QUANTISATION, check_quantisation, to_uint8

METRICS_NAME = "metrics.json"
RECONSTRUCTIONS_NAME = "reconstructions.npz"
GRID_NAME = "reconstructions.png"
SHARDS = ".shards"
# Originals and reconstructions side by side: at most this many pairs per row of the grid.
GRID_PAIRS_PER_ROW = 4


def reconstruct_folder(tokenizer: Tokenizer, data: str | os.PathLike, out: str | os.PathLike, *,
                       feature_network: torch.nn.Module | None = None, lpips_net: str = DEFAULT_NET,
                       lpips_weights: str | os.PathLike | None = None, ssim_convention: str = "standard",
                       quantisation: str = DEFAULT_QUANTISATION, limit: int | None = None, batch_size: int = 32,
                       num_workers: int = 4, grid_images: int = 8, tokenizer_source: str | None = None,
                       ctx: DistContext | None = None) -> dict | None:
    """Reconstruct the images under ``data`` (ImageNet class sub-folders, or flat; the first ``limit``
    in sorted file order) and write ``metrics.json``, ``reconstructions.npz`` and ``reconstructions.png``
    to ``out``.

    ``feature_network`` gives rFID's features (default: the published Inception, from
    ``$CTOK_INCEPTION_WEIGHTS`` or torch's hub cache); ``lpips_net`` is LPIPS's trunk, "alex" (the
    field's tables) or "vgg", and ``lpips_weights`` its torchvision weight file (default: the
    variant's environment variable, then torch's hub cache, see :mod:`ctok.metrics.lpips`);
    ``ssim_convention`` is :func:`ctok.metrics.image_quality.ssim`'s; ``quantisation`` one of
    :data:`ctok.uint8.QUANTISATIONS`.
    ``tokenizer_source`` is recorded in metrics.json as where the tokenizer came from. ``ctx``: this
    process's place under torchrun (:func:`ctok.training.distributed.init_distributed`); None is a
    single process on the tokenizer's device. The tokenizer and the feature network are moved to
    ``ctx.device`` and put in eval mode.

    Returns the metrics written to metrics.json on the first process, None on the others.

    Raises:
        ValueError: for a batch_size or grid_images below 1, a limit below 2, or fewer than 2
            readable images (rFID needs a covariance).
    """
    for name, value in (("batch_size", batch_size), ("grid_images", grid_images)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if limit is not None and limit < 2:
        raise ValueError(f"limit must be at least 2 (rFID needs a covariance), got {limit}")
    check_quantisation(quantisation)
    if ssim_convention not in SSIM_CONVENTIONS:
        raise ValueError(f"ssim_convention must be one of {SSIM_CONVENTIONS}, got {ssim_convention!r}")
    if ctx is None:
        ctx = DistContext(rank=0, world_size=1, local_rank=0, device=next(tokenizer.parameters()).device)
    tokenizer = tokenizer.to(ctx.device).eval()
    network = load_inception(device=ctx.device) if feature_network is None else feature_network
    network = network.to(ctx.device).eval()
    dataset = ImageFolder(data, tokenizer.image_size, crop="center")
    total = len(dataset) if limit is None else min(limit, len(dataset))
    start, end = ctx.rank * total // ctx.world_size, (ctx.rank + 1) * total // ctx.world_size
    loader = DataLoader(Subset(dataset, range(start, end)), batch_size=batch_size, shuffle=False,
                        num_workers=usable_workers(num_workers), collate_fn=dataset.collate)
    lpips_network, lpips_reason = _load_lpips(lpips_net, lpips_weights, ctx.device)
    out = Path(out)
    scoring = _Scoring(network, lpips_network, ssim_convention, quantisation)
    with folder_lock(out, hold=ctx.is_main):
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        count, grid = _reconstruct_slice(tokenizer, loader, scoring, out / SHARDS, end - start, grid_images, ctx)
        done = sum(gather_objects(count, ctx))  # also waits until every shard is written
        if done < 2:
            raise ValueError(f"only {done} image(s) could be reconstructed; rFID needs at least 2")
        results = None
        if ctx.is_main:
            about = _about(tokenizer, tokenizer_source, data, network, scoring, lpips_net, lpips_reason, done, ctx)
            results = _finish(out, ctx.world_size, about, grid[:grid_images])
        barrier()
    return results


def _about(tokenizer: Tokenizer, tokenizer_source: str | None, data, network: torch.nn.Module, scoring: "_Scoring",
           lpips_net: str, lpips_reason: str | None, count: int, ctx: DistContext) -> dict:
    """What metrics.json says besides the numbers: inputs, unavailable metrics, files and the protocol card."""
    identity = network_identity(network)
    card = ProtocolCard.here(ctx.device, feature_network=identity, num_samples=count, num_reference=count,
                             quantisation=scoring.quantisation, lpips=lpips_net, ssim=scoring.ssim_convention)
    return {
        "unavailable": {"lpips": lpips_reason} if lpips_reason else {},
        "image_size": tokenizer.image_size,
        "tokenizer": {"source": tokenizer_source, "identity": tokenizer.identity()},
        "feature_network": {"identity": identity, "published_inception": identity == PUBLISHED_IDENTITY},
        "psnr_ssim_on": "uint8 images, data range 255",
        "data": str(data),
        "files": {"reconstructions": RECONSTRUCTIONS_NAME, "grid": GRID_NAME},
        "protocol": card.to_dict(),
    }


def _finish(out: Path, world_size: int, about: dict, grid: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """On the first process: merge the shards, draw the grid and write metrics.json (the metrics, then ``about``)."""
    results = {**_merge(out, world_size), **about}
    if grid:  # empty only when the first process's slice held no readable image
        save_image_grid(out / GRID_NAME, torch.stack([t for pair in grid for t in pair]),
                        nrow=2 * min(GRID_PAIRS_PER_ROW, len(grid)), pad_value=255)
    write_json(out / METRICS_NAME, results)
    return results


def _load_lpips(net: str, weights: str | os.PathLike | None,
                device: torch.device) -> tuple[torch.nn.Module | None, str | None]:
    """(the LPIPS network of ``net``, None), or (None, why not) when its trunk's weights cannot be found."""
    # Looked up when called, so that a stand-in installed in ctok.metrics.lpips is the one used.
    from ctok.metrics.lpips import load_lpips

    try:
        return load_lpips(net, weights, device), None
    except FileNotFoundError as err:
        return None, f"LPIPS-{net} trunk weights unavailable: {err}"


@dataclass(frozen=True)
class _Scoring:
    """What each reconstructed batch is scored with."""

    network: torch.nn.Module  # rFID's features
    lpips: torch.nn.Module | None  # None: LPIPS unavailable
    ssim_convention: str
    quantisation: str


@torch.no_grad()
def _reconstruct_slice(tokenizer: Tokenizer, loader: DataLoader, scoring: _Scoring, shards: Path, size: int,
                       grid_images: int, ctx: DistContext) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Reconstruct this process's ``size`` images into its shard files; returns how many were read
    and its first (crop, reconstruction) pairs for the grid (``grid_images`` or a few more)."""
    side = tokenizer.image_size
    # Reconstructions go straight to a memory-mapped .npy, so no process holds its whole slice.
    images = np.lib.format.open_memmap(shards / f"images-{ctx.rank:05d}.npy", mode="w+", dtype=np.uint8,
                                       shape=(size, side, side, 3))
    count, skipped, grid = 0, [], []
    # Per image: the scores, and the pool features of the crop ("real") and its reconstruction ("fake").
    per_image: dict[str, list] = {"psnr": [], "identical": [], "ssim": [], "lpips": [], "real": [], "fake": []}
    with tqdm(total=size, desc="reconstruct", unit="img", disable=not ctx.is_main) as bar:
        for batch in loader:
            skipped.extend(batch.skipped)
            bar.update(len(batch.images) + len(batch.skipped))
            if not len(batch.images):
                continue
            x = batch.images.to(ctx.device)
            real = to_uint8(x, scoring.quantisation)
            fake = to_uint8(tokenizer.decode(tokenizer.encode(x)), scoring.quantisation)
            for key, values in _scores(real, fake, x, scoring, ctx.device).items():
                per_image[key].append(values)
            images[count:count + len(fake)] = fake.permute(0, 2, 3, 1).cpu().numpy()
            count += len(fake)
            if len(grid) < grid_images:
                grid.extend(zip(real.cpu(), fake.cpu()))
    images.flush()
    del images
    scores = {k: torch.cat(v).numpy() for k, v in per_image.items() if v}
    np.savez(shards / f"scores-{ctx.rank:05d}.npz", count=count, skipped=np.array(skipped, dtype=str), **scores)
    return count, grid


def _scores(real: torch.Tensor, fake: torch.Tensor, x: torch.Tensor, scoring: _Scoring,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Per-image scores of one batch of uint8 crops and reconstructions, and their rFID features."""
    scores = {
        "psnr": psnr(fake, real).cpu(),
        "identical": (fake == real).flatten(1).all(dim=1).cpu(),
        "ssim": ssim(fake, real, convention=scoring.ssim_convention).cpu(),
        "real": network_features(scoring.network, to_network_input(real, device))["pool"].cpu(),
        "fake": network_features(scoring.network, to_network_input(fake, device))["pool"].cpu(),
    }
    if scoring.lpips is not None:
        scores["lpips"] = lpips(to_network_input(fake, device), x, network=scoring.lpips).cpu()
    return scores


def _merge(out: Path, world_size: int) -> dict:
    """Combine the processes' shards (in rank order, i.e. dataset order) and remove them."""
    shards = out / SHARDS
    parts = [dict(np.load(shards / f"scores-{r:05d}.npz")) for r in range(world_size)]
    counts = [int(p["count"]) for p in parts]

    def joined(key):
        found = [p[key] for p in parts if key in p]
        return np.concatenate(found) if found else None

    def pieces():
        for rank, n in enumerate(counts):
            stored = np.load(shards / f"images-{rank:05d}.npy", mmap_mode="r")
            for s in range(0, n, 256):
                yield stored[s:min(s + 256, n)]

    total = sum(counts)
    write_npz_images(out / RECONSTRUCTIONS_NAME, pieces(), total)
    lpips_values = joined("lpips")
    results = {
        "rfid": fid(joined("real"), joined("fake")),
        "psnr": float(joined("psnr").mean()),
        "psnr_identical_pairs": int(joined("identical").sum()),  # their PSNR is the cap (image_quality.psnr_cap)
        "ssim": float(joined("ssim").mean()),
        "lpips": float(lpips_values.mean()) if lpips_values is not None else None,
        "num_images": total,
        "skipped_files": [str(s) for p in parts for s in p["skipped"]],
    }
    shutil.rmtree(shards)
    return results
