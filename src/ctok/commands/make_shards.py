"""``ctok make-shards``: write an image folder as webdataset tar shards (see ctok.data.shards)."""
from __future__ import annotations

HELP = "write an image folder (ImageNet class sub-folders, or flat) as webdataset tar shards for training at scale"


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="image folder (ImageNet class sub-folders, or flat)")
    parser.add_argument("--out", required=True, help="folder for train-000000.tar, ... and shards.json; rerun "
                        "into an unfinished one with the same --data and --shard-size to write only what is missing")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="images per shard (ImageNet's ~110 KB JPEGs: 1000 make ~110 MB shards)")
    # ctok.data.shards.DEFAULT_WORKERS, written out: building the parser must not import torch.
    parser.add_argument("--workers", type=int, default=8,
                        help="shards written at once, in threads (default 8, also on fewer cores: the writers mostly "
                        "wait on the disk); the shards are the same for any number")


def run(args) -> int:
    import json

    from ctok.data.shards import make_shards

    # The library checks these too, by parameter name; here they are named as the user typed them.
    for flag, value in (("--shard-size", args.shard_size), ("--workers", args.workers)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    index = make_shards(args.data, args.out, args.shard_size, workers=args.workers)
    info = json.loads(index.read_text())
    last = len(info["shardlist"]) - 1
    classes = f"{info['num_classes']} classes" if info["num_classes"] else "unlabelled"
    print(f"wrote {info['num_samples']} images ({classes}) in {last + 1} shards to {index.parent}; train on them "
          f"with data.shards='{index.parent}/train-{{000000..{last:06d}}}.tar' (or data.shards={index.parent})")
    return 0
