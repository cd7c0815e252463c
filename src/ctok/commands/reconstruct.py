"""``ctok reconstruct``: encode and decode a folder of images; rFID, PSNR, SSIM and LPIPS of the reconstructions.

The work, its outputs and its torchrun sharding are :func:`ctok.reconstruction.reconstruct_folder`'s;
this module turns the flags into its arguments and prints the figures.
"""
from __future__ import annotations

import argparse

from ctok.training.dist_timeout import add_dist_timeout_argument

HELP = ("encode+decode a folder with a tokenizer: rFID, PSNR, SSIM, LPIPS, a comparison grid, "
        "the reconstructions (.npz); torchrun-aware")


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
    parser.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex",
                        help="LPIPS trunk: alex (the field's tables; default) or vgg (ctok's training loss)")
    parser.add_argument("--lpips-weights", help="the trunk's torchvision weight file, alexnet-owt-7be5be79.pth or "
                                                "vgg16-397923af.pth (default: $CTOK_ALEXNET_WEIGHTS / "
                                                "$CTOK_VGG16_WEIGHTS, then torch's hub cache)")
    parser.add_argument("--ssim", choices=("standard", "llamagen"), default="standard",
                        help="SSIM convention: standard, or llamagen (data_range 2 on [0, 1] images, as those tables)")
    parser.add_argument("--quantisation", choices=("round-half-up", "truncate"), default="round-half-up",
                        help="uint8 conversion of crops and reconstructions (see ctok.uint8)")
    parser.add_argument("--grid-images", type=int, default=8, help="image pairs in the comparison grid")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_dist_timeout_argument(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ctok.loading import load_tokenizer
    from ctok.metrics.features import load_feature_network
    from ctok.reconstruction import METRICS_NAME, reconstruct_folder
    from ctok.training.distributed import init_distributed, shutdown_distributed

    # The library checks these too, by parameter name; here they are named as the user typed them.
    for name in ("batch_size", "grid_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 2:
        raise ValueError(f"--limit must be at least 2 (rFID needs a covariance), got {args.limit}")
    ctx = init_distributed(args.device, args.dist_timeout_min)
    try:
        tokenizer = load_tokenizer(args.tokenizer, device=ctx.device)
        if args.image_size is not None and args.image_size != tokenizer.image_size:
            raise ValueError(f"--image-size {args.image_size} differs from the tokenizer's image size "
                             f"{tokenizer.image_size}; it encodes only images of its own size")
        network = load_feature_network(args.feature_network, args.inception_weights, ctx.device)
        results = reconstruct_folder(tokenizer, args.data, args.out, feature_network=network,
                                     lpips_net=args.lpips_net, lpips_weights=args.lpips_weights,
                                     ssim_convention=args.ssim, quantisation=args.quantisation,
                                     limit=args.limit, batch_size=args.batch_size,
                                     num_workers=args.num_workers, grid_images=args.grid_images,
                                     tokenizer_source=str(args.tokenizer), ctx=ctx)
    finally:
        shutdown_distributed()
    if results is not None:  # the first process: it wrote the files
        shown = {k: results[k] for k in ("rfid", "psnr", "ssim", "lpips")}
        print("  ".join(f"{k}: {v:.4f}" if v is not None else f"{k}: n/a" for k, v in shown.items()))
        if results["unavailable"].get("lpips"):
            print(f"lpips: {results['unavailable']['lpips']}")
        print(f"{results['num_images']} images; results in {Path(args.out) / METRICS_NAME}")
    return 0
