"""A generated image set on disk: what ``ctok generate`` writes, as one function on a :class:`LatentPipeline`.

:func:`generate_to_folder` writes to ``out``: ``images/NNNNNN.png`` (one per image), ``grid.png``
(the first 64), ``samples.npz`` (``arr_0``: uint8 (N, H, W, 3), the file ADM's evaluator reads) and
``generate.json`` (the settings, checked when a run resumes). It lives here rather than in
:mod:`ctok.pipeline` because it is about files and processes (resuming, torchrun sharding, the
settings stamp), while the pipeline is the in-memory latent contract that this module only calls.

Each batch is drawn by :meth:`ctok.pipeline.LatentPipeline.generate`, so Python and the command line
give the same pixels. Image i depends only on (seed, i): its starting noise and every later random
draw of the sampler come from its own generator, seeded with :func:`ctok.sampling.noise.image_seed`
(seed, i), and the images are cut into fixed global batches of ``batch_size`` that go whole to one
process (a CPU matmul's rounding can depend on the batch size). So the same call gives the same
images on 1 or 8 processes. Under torchrun the unfinished batches are dealt out round-robin; a run
that was killed skips the batches whose images all exist (each PNG is written atomically, so an
existing one is complete). Pixels are quantised by :func:`ctok.uint8.to_uint8`.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ctok.atomic_files import save_image_grid, save_png, weights_sha256
from ctok.locking import folder_lock
from ctok.metrics.sample_npz import write_npz_images
from ctok.numerics import tf32_on_cuda
from ctok.pipeline import LatentPipeline
from ctok.protocol import CLASS_BALANCED, ProtocolCard
from ctok.sampling.noise import image_generators
from ctok.settings_check import check_same_settings
from ctok.training.distributed import DistContext, barrier
from ctok.uint8 import DEFAULT_QUANTISATION, check_quantisation

SETTINGS_NAME = "generate.json"
SAMPLES_NAME = "samples.npz"
GRID_NAME = "grid.png"
IMAGES_DIR = "images"
GRID_IMAGES = 64


def generate_to_folder(pipe: LatentPipeline, out: str | os.PathLike, *, num_images: int = 50_000,
                       batch_size: int = 64, labels: Sequence[int] | None = None, seed: int = 0,
                       num_steps: int = 250, solver: str | None = None, cfg_scale: float = 1.0,
                       guidance_interval: tuple[float, float] | None = None, noise_schedule: str | None = None,
                       quantisation: str = DEFAULT_QUANTISATION, ctx: DistContext | None = None) -> Path | None:
    """Draw ``num_images`` images with ``pipe`` into ``out`` (see the module docstring for the files).

    ``labels``: class ids repeated over the images (default: class-balanced, image i gets class
    i mod num_classes). The sampler settings are :meth:`LatentPipeline.sampler_arguments`';
    ``quantisation`` is :func:`ctok.uint8.to_uint8`'s. generate.json carries the protocol card of the
    run that made the folder (not compared when a rerun resumes). ``ctx``:
    this process's place under torchrun (its device must be the pipeline's); None is a single process.
    A rerun in ``out`` resumes, and is refused (ValueError naming the changed settings) when its
    settings differ. On CUDA, TF32 matmuls are allowed while it runs, as in the released samplers.

    Returns the path of samples.npz on the first process, None on the others.
    """
    for name, value in (("num_images", num_images), ("batch_size", batch_size), ("num_steps", num_steps)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if cfg_scale < 1:
        raise ValueError(f"cfg_scale must be >= 1 (1 turns guidance off), got {cfg_scale}")
    if ctx is None:
        ctx = DistContext(rank=0, world_size=1, local_rank=0, device=pipe.device)
    if ctx.device != pipe.device:
        raise ValueError(f"the pipeline is on {pipe.device} but this process's device is {ctx.device}")
    sampling = dict(num_steps=num_steps, solver=solver, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                    noise_schedule=noise_schedule)
    label_of = image_labels(labels, pipe.generator)
    out = Path(out)
    check_quantisation(quantisation)
    with folder_lock(out, hold=ctx.is_main):
        _stamp(pipe, out, num_images=num_images, batch_size=batch_size, seed=seed, labels=labels,
               quantisation=quantisation, sampling=sampling, ctx=ctx)
        todo = _unfinished_batches(out / IMAGES_DIR, num_images, batch_size, ctx)
        with tf32_on_cuda(ctx.device):
            mine = todo[ctx.rank::ctx.world_size]
            bar = tqdm(total=sum(len(b) for b in mine), unit="img", desc="generating", disable=not ctx.is_main)
            for batch in mine:
                images = pipe.generate([label_of(i) for i in batch],
                                       generators=image_generators(seed, batch, ctx.device),
                                       quantisation=quantisation, **sampling)
                for i, image in zip(batch, images):
                    save_png(image_path(out / IMAGES_DIR, i), image)
                bar.update(len(batch))
            bar.close()
        return _finish(out, num_images, todo, ctx)


def _stamp(pipe: LatentPipeline, out: Path, *, num_images: int, batch_size: int, seed: int,
           labels: Sequence[int] | None, quantisation: str, sampling: dict, ctx: DistContext) -> None:
    """Write generate.json (the first process) or check a rerun's settings against it (every process)."""
    settings = _run_settings(pipe, num_images=num_images, batch_size=batch_size, seed=seed, labels=labels,
                             sampler=pipe.sampler_arguments(**sampling))
    settings["quantisation"] = quantisation
    settings["protocol"] = ProtocolCard.here(
        ctx.device, num_samples=num_images, seed=seed, sampler=pipe.sampler_card(**sampling),
        label_scheme=CLASS_BALANCED if labels is None else f"fixed list {settings['labels']}, repeated",
        quantisation=quantisation, dtype=str(next(pipe.generator.parameters()).dtype).removeprefix("torch."),
    ).to_dict()
    settings = json.loads(json.dumps(settings))  # what a resumed run reads back compares equal
    check_same_settings(out / SETTINGS_NAME, settings, f"{out} holds images made", write=ctx.is_main,
                        ignore=("protocol",))


def _finish(out: Path, num_images: int, todo: list[range], ctx: DistContext) -> Path | None:
    """After every process is done: samples.npz and the grid, written by the first process when
    anything was drawn (or they are missing). Returns samples.npz's path there, None elsewhere."""
    barrier()
    if not ctx.is_main:
        return None
    if todo or not (out / SAMPLES_NAME).is_file():
        write_outputs(out, num_images)
    return out / SAMPLES_NAME


def _run_settings(pipe: LatentPipeline, *, num_images: int, batch_size: int, seed: int,
                 labels: Sequence[int] | None, sampler: dict) -> dict:
    """The settings ``generate.json`` records: the models, the run's size and seed, and the sampler's arguments.

    The models are named by where :func:`ctok.pipeline.load_pipeline` found them and the SHA-256 of
    the generator's weight files; a pipeline built from models in memory names none and fingerprints
    the generator's weights instead. ``labels`` is recorded as the comma-separated list ``--labels`` takes.
    """
    sources = pipe.sources
    model_sha256 = weights_sha256(sources.generator_folder) if sources else _state_sha256(pipe.generator)
    # Through JSON once, so that it compares equal to the copy a resumed run reads back.
    return json.loads(json.dumps({
        "tokenizer": sources.tokenizer if sources else None, "tokenizer_identity": pipe.tokenizer.identity(),
        "model": sources.generator if sources else None, "model_kind": pipe.kind, "model_sha256": model_sha256,
        "num_images": num_images, "batch_size": batch_size, "seed": seed,
        "labels": None if labels is None else ",".join(str(int(i)) for i in labels), **sampler,
    }))


def image_labels(labels: Sequence[int] | None, model) -> Callable[[int], int]:
    """The class of image i: i mod ``model.num_classes`` by default, else ``labels`` repeated.

    Raises ValueError for an empty list or a class id the model does not have (its null class,
    where it has one, is allowed: it samples unconditionally).
    """
    if labels is None:
        return lambda i: i % model.num_classes
    ids = [int(v) for v in labels]
    if not ids:
        raise ValueError("labels must hold at least one class id (None: class-balanced)")
    top = model.num_classes if model.has_null_class else model.num_classes - 1
    bad = [v for v in ids if not 0 <= v <= top]
    if bad:
        raise ValueError(f"labels must lie in [0, {top}] for this model ({model.num_classes} classes"
                         f"{', the last id is the null class' if model.has_null_class else ''}), got {bad}")
    return lambda i: ids[i % len(ids)]


def image_path(images_dir: Path, index: int) -> Path:
    """Where image ``index`` of a run is written: ``images/NNNNNN.png``."""
    return images_dir / f"{index:06d}.png"


def write_outputs(out: Path, num_images: int) -> None:
    """samples.npz from the PNGs in index order (streamed, never all in memory) and the grid."""
    paths = [image_path(out / IMAGES_DIR, i) for i in range(num_images)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images are missing in {out / IMAGES_DIR} (e.g. {missing[:3]}); "
                                "rerun the same command to make them")
    write_npz_images(out / SAMPLES_NAME, (_load_png(p)[None] for p in paths), num_images)
    first = torch.stack([torch.from_numpy(_load_png(p)).permute(2, 0, 1) for p in paths[:GRID_IMAGES]])
    save_image_grid(out / GRID_NAME, first, nrow=8)


def _unfinished_batches(images_dir: Path, num_images: int, batch_size: int, ctx: DistContext) -> list[range]:
    """The global batches of ``batch_size`` images that lack at least one PNG (the same list on every process)."""
    if ctx.is_main:
        for stale in images_dir.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink()
    batches = [range(start, min(start + batch_size, num_images)) for start in range(0, num_images, batch_size)]
    todo = [b for b in batches if not all(image_path(images_dir, i).is_file() for i in b)]
    # Every process must have seen the same finished images before any writes a new one.
    barrier()
    return todo


def _state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over a model's tensors (name, then bytes, in name order): its weights, wherever they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))
