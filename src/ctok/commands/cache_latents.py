"""``ctok cache-latents``: encode a dataset once into a latent cache (see ctok.latent_cache)."""
from __future__ import annotations

from ctok.training.dist_timeout import add_dist_timeout_argument

HELP = "encode a dataset with a tokenizer into sharded latent files for generator training (torchrun-aware)"


def add_arguments(parser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="image folder (ImageNet class sub-folders, or flat) "
                                       "or a folder with Fashion-MNIST's files")
    source.add_argument("--shards", help="or webdataset shards from `ctok make-shards`: "
                                         "'DIR/train-{000000..000127}.tar' or DIR")
    parser.add_argument("--out", required=True, help="cache folder to write (an interrupted build there is resumed)")
    parser.add_argument("--flip", action="store_true", help="also store each image's mirror as a second view")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per batch, per process (with --flip a forward pass holds them and their mirrors)")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard file")
    parser.add_argument("--num-workers", type=int, default=4, help="data-loading processes per process")
    parser.add_argument("--limit", type=int, help="encode only the first LIMIT images (small runs, tests)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_dist_timeout_argument(parser)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16: bfloat16 autocast on CUDA (the generator recipes' run.precision); "
                             "the CPU always encodes in fp32")


def run(args) -> int:
    import json

    from ctok.data import open_images_or_shards
    from ctok.latent_cache import build_latent_cache
    from ctok.loading import load_tokenizer
    from ctok.training.distributed import init_distributed, shutdown_distributed

    # The library checks these too, by parameter name; here they are named as the user typed them.
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    ctx = init_distributed(args.device, args.dist_timeout_min)
    try:
        tokenizer = load_tokenizer(args.tokenizer, device=ctx.device)
        images = open_images_or_shards(args.data, args.shards, tokenizer.image_size)
        index = build_latent_cache(tokenizer, images, args.out,
                                   tokenizer_source=args.tokenizer, ctx=ctx, flip=args.flip,
                                   batch_size=args.batch_size, shard_size=args.shard_size,
                                   num_workers=args.num_workers, dataset_source=str(args.data or args.shards),
                                   limit=args.limit, precision=args.precision)
    finally:
        shutdown_distributed()
    if index is not None:
        info = json.loads(index.read_text())
        precision = info.get("precision", "fp32")  # caches that predate the record were encoded in fp32
        print(f"cached {info['num_samples']} images x {info['num_views']} views of {info['num_tokens']} x "
              f"{info['latent_dim']} latents (encoded in {precision}) in {index.parent}; "
              f"mean {info['stats']['mean']:.6g}, std {info['stats']['std']:.6g}")
    return 0
