"""``ctok generate``: sample images from a SiT or DiT and decode them with a tokenizer.

The files it writes, how it resumes and how torchrun shares the work are those of
:func:`ctok.generation.generate_to_folder`; this module turns the flags into its arguments.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ctok.training.dist_timeout import add_dist_timeout_argument

HELP = "sample images from a SiT/DiT + tokenizer: PNGs, a grid and samples.npz for the ADM evaluator; torchrun-aware"


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
    parser.add_argument("--quantisation", choices=("round-half-up", "truncate"), default="round-half-up",
                        help="uint8 conversion: round-half-up, clamp(127.5 x + 128) as DiT/SiT/LlamaGen (default), "
                             "or truncate as ADM's sampler")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_dist_timeout_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ctok.generation import GRID_NAME, IMAGES_DIR, generate_to_folder
    from ctok.pipeline import load_pipeline
    from ctok.training.distributed import init_distributed, shutdown_distributed

    # The library checks these too, by parameter name; here they are named as the user typed them.
    for name in ("num_images", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.cfg_scale < 1:
        raise ValueError(f"--cfg-scale must be >= 1 (1 turns guidance off), got {args.cfg_scale}")
    labels = parse_labels(args.labels)
    ctx = init_distributed(args.device, args.dist_timeout_min)
    try:
        pipe = load_pipeline(args.tokenizer, args.model, device=ctx.device)
        samples = generate_to_folder(pipe, args.out, num_images=args.num_images, batch_size=args.batch_size,
                                     labels=labels, seed=args.seed, num_steps=args.steps, solver=args.solver,
                                     cfg_scale=args.cfg_scale, guidance_interval=args.guidance_interval,
                                     noise_schedule=args.noise_schedule, quantisation=args.quantisation, ctx=ctx)
    finally:
        shutdown_distributed()
    if samples is not None:  # the first process: it wrote the files
        print(f"{args.num_images} images in {args.out / IMAGES_DIR}, {samples} and {args.out / GRID_NAME}")
    return 0


def parse_labels(text: str | None) -> list[int] | None:
    """``--labels 5,9`` as [5, 9]; None (class-balanced) when the flag is not given."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers, got {text!r}") from None
