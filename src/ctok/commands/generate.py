"""``ctok generate``: sample images from a SiT or DiT and decode them with a tokenizer.

Writes to ``--out``: ``images/NNNNNN.png`` (one per image), ``grid.png`` (the first 64),
``samples.npz`` (``arr_0``: uint8 (N, H, W, 3), the file ADM's evaluator reads) and
``generate.json`` (the settings, checked when a run resumes).

Image i depends only on (seed, i): its starting noise and every later random draw of the sampler
come from its own generator, seeded from (seed, i), and the images are cut into fixed global
batches of ``--batch-size`` that go whole to one process (a CPU matmul's rounding can depend on
the batch size). So the same command gives the same images on 1 or 8 processes. Under torchrun
the unfinished batches are dealt out round-robin; a run that was killed skips the batches whose
images all exist (each PNG is written atomically, so an existing one is complete).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "sample images from a SiT/DiT + tokenizer: PNGs, a grid and samples.npz for the ADM evaluator; torchrun-aware"

SETTINGS_NAME = "generate.json"
SAMPLES_NAME = "samples.npz"
GRID_NAME = "grid.png"
IMAGES_DIR = "images"
GRID_IMAGES = 64
SIT_SOLVERS = ("euler", "heun", "euler-maruyama")
DIT_SAMPLERS = ("ddpm", "ddim")


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
    parser.add_argument("--solver", choices=SIT_SOLVERS + DIT_SAMPLERS,
                        help="SiT: euler, heun or euler-maruyama (default); DiT: ddpm (default) or ddim")
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

    from ctok.hub import load_dit, load_sit, load_tokenizer, model_kind, read_config, resolve
    from ctok.training.distributed import barrier

    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    folder = resolve(args.model)
    kind = model_kind(read_config(folder))
    if kind == "tokenizer":
        raise ValueError(f"--model {args.model} is a tokenizer; pass a SiT or DiT checkpoint")
    sample = sampler_for(args, kind, read_config(folder))
    tokenizer = load_tokenizer(args.tokenizer, ctx.device)
    model = (load_sit if kind == "sit" else load_dit)(folder, ctx.device)
    if (model.num_tokens, model.in_channels) != (tokenizer.num_tokens, tokenizer.latent_dim):
        raise ValueError(
            f"the {kind.upper()} generates {model.num_tokens} tokens x {model.in_channels} channels but the tokenizer "
            f"decodes {tokenizer.num_tokens} tokens x {tokenizer.latent_dim}; pair the generator with the tokenizer "
            "it was trained on"
        )
    denormalize = latent_denormalizer(read_config(folder), tokenizer, args)
    labels = image_labels(args, model)
    # Through JSON once, so that it compares equal to the copy a resumed run reads back.
    settings = json.loads(json.dumps({
        "tokenizer": str(args.tokenizer), "tokenizer_identity": tokenizer.identity(),
        "model": str(args.model), "model_kind": kind, "model_sha256": file_sha256(folder),
        "num_images": args.num_images, "batch_size": args.batch_size, "seed": args.seed,
        "labels": args.labels, **sample.keywords,
    }))

    out, images_dir = args.out, args.out / IMAGES_DIR
    check_settings(out, settings)
    if ctx.is_main:
        for stale in images_dir.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink()
    batches = [range(start, min(start + args.batch_size, args.num_images))
               for start in range(0, args.num_images, args.batch_size)]
    todo = [b for b in batches if not all(image_path(images_dir, i).is_file() for i in b)]
    # Every process must have seen the same finished images before any writes a new one.
    barrier()
    if ctx.is_main:
        write_json(out / SETTINGS_NAME, settings)
    mine = todo[ctx.rank::ctx.world_size]

    use_bf16 = ctx.device.type == "cuda"
    bar = tqdm(total=sum(len(b) for b in mine), unit="img", desc="generating", disable=not ctx.is_main)
    for batch in mine:
        generators = [torch.Generator(ctx.device).manual_seed(image_seed(args.seed, i)) for i in batch]
        noise = torch.stack([torch.randn(model.num_tokens, model.in_channels, generator=g, device=ctx.device)
                             for g in generators])
        y = torch.tensor([labels(i) for i in batch], device=ctx.device)
        with torch.no_grad(), torch.autocast(ctx.device.type, torch.bfloat16, enabled=use_bf16):
            latents = sample(model, noise, y, generator=generators)
            pixels = tokenizer.decode(denormalize(latents))
        for i, image in zip(batch, to_uint8(pixels).permute(0, 2, 3, 1).cpu().numpy()):
            save_png(image_path(images_dir, i), image)
        bar.update(len(batch))
    bar.close()
    barrier()
    if ctx.is_main and (todo or not (out / SAMPLES_NAME).is_file()):
        write_outputs(out, args.num_images)


def latent_denormalizer(config: dict, tokenizer, args: argparse.Namespace):
    """How generated latents map back to the tokenizer's scale.

    A generator trained by ctok records the normalisation it was trained with and the identity of
    the tokenizer whose latents it learned; decoding with another tokenizer, or without that
    normalisation, gives garbage (FID ~130), so both are enforced. Released generators record
    neither: the tokenizer config's vq_mean / vq_std apply, as in the original.
    """
    trained_on = config.get("tokenizer", {}).get("identity")
    if trained_on is not None and trained_on != tokenizer.identity():
        raise ValueError(
            f"--model {args.model} was trained on latents of tokenizer {trained_on} "
            f"({config['tokenizer'].get('source')}), but --tokenizer {args.tokenizer} is {tokenizer.identity()}"
        )
    stats = config.get("latent_stats")
    if stats is None:
        return tokenizer.denormalize
    mean, std = float(stats["mean"]), float(stats["std"])
    return lambda z: z * std + mean


def sampler_for(args: argparse.Namespace, kind: str, config: dict):
    """``sample(model, noise, labels, generator=...)`` with this command's settings bound.

    A DiT's noise schedule defaults to the one its config records (ctok's trainer writes it), else
    cosine, which every released DiT used.
    """
    from functools import partial

    from ctok.sampling import sample_dit, sample_sit

    if kind == "sit":
        if args.noise_schedule is not None:
            raise ValueError("--noise-schedule applies to DiT only; SiT integrates a flow")
        solver = args.solver or "euler-maruyama"
        if solver not in SIT_SOLVERS:
            raise ValueError(f"--solver {solver} is a DiT sampler; a SiT takes one of {SIT_SOLVERS}")
        interval = tuple(args.guidance_interval or (0.0, 1.0))
        return partial(sample_sit, num_steps=args.steps, solver=solver, cfg_scale=args.cfg_scale,
                       guidance_interval=interval)
    if args.guidance_interval is not None:
        raise ValueError("--guidance-interval applies to SiT only; a DiT is guided at every step")
    solver = args.solver or "ddpm"
    if solver not in DIT_SAMPLERS:
        raise ValueError(f"--solver {solver} is a SiT solver; a DiT takes one of {DIT_SAMPLERS}")
    return partial(sample_dit, num_steps=args.steps, sampler=solver, noise_schedule=args.noise_schedule or config.get("noise_schedule", "cosine"),
                   cfg_scale=args.cfg_scale)


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


def image_seed(seed: int, index: int) -> int:
    from ctok.training.sharding import derived_seed

    return derived_seed(seed, index)


def image_path(images_dir: Path, index: int) -> Path:
    return images_dir / f"{index:06d}.png"


def file_sha256(folder: Path) -> str:
    """SHA-256 of the checkpoint's weight files, so that a resumed run cannot mix two checkpoints."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_NAME
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    changed = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
    if changed:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(f"{out} holds images made with other settings ({details}); "
                         "pass a new --out, or delete that folder to start over")


def to_uint8(images):
    """[-1, 1] -> uint8 as the original samplers quantised for their FID-50k: clamp, then truncate
    255 * (x + 1) / 2. Rounding to nearest would be half a level brighter on average and shift FID."""
    import torch

    return (255.0 * ((images.float().clamp(-1, 1) + 1) / 2)).to(torch.uint8)


def save_png(path: Path, image) -> None:
    from PIL import Image

    from ctok.atomic_files import atomic_write

    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format="PNG")


def write_json(path: Path, data: dict) -> None:
    from ctok.atomic_files import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def load_png(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def write_outputs(out: Path, num_images: int) -> None:
    """samples.npz from the PNGs in index order (streamed, never all in memory) and the grid."""
    import torch
    from torchvision.utils import make_grid

    from ctok.metrics.sample_npz import write_npz_images
    from ctok.atomic_files import atomic_write

    paths = [image_path(out / IMAGES_DIR, i) for i in range(num_images)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images are missing in {out / IMAGES_DIR} (e.g. {missing[:3]}); "
                                "rerun the same command to make them")
    write_npz_images(out / SAMPLES_NAME, (load_png(p)[None] for p in paths), num_images)
    first = torch.stack([torch.from_numpy(load_png(p)).permute(2, 0, 1) for p in paths[:GRID_IMAGES]])
    grid = make_grid(first, nrow=8, padding=2).permute(1, 2, 0).numpy()
    from PIL import Image

    with atomic_write(out / GRID_NAME) as f:
        Image.fromarray(grid).save(f, format="PNG")
    print(f"wrote {num_images} images to {out / IMAGES_DIR}, {out / SAMPLES_NAME} and {out / GRID_NAME}")
