"""Latent caching: how fast a cache is built, and what it buys in SiT training steps per second.

:func:`cache_throughput` builds caches of the same PNG files with flips (``ctok cache-latents
--flip``: the real data path, loading included) and times them in rounds beside the tokenizer's
plain forward over as many images held in device memory: their ratio is the share of the encoder's
own speed that the cache keeps (the rest goes to reading, copying and writing). On CUDA a build in
fp32 runs in the same rounds, for the speed-up of the default bf16.

:func:`latent_caching` trains twice through ``train_generator`` (the code behind ``ctok train-sit``)
on the same images, side by side in one process: once reading a cache built from those images with
``--flip`` (the cost of building it is reported too), once loading the PNG files and encoding each
batch through the tokenizer with random mirroring. Steps per second come from the run's own log:
the second of two log intervals, so start-up and the first steps are not counted. The runs set
``run.save_weights: false``: a SiT-XL checkpoint with its EMA and AdamW moments is about 11 GB, and
a throughput measurement needs none.

GPU: a random-initialised MAETok-B-128 at 256 px and SiT-XL/1, batch 64. CPU: a tiny tokenizer
(2-layer, 64-wide ViTs, 32 px) and the tiny-sit network, batch 32.
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.measure import Gemm, paired_ratio, summary, throughput, timed_side_by_side
from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from ctok.data import open_images
from ctok.latent_cache import build_latent_cache
from ctok.latent_encoding import DEFAULT_PRECISION, encode_views
from ctok.models.tokenizer import Tokenizer, build_tokenizer
from ctok.numerics import effective_precision
from ctok.training.config import build_config
from ctok.training.distributed import init_distributed
from ctok.training.generator import SiTTrainConfig, train_generator


def write_images(folder: Path, count: int, size: int, classes: int = 4) -> None:
    """Smooth random pictures (colour fields upsampled from 8x8), which compress like photographs do."""
    rng = np.random.default_rng(0)
    for i in range(count):
        cell = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        target = folder / f"class{i % classes}" / f"{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        cell.resize((size, size), Image.Resampling.BICUBIC).save(target)


def _steps_per_second(run_dir: Path, batch: int) -> float:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return records[-1]["samples_per_s"] / batch


def _setup(device: torch.device) -> dict:
    """The tokenizer, generator and sizes of both measurements, for ``device``."""
    torch.manual_seed(0)
    if device.type == "cuda":
        return dict(tokenizer=build_tokenizer("maetok-b-128"), tokenizer_name="maetok-b-128 (random weights)",
                    short_name="maetok-b-128",
                    model={"preset": "SiT-XL/1"}, batch=64, images=512, cache_images=2048, workers=8)
    return dict(tokenizer=Tokenizer.from_config(TINY_TOKENIZER), tokenizer_name="tiny (2-layer 64-wide ViTs, 32 px)",
                short_name="tiny",
                model={"preset": "SiT-S/1", "hidden_size": 64, "depth": 2, "num_heads": 4},
                batch=32, images=128, cache_images=256, workers=2)


def cache_throughput(device: str | torch.device, gemm: Gemm, quick: bool = False) -> tuple[dict, dict]:
    """The table row of building a latent cache with flips (items: images) and its ratios.

    ``cache_share_of_plain_encode`` = plain-forward time / build time, paired over rounds: the
    share of the encoder's own images/s that a build keeps. ``bf16_speedup`` (CUDA only) = fp32
    build time / bf16 build time.
    """
    device = torch.device(device)
    setup = _setup(device)
    tokenizer, batch = setup["tokenizer"].to(device).eval(), setup["batch"]
    images = setup["cache_images"] // (4 if quick else 1)
    precision = effective_precision(DEFAULT_PRECISION, device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images", images, tokenizer.image_size)
        dataset, names = open_images(tmp / "images", tokenizer.image_size), itertools.count()

        def builder(chosen: str):
            def build() -> None:
                out = tmp / f"cache-{next(names)}"  # a fresh folder: a finished cache would be a no-op
                build_latent_cache(tokenizer, dataset, out, tokenizer_source="benchmark", flip=True,
                                   batch_size=batch, num_workers=setup["workers"], precision=chosen)
                shutil.rmtree(out)
            return build

        resident = torch.rand(batch, 3, tokenizer.image_size, tokenizer.image_size, device=device) * 2 - 1

        def plain() -> None:  # the same forwards, from images already on the device, nothing kept
            for _ in range(math.ceil(images / batch)):
                encode_views(tokenizer, resident, flip=True, precision=precision)

        name = f"latent caching {setup['short_name']} {tokenizer.image_size}px with flips ({precision})"
        row = throughput(name, builder(precision), images, device, gemm, repeats=3)
        fns = {"cache": builder(precision), "plain_encode": plain}
        if device.type == "cuda":
            fns["cache_fp32"] = builder("fp32")
        t = timed_side_by_side(fns, device, warmup=1, repeats=3)
    ratios = {"tokenizer": setup["tokenizer_name"], "images": images, "batch": batch, "precision": precision,
              "cache_images_per_s": images / t["cache"]["median_s"],
              "plain_encode_images_per_s": images / t["plain_encode"]["median_s"],
              "cache_share_of_plain_encode": paired_ratio(t["plain_encode"], t["cache"]),
              **{f"{k}_s": summary(v) for k, v in t.items()}}
    if "cache_fp32" in t:
        ratios["bf16_speedup"] = paired_ratio(t["cache_fp32"], t["cache"])
    return row, ratios


def _weight_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".pt", ".safetensors"))


def latent_caching(device: str | torch.device = "cpu", quick: bool = False) -> dict:
    """Training speed from a latent cache and from images encoded on the fly, and the cache's build time.

    ``speedup`` = cached steps/s / on-the-fly steps/s. ``weight_files_written``: the checkpoints and
    exported weights the two runs left (none: they run with ``run.save_weights: false``).
    """
    device = torch.device(device)
    setup = _setup(device)
    tokenizer, model, batch, images, workers = (setup[k] for k in ("tokenizer", "model", "batch", "images", "workers"))
    interval = 5 if quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_images(tmp / "images", images, tokenizer.image_size)
        dataset = open_images(tmp / "images", tokenizer.image_size)
        start = time.perf_counter()
        build_latent_cache(tokenizer, dataset, tmp / "cache", tokenizer_source=str(tmp / "tokenizer"),
                           ctx=init_distributed(device.type), flip=True, batch_size=batch, num_workers=workers)
        cache_seconds = time.perf_counter() - start
        speeds, written = {}, []
        for name, data in (("cached", {"latents": str(tmp / "cache")}),
                           ("on_the_fly", {"images": str(tmp / "images"), "flip": True})):
            cfg = build_config(SiTTrainConfig, {
                "run": {"out_dir": str(tmp / name), "max_steps": 2 * interval, "log_every": interval,
                        "save_weights": False, "device": device.type, "compile": False},
                "tokenizer": str(tmp / "tokenizer"),
                "data": {**data, "batch_size": batch, "num_workers": workers},
                "model": {**model, "num_classes": 4},
                "samples": {"num_images": 1, "steps": 1},
            })
            train_generator("sit", cfg)
            speeds[name] = _steps_per_second(tmp / name, batch)
            written += _weight_files(tmp / name)
    return {
        "device": str(device), "tokenizer": setup["tokenizer_name"], "generator": model["preset"], "images": images,
        "batch": batch, "steps_timed": interval,
        "cache_build_s": cache_seconds, "cache_images_per_s": images / cache_seconds,
        "cached_steps_per_s": speeds["cached"], "on_the_fly_steps_per_s": speeds["on_the_fly"],
        "speedup": speeds["cached"] / speeds["on_the_fly"], "weight_files_written": written,
    }


if __name__ == "__main__":
    print(json.dumps(latent_caching("cuda" if torch.cuda.is_available() else "cpu"), indent=1))
