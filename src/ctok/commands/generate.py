"""``ctok generate``: sample images from a SiT or DiT and decode them with a tokenizer.

Writes to ``--out``: ``images/NNNNNN.png`` (one per image), ``grid.png`` (the first 64),
``samples.npz`` (``arr_0``: uint8 (N, H, W, 3), the file ADM's evaluator reads) and
``generate.json`` (the settings, checked when a run resumes).

Each batch is drawn by :meth:`ctok.pipeline.LatentPipeline.generate`, which owns the latent
normalisation, the tokenizer check and the sampler settings, so that Python reproduces these
images exactly. Image i depends only on (seed, i): its starting noise and every later random draw
of the sampler come from its own generator, seeded from (seed, i)
(:func:`ctok.sampling.noise.image_generators`), and the images are cut into fixed global batches
of ``--batch-size`` that go whole to one process (a CPU matmul's rounding can depend on the batch
size). So the same command gives the same images on 1 or 8 processes. Under torchrun the
unfinished batches are dealt out round-robin; a run that was killed skips the batches whose images
all exist (each PNG is written atomically, so an existing one is complete).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# At module level (stdlib-only, cheap to import) so that tests can intercept the writes.
from ctok.atomic_files import save_image_grid, save_png, weights_sha256

HELP = "sample images from a SiT/DiT + tokenizer: PNGs, a grid and samples.npz for the ADM evaluator; torchrun-aware"

SETTINGS_NAME = "generate.json"
SAMPLES_NAME = "samples.npz"
GRID_NAME = "grid.png"
IMAGES_DIR = "images"
GRID_IMAGES = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id (decodes the latents)")
    parser.add_argument("--model", required=True, help="SiT or DiT folder or hub id; the kind is read from its config")
    parser.add_argument("--out", required=True, type=Path, help="output folder (a rerun resumes in it)")
    parser.add_argument("--num-images", type=int, default=50_000, help="images to draw (default 50000, for FID-50k)")
    parser.add_argument("--labels", help="comma-separated class ids, repeated over the images (default: class-"
                                         "balanced, image i gets class i mod num_classes)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="SiT only: guide only while LOW <= t <= HIGH (t = 1 is noise; default 0 1)")
    parser.add_argument("--steps", type=int, default=250, help="sampling steps (default 250)")
    parser.add_argument("--solver", help="SiT: euler, heun or euler-maruyama (default); DiT: ddpm (default) or ddim")
    parser.add_argument("--noise-schedule", choices=("cosine", "linear"),
                        help="DiT only: the schedule it was trained with (default cosine, as the released DiT)")
    parser.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def run(args: argparse.Namespace) -> int:
    from ctok.training.distributed import init_distributed, shutdown_distributed

    for name in ("num_images", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.cfg_scale < 1:
        raise ValueError(f"--cfg-scale must be >= 1 (1 turns guidance off), got {args.cfg_scale}")
    ctx = init_distributed(args.device)
    try:
        generate(args, ctx)
    finally:
        shutdown_distributed()
    return 0


def generate(args: argparse.Namespace, ctx) -> None:
    import torch
    from tqdm.auto import tqdm

    from ctok.hub import resolve
    from ctok.pipeline import load_pipeline
    from ctok.sampling.noise import image_generators
    from ctok.settings_check import check_same_settings
    from ctok.training.distributed import barrier

    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    folder = resolve(args.model)
    pipe = load_pipeline(args.tokenizer, folder, device=ctx.device)
    sampling = dict(num_steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale,
                    guidance_interval=args.guidance_interval, noise_schedule=args.noise_schedule)
    labels = image_labels(args, pipe.generator)
    # Through JSON once, so that it compares equal to the copy a resumed run reads back.
    settings = json.loads(json.dumps({
        "tokenizer": str(args.tokenizer), "tokenizer_identity": pipe.tokenizer.identity(),
        "model": str(args.model), "model_kind": pipe.kind, "model_sha256": weights_sha256(folder),
        "num_images": args.num_images, "batch_size": args.batch_size, "seed": args.seed,
        "labels": args.labels, **pipe.sampler_arguments(**sampling),
    }))

    out, images_dir = args.out, args.out / IMAGES_DIR
    # Every process checks; only the first writes the stamp, which a rerun compares against.
    check_same_settings(out / SETTINGS_NAME, settings, f"{out} holds images made", write=ctx.is_main)
    if ctx.is_main:
        for stale in images_dir.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink()
    batches = [range(start, min(start + args.batch_size, args.num_images))
               for start in range(0, args.num_images, args.batch_size)]
    todo = [b for b in batches if not all(image_path(images_dir, i).is_file() for i in b)]
    # Every process must have seen the same finished images before any writes a new one.
    barrier()
    mine = todo[ctx.rank::ctx.world_size]

    bar = tqdm(total=sum(len(b) for b in mine), unit="img", desc="generating", disable=not ctx.is_main)
    for batch in mine:
        images = pipe.generate([labels(i) for i in batch], generators=image_generators(args.seed, batch, ctx.device),
                               **sampling)
        for i, image in zip(batch, images):
            save_png(image_path(images_dir, i), image)
        bar.update(len(batch))
    bar.close()
    barrier()
    if ctx.is_main and (todo or not (out / SAMPLES_NAME).is_file()):
        write_outputs(out, args.num_images)


def image_labels(args: argparse.Namespace, model):
    """The class of image i: i mod num_classes by default, else the --labels list repeated."""
    if args.labels is None:
        return lambda i: i % model.num_classes
    try:
        ids = [int(v) for v in args.labels.split(",")]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
    top = model.num_classes if model.has_null_class else model.num_classes - 1
    bad = [v for v in ids if not 0 <= v <= top]
    if bad:
        raise ValueError(f"--labels must lie in [0, {top}] for this model ({model.num_classes} classes"
                         f"{', the last id is the null class' if model.has_null_class else ''}), got {bad}")
    return lambda i: ids[i % len(ids)]


def image_path(images_dir: Path, index: int) -> Path:
    return images_dir / f"{index:06d}.png"


def load_png(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def write_outputs(out: Path, num_images: int) -> None:
    """samples.npz from the PNGs in index order (streamed, never all in memory) and the grid."""
    import torch

    from ctok.metrics.sample_npz import write_npz_images

    paths = [image_path(out / IMAGES_DIR, i) for i in range(num_images)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images are missing in {out / IMAGES_DIR} (e.g. {missing[:3]}); "
                                "rerun the same command to make them")
    write_npz_images(out / SAMPLES_NAME, (load_png(p)[None] for p in paths), num_images)
    first = torch.stack([torch.from_numpy(load_png(p)).permute(2, 0, 1) for p in paths[:GRID_IMAGES]])
    save_image_grid(out / GRID_NAME, first, nrow=8)
    print(f"wrote {num_images} images to {out / IMAGES_DIR}, {out / SAMPLES_NAME} and {out / GRID_NAME}")
