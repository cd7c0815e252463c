"""What a latent cache buys: SiT training steps per second from cached latents against on-the-fly encoding.

Both runs go through ``train_generator`` (the code behind ``ctok train-sit``) on the same images,
side by side in one process: once reading a cache built from those images with ``--flip`` (the
cost of building it is reported too), once loading the PNG files and encoding each batch through
the tokenizer with random mirroring. Steps per second come from the run's own log: the second of
two log intervals, so start-up and the first steps are not counted.

GPU: a random-initialised MAETok-B-128 at 256 px and SiT-XL/1, batch 64. CPU: a tiny tokenizer
(2-layer, 64-wide ViTs, 32 px) and the tiny-sit network, batch 32.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ctok.data import open_images
from ctok.latent_cache import build_latent_cache
from ctok.models.tokenizer import Tokenizer, build_tokenizer
from ctok.training.config import build_config
from ctok.training.distributed import init_distributed
from ctok.training.generator import SiTTrainConfig, train_generator

TINY_TOKENIZER = dict(image_size=32, base_image_size=32, encoder_model="vit_tiny_patch14_dinov2",
                      decoder_model="vit_tiny_patch14_dinov2", enc_patch_size=8, dec_patch_size=8,
                      num_latent_tokens=8, codebook_embed_dim=4, codebook_size=64, num_codebooks=1,
                      encoder_size=[64, 2, 2], decoder_size=[64, 2, 2])


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


def latent_caching(device: str | torch.device = "cpu", quick: bool = False) -> dict:
    """Training speed from a latent cache and from images encoded on the fly, and the cache's build time.

    ``speedup`` = cached steps/s / on-the-fly steps/s.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    if gpu:
        tokenizer, tokenizer_name = build_tokenizer("maetok-b-128"), "maetok-b-128 (random weights)"
        model = {"preset": "SiT-XL/1"}
        batch, images, workers = 64, 512, 8
    else:
        tokenizer, tokenizer_name = Tokenizer.from_config(TINY_TOKENIZER), "tiny (2-layer 64-wide ViTs, 32 px)"
        model = {"preset": "SiT-S/1", "hidden_size": 64, "depth": 2, "num_heads": 4}
        batch, images, workers = 32, 128, 2
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
        speeds = {}
        for name, data in (("cached", {"latents": str(tmp / "cache")}),
                           ("on_the_fly", {"images": str(tmp / "images"), "flip": True})):
            cfg = build_config(SiTTrainConfig, {
                "run": {"out_dir": str(tmp / name), "max_steps": 2 * interval, "log_every": interval,
                        "ckpt_every": 10 * interval, "device": device.type, "compile": False},
                "tokenizer": str(tmp / "tokenizer"),
                "data": {**data, "batch_size": batch, "num_workers": workers},
                "model": {**model, "num_classes": 4},
                "samples": {"num_images": 1, "steps": 1},
            })
            train_generator("sit", cfg)
            speeds[name] = _steps_per_second(tmp / name, batch)
    return {
        "device": str(device), "tokenizer": tokenizer_name, "generator": model["preset"], "images": images,
        "batch": batch, "steps_timed": interval,
        "cache_build_s": cache_seconds, "cache_images_per_s": images / cache_seconds,
        "cached_steps_per_s": speeds["cached"], "on_the_fly_steps_per_s": speeds["on_the_fly"],
        "speedup": speeds["cached"] / speeds["on_the_fly"],
    }


if __name__ == "__main__":
    print(json.dumps(latent_caching("cuda" if torch.cuda.is_available() else "cpu"), indent=1))
