"""``ctok reconstruct``: encode and decode a folder of images; rFID, PSNR, SSIM and LPIPS of the reconstructions.

Every image is centre-cropped the ADM way, encoded and decoded, and both the crop and its
reconstruction are quantised to uint8 (what a saved image holds). rFID compares the
reconstructions with the same crops; PSNR and SSIM are computed on the uint8 images (data range
255) and averaged over images; LPIPS needs the VGG16 weights and is null, with the reason, without
them. Writes ``metrics.json``, ``reconstructions.npz`` (``arr_0``, uint8 (N, S, S, 3), dataset order)
and ``reconstructions.png`` (originals beside their reconstructions) to ``--out``.

Under torchrun each process takes a contiguous slice of the images and writes a shard to
``--out/.shards``; the first process merges them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("encode+decode a folder with a tokenizer: rFID, PSNR, SSIM, LPIPS, a comparison grid, "
        "the reconstructions (.npz); torchrun-aware")

METRICS_NAME = "metrics.json"
RECONSTRUCTIONS_NAME = "reconstructions.npz"
GRID_NAME = "reconstructions.png"
SHARDS = ".shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id")
    parser.add_argument("--data", required=True, help="image folder (ImageNet class sub-folders, or flat)")
    parser.add_argument("--image-size", type=int, help="centre-crop size (default and only choice: the tokenizer's)")
    parser.add_argument("--out", required=True, help="folder for metrics.json, reconstructions.npz and the grid")
    parser.add_argument("--limit", type=int, help="reconstruct only the first LIMIT images (sorted file order)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass, per process")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding processes per process")
    network = parser.add_mutually_exclusive_group()
    network.add_argument("--inception-weights", metavar="PATH|random",
                         help="Inception weight file for rFID (default: $CTOK_INCEPTION_WEIGHTS, then torch's hub "
                              "cache); 'random' for a random network whose rFID means nothing (tests)")
    network.add_argument("--feature-network", metavar="MODULE:FACTORY", help="another feature network for rFID")
    parser.add_argument("--vgg-weights", help="torchvision's vgg16-397923af.pth for LPIPS (default: "
                                              "$CTOK_VGG16_WEIGHTS, then torch's hub cache)")
    parser.add_argument("--grid-images", type=int, default=8, help="image pairs in the comparison grid")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def run(args: argparse.Namespace) -> int:
    from ctok.training.distributed import init_distributed, shutdown_distributed

    for name in ("batch_size", "grid_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 2:
        raise ValueError(f"--limit must be at least 2 (rFID needs a covariance), got {args.limit}")
    ctx = init_distributed(args.device)
    try:
        return reconstruct(args, ctx)
    finally:
        shutdown_distributed()


def reconstruct(args: argparse.Namespace, ctx) -> int:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from ctok.atomic_files import save_image_grid, write_json
    from ctok.data.images import ImageFolder
    from ctok.loading import load_tokenizer
    from ctok.metrics.features import load_feature_network, network_features, network_identity, to_network_input
    from ctok.metrics.image_quality import psnr, ssim
    from ctok.metrics.inception import PUBLISHED_IDENTITY
    from ctok.metrics.lpips import load_lpips_vgg, lpips
    from ctok.training.distributed import barrier, gather_objects
    from ctok.uint8 import to_uint8_round

    tokenizer = load_tokenizer(args.tokenizer, device=ctx.device)
    size = tokenizer.image_size
    if args.image_size is not None and args.image_size != size:
        raise ValueError(f"--image-size {args.image_size} differs from the tokenizer's image size {size}; "
                         "it encodes only images of its own size")
    dataset = ImageFolder(args.data, size, crop="center")
    total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    start, end = ctx.rank * total // ctx.world_size, (ctx.rank + 1) * total // ctx.world_size
    loader = DataLoader(Subset(dataset, range(start, end)), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, collate_fn=dataset.collate)
    network = load_feature_network(args.feature_network, args.inception_weights, ctx.device)
    try:
        lpips_net, lpips_reason = load_lpips_vgg(args.vgg_weights, ctx.device), None
    except FileNotFoundError as err:
        lpips_net, lpips_reason = None, f"VGG16 weights unavailable: {err}"

    out = Path(args.out)
    shards = out / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    # Reconstructions go straight to a memory-mapped .npy, so no process holds its whole slice.
    images = np.lib.format.open_memmap(shards / f"images-{ctx.rank:05d}.npy", mode="w+", dtype=np.uint8,
                                       shape=(end - start, size, size, 3))
    count, skipped, grid = 0, [], []
    # Per image: the scores, and the pool features of the crop ("real") and its reconstruction ("fake").
    per_image: dict[str, list] = {"psnr": [], "ssim": [], "lpips": [], "real": [], "fake": []}
    with torch.no_grad(), tqdm(total=end - start, desc="reconstruct", unit="img", disable=not ctx.is_main) as bar:
        for batch in loader:
            skipped.extend(batch.skipped)
            bar.update(len(batch.images) + len(batch.skipped))
            if not len(batch.images):
                continue
            x = batch.images.to(ctx.device)
            real = to_uint8_round(x)
            fake = to_uint8_round(tokenizer.decode(tokenizer.encode(x)))
            per_image["psnr"].append(psnr(fake, real).cpu())
            per_image["ssim"].append(ssim(fake, real).cpu())
            if lpips_net is not None:
                per_image["lpips"].append(lpips(to_network_input(fake, ctx.device), x, network=lpips_net).cpu())
            per_image["real"].append(network_features(network, to_network_input(real, ctx.device))["pool"].cpu())
            per_image["fake"].append(network_features(network, to_network_input(fake, ctx.device))["pool"].cpu())
            images[count:count + len(fake)] = fake.permute(0, 2, 3, 1).cpu().numpy()
            count += len(fake)
            if len(grid) < args.grid_images:
                grid.extend(zip(real.cpu(), fake.cpu()))
    images.flush()
    del images
    shard = {k: torch.cat(v).numpy() for k, v in per_image.items() if v}
    np.savez(shards / f"scores-{ctx.rank:05d}.npz", count=count, skipped=np.array(skipped, dtype=str), **shard)
    done = sum(gather_objects(count, ctx))  # also waits until every shard is written
    if done < 2:
        raise ValueError(f"only {done} image(s) could be reconstructed; rFID needs at least 2")
    if ctx.is_main:
        results = _merge(out, ctx.world_size)
        identity = network_identity(network)
        results.update({
            "unavailable": {"lpips": lpips_reason} if lpips_reason else {},
            "image_size": size,
            "tokenizer": {"source": str(args.tokenizer), "identity": tokenizer.identity()},
            "feature_network": {"identity": identity, "published_inception": identity == PUBLISHED_IDENTITY},
            "psnr_ssim_on": "uint8 images, data range 255",
            "data": str(args.data),
            "files": {"reconstructions": RECONSTRUCTIONS_NAME, "grid": GRID_NAME},
        })
        if grid:  # empty only when this process's slice held no readable image
            pairs = grid[: args.grid_images]  # originals beside their reconstructions, up to 4 pairs per row
            save_image_grid(out / GRID_NAME, torch.stack([t for pair in pairs for t in pair]),
                            nrow=2 * min(4, len(pairs)), pad_value=255)
        write_json(out / METRICS_NAME, results)
        shown = {k: results[k] for k in ("rfid", "psnr", "ssim", "lpips")}
        print("  ".join(f"{k}: {v:.4f}" if v is not None else f"{k}: n/a" for k, v in shown.items()))
        if lpips_reason:
            print(f"lpips: {lpips_reason}")
        print(f"{results['num_images']} images; results in {out / METRICS_NAME}")
    barrier()
    return 0


def _merge(out: Path, world_size: int) -> dict:
    """Combine the processes' shards (in rank order, i.e. dataset order) and remove them."""
    import shutil

    import numpy as np

    from ctok.metrics.frechet import fid
    from ctok.metrics.sample_npz import write_npz_images

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
        "ssim": float(joined("ssim").mean()),
        "lpips": float(lpips_values.mean()) if lpips_values is not None else None,
        "num_images": total,
        "skipped_files": [str(s) for p in parts for s in p["skipped"]],
    }
    shutil.rmtree(shards)
    return results

