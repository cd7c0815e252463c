"""Latent caches: a dataset encoded once by a tokenizer, stored in shards for generator training.

Encoding ImageNet through a ViT tokenizer costs more than a SiT-XL step on the same batch, and
the tokenizer is frozen during generator training, so the latents are computed once
(``ctok cache-latents``) and read back by memory mapping. A cache folder holds::

    shard-00000.latents.npy   float32 (n, V, N, D): V views per image (the image; with --flip also its mirror)
    shard-00000.labels.npy    int64 (n,)
    shard-00000.json          sample count and running sums of the latents (written last: the shard is complete)
    index.json                written when every shard is complete: shapes, shards, statistics, tokenizer

``index.json`` carries the tokenizer's identity (:meth:`Tokenizer.identity`), so that a generator
trained on these latents is tied to the tokenizer that made them, the precision the encoder
computed in (``bf16``: autocast on CUDA, or ``fp32``; :mod:`ctok.latent_encoding`, the encoding
path that on-the-fly generator training shares), and the latents' statistics: the scalar mean and
standard deviation over every stored value (what a generator normalises with when the tokenizer's
config has no ``vq_mean``/``vq_std``), and per-channel ones for inspection.

Building is sharded: under torchrun, process r encodes shards r, r + W, r + 2W, ...; a shard is
written atomically, so an interrupted build resumes by encoding only the shards that are missing.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ctok.atomic_files import atomic_write, write_json
from ctok.data.images import usable_workers
from ctok.latent_encoding import DEFAULT_PRECISION, encode_views
from ctok.locking import folder_lock
from ctok.numerics import effective_precision
from ctok.settings_check import changed_keys
from ctok.training.distributed import DistContext, barrier

FORMAT = "ctok-latent-cache"
VERSION = 1
INDEX_NAME = "index.json"


class LatentStatistics:
    """Running sums of latents (B, N, D), in float64: mean and std overall and per channel.

    The sums live on the device of the latents they are given, so that adding a batch does not
    wait for the device; they are read back only by :meth:`sums` and :meth:`summary`.
    """

    def __init__(self, channels: int):
        self.count = 0
        self.channel = torch.zeros(channels, dtype=torch.float64)
        self.channel_sq = torch.zeros(channels, dtype=torch.float64)

    def update(self, z: torch.Tensor) -> None:
        flat = z.detach().double().reshape(-1, z.shape[-1])
        if self.channel.device != flat.device:
            self.channel, self.channel_sq = self.channel.to(flat.device), self.channel_sq.to(flat.device)
        self.count += flat.shape[0]
        self.channel += flat.sum(0)
        self.channel_sq += flat.square().sum(0)

    def merge(self, sums: dict) -> None:
        self.count += sums["count"]
        self.channel += torch.tensor(sums["channel_sum"], dtype=torch.float64, device=self.channel.device)
        self.channel_sq += torch.tensor(sums["channel_sum_sq"], dtype=torch.float64, device=self.channel.device)

    def sums(self) -> dict:
        return {"count": self.count, "channel_sum": self.channel.tolist(), "channel_sum_sq": self.channel_sq.tolist()}

    def summary(self) -> dict:
        """mean = sum / n and std = sqrt(sum_sq / n - mean^2) (population std), overall and per channel."""
        if self.count == 0:
            raise ValueError("no latents were seen: statistics of an empty set")
        channel, channel_sq = self.channel.cpu().numpy(), self.channel_sq.cpu().numpy()
        n_values = self.count * len(channel)
        mean = float(channel.sum()) / n_values
        channel_mean = channel / self.count
        channel_var = np.maximum(channel_sq / self.count - channel_mean**2, 0.0)
        return {
            "mean": mean,
            "std": math.sqrt(max(float(channel_sq.sum()) / n_values - mean**2, 0.0)),
            "channel_mean": channel_mean.tolist(),
            "channel_std": np.sqrt(channel_var).tolist(),
            "count": self.count,
        }


# What a shard is called: no separator and no "..", so an index can only point into its own folder.
SHARD_NAME = re.compile(r"shard-\d{5,}")


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


@torch.no_grad()
def build_latent_cache(tokenizer, dataset: Dataset, out: str | Path, *, tokenizer_source: str | os.PathLike,
                       ctx: DistContext | None = None, flip: bool = False, batch_size: int = 64,
                       shard_size: int = 10000, num_workers: int = 4, dataset_source: str = "",
                       limit: int | None = None, precision: str = DEFAULT_PRECISION) -> Path | None:
    """Encode ``dataset`` (its first ``limit`` images, if given) into a latent cache at ``out``.

    ``tokenizer_source`` (a folder or hub id) is recorded in index.json as where a generator trainer
    loads the tokenizer from; a local folder is recorded by its absolute path, so that the cache
    finds it from any working directory. ``ctx``: this process's place under torchrun
    (:func:`ctok.training.distributed.init_distributed`); None is a single process on the tokenizer's
    device. ``precision``: ``bf16`` (autocast, on CUDA only) or ``fp32``, as
    :func:`ctok.latent_encoding.encode_latents` applies it; the effective one is recorded in the
    index. Returns the index path on rank 0 (None elsewhere). Shards already complete in ``out``
    (from an interrupted build with the same settings) are kept.
    """
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    out = Path(out)
    source = str(Path(tokenizer_source).resolve()) if Path(tokenizer_source).is_dir() else str(tokenizer_source)
    if ctx is None:
        ctx = DistContext(rank=0, world_size=1, local_rank=0, device=next(tokenizer.parameters()).device)
    tokenizer = tokenizer.to(ctx.device).eval()
    total = len(dataset) if limit is None else min(limit, len(dataset))
    settings = {
        "tokenizer": tokenizer.identity(),
        "num_views": 2 if flip else 1,
        "shard_size": shard_size,
        "dataset_size": total,
        "dataset": dataset_source,
        "precision": effective_precision(precision, ctx.device),
    }
    if (out / INDEX_NAME).exists():
        return _finished(out, settings, ctx)
    with folder_lock(out, hold=ctx.is_main):
        return _build(tokenizer, dataset, out, settings, source, total, batch_size, num_workers, ctx)


def _finished(out: Path, settings: dict, ctx: DistContext) -> Path | None:
    """A rerun over a finished cache: nothing to do when it was built with these settings, else an error."""
    index = json.loads((out / INDEX_NAME).read_text())
    built = {"tokenizer": index["tokenizer"]["identity"], "num_views": index["num_views"],
             "dataset_size": index.get("dataset_size"), "dataset": index["dataset"],
             "precision": index.get("precision")}
    changed = [k for k, v in built.items() if v is not None and v != settings[k]]
    if changed:
        raise ValueError(f"{out} holds a finished latent cache built with other settings (different "
                         f"{', '.join(changed)}); choose another --out")
    if ctx.is_main:
        tqdm.write(f"{out} already holds this finished latent cache: nothing to do")
    return out / INDEX_NAME if ctx.is_main else None


def _build(tokenizer, dataset, out: Path, settings: dict, source: str, total: int, batch_size: int,
           num_workers: int, ctx: DistContext) -> Path | None:
    """Encode the shards this process owns that are not complete yet; the first process writes the index."""
    shard_size = settings["shard_size"]
    num_shards = math.ceil(total / shard_size)
    todo = [i for i in range(ctx.rank, num_shards, ctx.world_size) if not _shard_complete(out, i, settings)]
    rows = [range(i * shard_size, min((i + 1) * shard_size, total)) for i in todo]
    images_todo = sum(len(r) for r in rows)
    bar = tqdm(total=images_todo, desc=f"encoding (rank {ctx.rank}, {settings['precision']})", unit="img",
               disable=not ctx.is_main)
    start = time.perf_counter()
    if todo:
        encoder = _ShardEncoder(tokenizer, settings, ctx.device, max(len(r) for r in rows))
        # A shard is written by a thread while the next one is encoded, one write at a time: the
        # encoder alternates between two buffers, and the buffer it fills next was written out
        # (or its error raised here) before the write after it starts.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-shard") as writer:
            written = None
            for index, batches in zip(todo, _batches_by_shard(dataset, rows, batch_size, num_workers, ctx.device)):
                encoded = encoder.encode(batches, bar)
                if written is not None:
                    written.result()
                written = writer.submit(_write_shard, out, index, *encoded, settings)
            written.result()
    bar.close()
    if ctx.is_main and images_todo:
        seconds = time.perf_counter() - start
        tqdm.write(f"encoded {images_todo} images ({images_todo * settings['num_views']} encodes) in {seconds:.1f} s "
                   f"in {settings['precision']} on {ctx.device}: {images_todo / seconds:.1f} images/s, "
                   f"{images_todo * settings['num_views'] / seconds:.1f} encodes/s (this process)")
    barrier()
    if not ctx.is_main:
        return None
    return _write_index(out, num_shards, settings, tokenizer, source)


def _batches_by_shard(dataset, shards: list[range], batch_size: int, num_workers: int,
                      device: torch.device) -> Iterator[Iterator]:
    """For each shard (its dataset indices), an iterator over its batches, to be used up in order.

    One DataLoader serves every shard, so that its workers start once and read the next shard's
    images while this one is written; no batch spans two shards.
    """
    plan = [list(r[s:s + batch_size]) for r in shards for s in range(0, len(r), batch_size)]
    loader = DataLoader(dataset, batch_sampler=plan, num_workers=usable_workers(num_workers),
                        collate_fn=getattr(dataset, "collate", None), pin_memory=device.type == "cuda")
    batches = iter(loader)
    for r in shards:
        yield itertools.islice(batches, math.ceil(len(r) / batch_size))


class _ShardEncoder:
    """Encodes shards into two host buffers in turn (pinned on CUDA), one being written while the other fills.

    Each batch's latents are copied to the host without waiting (``non_blocking``), so the GPU runs
    ahead through the shard; the process waits once, before the shard is handed to the writer. For
    the same reason only the build's first batch has its value range checked (a read back from the
    device): the others come from the same dataset. A buffer holds a whole shard: ``shard_size * V
    * N * D`` float32 values (327 MB for 10000 images with flips of 128 x 32 latents, so 654 MB for
    the two).
    """

    def __init__(self, tokenizer, settings: dict, device: torch.device, rows: int):
        self.tokenizer, self.device = tokenizer, device
        self.flip, self.precision = settings["num_views"] == 2, settings["precision"]
        shape = (rows, settings["num_views"], tokenizer.num_tokens, tokenizer.latent_dim)
        self.buffers = [(torch.empty(shape, pin_memory=device.type == "cuda"), torch.empty(rows, dtype=torch.int64))
                        for _ in range(2)]
        self.turn = 0
        self.range_checked = False

    def encode(self, batches, bar: tqdm) -> tuple[np.ndarray, np.ndarray, LatentStatistics, list[str]]:
        """One shard's latents (n, V, N, D), labels (n,), their statistics and the unreadable files."""
        stats = LatentStatistics(self.tokenizer.latent_dim)
        latents, labels = self.buffers[self.turn]
        self.turn = 1 - self.turn
        filled, skipped = 0, []
        for batch in batches:
            images, skipped_here = batch[0].to(self.device, non_blocking=True), getattr(batch, "skipped", ())
            with self.tokenizer.images_checked() if self.range_checked else contextlib.nullcontext():
                z = encode_views(self.tokenizer, images, flip=self.flip, precision=self.precision)
            self.range_checked = True
            stats.update(z)  # sums stay on the device: no wait here either
            latents[filled:filled + len(z)].copy_(z, non_blocking=True)
            labels[filled:filled + len(z)] = torch.as_tensor(batch[1], dtype=torch.int64)
            filled += len(z)
            skipped.extend(skipped_here)
            bar.update(len(z) + len(skipped_here))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies above have landed
        return latents[:filled].numpy(), labels[:filled].numpy(), stats, skipped


def _shard_complete(out: Path, index: int, settings: dict) -> bool:
    meta_path = out / f"{_shard_name(index)}.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    if meta["settings"] != settings:
        changed = changed_keys(meta["settings"], settings)
        raise ValueError(f"{out} holds shards of another build (different {', '.join(changed)}); "
                         "finish it with the same settings or choose another --out")
    return True


def _write_shard(out: Path, index: int, latents: np.ndarray, labels: np.ndarray, stats: LatentStatistics,
                 skipped: list[str], settings: dict) -> None:
    name = _shard_name(index)
    with atomic_write(out / f"{name}.latents.npy") as f:
        np.save(f, latents)
    with atomic_write(out / f"{name}.labels.npy") as f:
        np.save(f, labels)
    meta = {"count": int(labels.shape[0]), "settings": settings, "sums": stats.sums(), "skipped": skipped,
            "label_min": int(labels.min()) if labels.size else 0, "label_max": int(labels.max()) if labels.size else -1}
    write_json(out / f"{name}.json", meta, indent=None)


def _write_index(out: Path, num_shards: int, settings: dict, tokenizer, tokenizer_source: str) -> Path:
    stats = LatentStatistics(tokenizer.latent_dim)
    shards, skipped, label_min, label_max = [], [], None, None
    for i in range(num_shards):
        meta = json.loads((out / f"{_shard_name(i)}.json").read_text())
        stats.merge(meta["sums"])
        skipped.extend(meta["skipped"])
        if meta["count"]:
            label_min = meta["label_min"] if label_min is None else min(label_min, meta["label_min"])
            label_max = meta["label_max"] if label_max is None else max(label_max, meta["label_max"])
        shards.append({"name": _shard_name(i), "count": meta["count"]})
    index = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": {"identity": settings["tokenizer"], "source": tokenizer_source,
                      "image_size": tokenizer.image_size,
                      "vq_mean": tokenizer.config.vq_mean, "vq_std": tokenizer.config.vq_std},
        "dataset": settings["dataset"],
        "dataset_size": settings["dataset_size"],
        "precision": settings["precision"],
        "num_samples": sum(s["count"] for s in shards),
        "num_views": settings["num_views"],
        "num_tokens": tokenizer.num_tokens,
        "latent_dim": tokenizer.latent_dim,
        "label_range": [label_min, label_max],
        "stats": stats.summary(),
        "shards": shards,
        "skipped": skipped,
    }
    path = out / INDEX_NAME
    write_json(path, index, indent=1)
    return path


@dataclass(frozen=True)
class CacheInfo:
    """The parts of ``index.json`` a trainer checks before it starts."""

    folder: Path
    num_samples: int
    num_views: int
    num_tokens: int
    latent_dim: int
    label_range: tuple[int, int]
    tokenizer_identity: str
    tokenizer_source: str
    mean: float
    std: float
    precision: str  # what the encoder computed in: "bf16" (autocast on CUDA) or "fp32"


class LatentCache(Dataset):
    """A finished cache as a Dataset of (latents float32 (V, N, D), label); shards are memory-mapped."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index_path = folder / INDEX_NAME
        if not index_path.is_file():
            hint = ("an unfinished build: rerun the same `ctok cache-latents` command to complete it"
                    if any(folder.glob("shard-*.json")) else "run `ctok cache-latents --out DIR` to make one")
            raise FileNotFoundError(f"{folder} is not a finished latent cache (no {INDEX_NAME}); {hint}")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"{index_path} is not a {FORMAT} version {VERSION} index")
        self.index = index
        self.info = CacheInfo(
            folder=folder, num_samples=index["num_samples"], num_views=index["num_views"],
            num_tokens=index["num_tokens"], latent_dim=index["latent_dim"], label_range=tuple(index["label_range"]),
            tokenizer_identity=index["tokenizer"]["identity"], tokenizer_source=index["tokenizer"]["source"],
            mean=index["stats"]["mean"], std=index["stats"]["std"],
            # caches from before the precision was recorded were all encoded in float32
            precision=index.get("precision", "fp32"),
        )
        counts = [s["count"] for s in index["shards"]]
        self._names = [s["name"] for s in index["shards"]]
        # The index is a file a user may have been handed: its shard names stay inside this folder.
        foreign = [n for n in self._names if not isinstance(n, str) or not SHARD_NAME.fullmatch(n)]
        if foreign:
            raise ValueError(f"{index_path} names shards outside the cache's own pattern (shard-NNNNN): {foreign[:3]}; "
                             "a cache's shards must be files in its own folder")
        self._starts = np.cumsum([0] + counts)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.info.num_samples

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        # Opened lazily, so that each DataLoader worker maps the files itself after the fork.
        if i not in self._maps:
            base = self.info.folder / self._names[i]
            self._maps[i] = (np.load(f"{base}.latents.npy", mmap_mode="r", allow_pickle=False),
                             np.load(f"{base}.labels.npy", mmap_mode="r", allow_pickle=False))
        return self._maps[i]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"latent cache index {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        latents, labels = self._shard(shard)
        row = index - int(self._starts[shard])
        return torch.from_numpy(np.array(latents[row])), int(labels[row])
