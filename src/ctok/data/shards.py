"""Sharded datasets: an image folder packed into webdataset tar shards, and read back by index.

Why. At ImageNet scale a folder of 1.28 million files strains a shared file system: every epoch
opens every file. ``ctok make-shards`` packs the folder into a few thousand tar files in
webdataset's format instead (written with webdataset's ``TarWriter``): sample i of the folder
(:class:`ctok.data.images.ImageFolder`'s order) becomes the members ``{i:08d}.{ext}``, the file's
original bytes, not re-encoded, and ``{i:08d}.cls``, its class id as decimal text; ``shard_size``
samples go to each ``train-NNNNNN.tar``. ``shards.json`` beside them, written last, records the
counts and the class names; it is also a wids dataset description, so ``wids.ShardListDataset``
opens the same shards. Several shards are written at once (threads: the work waits on the disk), and
each appears whole or not at all, so a run killed after hours is finished by running it again: the
plan recorded before the first shard (``shards-plan.json``: the shard size and a digest of the
ordered file list) must match, and only the missing shards are written.

Reading is by index, not by streaming: :class:`ImageShards` is a map-style dataset whose item i is
the folder's item i, decoded, cropped and (if broken) skipped the same way. The training loop's
seeded sampler (:mod:`ctok.training.sharding`), its split over processes and DataLoader workers and
its resumption from the position stored in a checkpoint therefore apply unchanged, and a run on the
shards is bit-identical to the same run on the folder. When the dataset opens, every shard's tar
headers are indexed once (wids' memory-mapped tar index) and only the shard, offset and size of
each sample's image and its label are kept; a worker then reads an image with one seek and one
read, as it would read a file.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import io
import json
import os
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ctok.atomic_files import atomic_write, write_json
from ctok.data.images import IMAGE_EXTENSIONS, CroppedImages, list_images, read_rgb
from ctok.locking import folder_lock
from ctok.settings_check import check_same_settings

FORMAT = "ctok-shards"
INDEX_NAME = "shards.json"
PLAN_NAME = "shards-plan.json"  # an unfinished set's record, replaced by shards.json
PREFIX = "train"
_IMAGE_SUFFIXES = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}
_TAR_HEADER = 512  # a member's data follows its 512-byte header
# Shards written at once, in threads. Not capped at the CPU count: the writers mostly wait on the disk
# (on 2 busy cores, 8 threads wrote 1.6-1.7x as fast as 1, 2 threads 1.25-1.3x, 2 or 4 processes at most 1.35x).
DEFAULT_WORKERS = 8


def _require(module: str):
    """Import an optional package of the ``shards`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"sharded datasets need the {module.split('.')[0]} package: "
                         "pip install webdataset wids (or pip install 'ctok[shards]')") from err


# -- writing -------------------------------------------------------------------------------------
def make_shards(data: str | os.PathLike, out: str | os.PathLike, shard_size: int, *,
                workers: int = DEFAULT_WORKERS) -> Path:
    """Write the image folder ``data`` (ImageNet class sub-folders, or flat) as tar shards of
    ``shard_size`` samples in ``out`` (see the module docstring), ``workers`` shards at a time;
    returns the path of shards.json.

    Each shard appears whole or not at all; shards.json is written last, so its presence means the
    set is complete. A rerun into an unfinished ``out`` writes only the shards that are missing, after
    checking that they belong to the same plan (see :func:`_check_plan`). Broken image files are
    copied as they are: training skips them as it would in the folder.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    tar_writer = _require("webdataset").TarWriter
    classes, samples = list_images(Path(data))
    out = Path(out)
    if (out / INDEX_NAME).exists():
        raise ValueError(f"{out} already holds a finished set of shards ({INDEX_NAME}); choose another --out")
    shards = [_Shard(f"{PREFIX}-{n:06d}.tar", first, samples[first:first + shard_size])
              for n, first in enumerate(range(0, len(samples), shard_size))]
    with folder_lock(out):
        _check_plan(out, _plan(Path(data), samples, shard_size))
        _write_missing(out, shards, max(8, len(str(len(samples) - 1))), workers, tar_writer)
        shardlist = [{"url": s.name, "nsamples": len(s.samples), "filesize": (out / s.name).stat().st_size}
                     for s in shards]
        write_json(out / INDEX_NAME, _index(data, classes, samples, shard_size, shardlist), indent=1)
        (out / PLAN_NAME).unlink()  # shards.json is the finished set's record now
    return out / INDEX_NAME


def _plan(data: Path, samples: list[tuple[Path, int]], shard_size: int) -> dict:
    """What decides every shard's bytes: the shard size and the ordered (relative path, label) list,
    kept as a digest so that a folder which gained, lost or renamed a file no longer matches."""
    digest = hashlib.sha256()
    for path, label in samples:
        # NUL ends each field: it cannot occur in a path, so no two lists hash the same text.
        digest.update(os.fsencode(path.relative_to(data)) + b"\0" + str(label).encode() + b"\0")
    return {"format": FORMAT, "shard_size": shard_size, "num_samples": len(samples),
            "file_list_sha256": digest.hexdigest()}


def _check_plan(out: Path, plan: dict) -> None:
    """Record ``plan`` in ``out`` before the first shard, or refuse an ``out`` holding shards of another one.

    Runs under ``out``'s lock, so a temporary shard there was left by a killed writer: it is removed.
    """
    if not (out / PLAN_NAME).is_file():
        unknown = sorted(out.glob(f"{PREFIX}-*.tar"))
        if unknown:
            raise ValueError(f"{out} holds {unknown[0].name} but no {PLAN_NAME}, so what its shards were written "
                             "from is unknown; choose another --out, or delete them")
    check_same_settings(out / PLAN_NAME, plan, f"{out} holds unfinished shards written")
    for stale in out.glob(f".{PREFIX}-*.tar.*.tmp"):  # atomic_write's temporary names
        stale.unlink()


class _Shard(NamedTuple):
    """One shard to write: its file name, the number of its first sample, its (path, label) samples."""

    name: str
    first: int
    samples: list[tuple[Path, int]]


def _write_missing(out: Path, shards: list[_Shard], digits: int, workers: int, tar_writer) -> None:
    """Write the ``shards`` that ``out`` lacks, ``workers`` at a time. Threads, not processes: reading
    files, writing and syncing tars wait on the disk without the GIL, and measured no slower than processes."""
    todo = [s for s in shards if not (out / s.name).is_file()]
    if len(todo) < len(shards):
        tqdm.write(f"{out}: {len(shards) - len(todo)} of {len(shards)} shards are there already; "
                   f"writing the other {len(todo)}")
    total, left = (sum(len(s.samples) for s in some) for some in (shards, todo))
    with (tqdm(total=total, initial=total - left, desc="writing shards", unit="img") as bar,
          ThreadPoolExecutor(workers) as pool):
        jobs = {pool.submit(_write_shard, out / s.name, s.samples, s.first, digits, tar_writer): len(s.samples)
                for s in todo}
        try:
            for job in as_completed(jobs):
                job.result()
                bar.update(jobs[job])
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the shards being written finish; no new one starts
            raise


def _index(data: str | os.PathLike, classes: list[str], samples: list[tuple[Path, int]], shard_size: int,
           shardlist: list[dict]) -> dict:
    """shards.json's content."""
    labels = np.array([label for _, label in samples])
    return {
        "format": FORMAT, "version": 1,
        # What makes the file a wids dataset description, whose shard urls are relative to it.
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": PREFIX,
        "source": str(Path(data).resolve()),
        "num_samples": len(samples),
        "shard_size": shard_size,
        "num_classes": len(classes),
        "class_names": classes,
        "class_counts": np.bincount(labels, minlength=len(classes)).tolist() if classes else [],
        "shardlist": shardlist,
    }


def _write_shard(path: Path, samples: list[tuple[Path, int]], first: int, digits: int, tar_writer) -> None:
    """One shard of ``samples`` (numbered from ``first``), atomically."""
    with atomic_write(path) as f:
        # mtime 0 instead of the clock: the same folder always gives byte-identical shards.
        with tar_writer(f, encoder=False, mtime=0) as tar:
            for i, (file, label) in enumerate(samples, start=first):
                suffix = file.suffix.lower().lstrip(".")
                tar.write({"__key__": f"{i:0{digits}d}", suffix: file.read_bytes(), "cls": str(label).encode()})


# -- reading -------------------------------------------------------------------------------------
def shard_files(shards: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """(the shard files, class names) that ``shards`` names: a brace pattern such as
    ``DIR/train-{000000..000127}.tar`` (webdataset's notation; ``::`` joins several), or a folder
    (the shards its shards.json lists, else its ``*.tar`` files in name order). The class names
    come from the shards.json beside the shards (none without one)."""
    text = str(shards)
    if "://" in text or text.startswith("pipe:"):
        raise ValueError(f"data.shards {text!r} is a URL or a command; only local shard files are read "
                         "(they are read by index): copy them to a local or mounted folder first")
    if Path(text).is_dir():
        paths = _folder_shards(Path(text))
    else:
        try:
            paths = [Path(p) for p in _require("webdataset.shardlists").expand_urls(text)]
        except ValueError as err:  # braceexpand's UnbalancedBracesError
            raise ValueError(f"data.shards {text!r} is not a valid brace pattern ({err}); write it like "
                             "DIR/train-{000000..000127}.tar") from err
    _check_shard_paths(text, paths)
    index = paths[0].parent / INDEX_NAME
    classes = _read_index(index).get("class_names", []) if index.is_file() else []
    return paths, classes


def _read_index(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): rewrite the shards with ctok make-shards") from err


def _folder_shards(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        listed = _read_index(index).get("shardlist")
        if not listed:
            raise ValueError(f"{index} lists no shards (no 'shardlist')")
        return [folder / entry["url"] for entry in listed]
    paths = sorted(folder.glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"data.shards folder {folder} holds no {INDEX_NAME} and no .tar shards "
                                "(write them with ctok make-shards)")
    return paths


def _check_shard_paths(text: str, paths: list[Path]) -> None:
    not_tar = [p for p in paths if p.suffix != ".tar"]
    if not_tar:
        raise ValueError(f"data.shards {text!r} names {not_tar[0]}, not an uncompressed .tar shard: shards are "
                         "read by index, which compressed tars do not allow")
    repeated = [p for p, n in Counter(paths).items() if n > 1]
    if repeated:
        raise ValueError(f"data.shards {text!r} names {repeated[0]} more than once")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} shards that data.shards {text!r} names do not "
                                f"exist, the first: {missing[0]}")


class _ShardIndex(NamedTuple):
    """Per sample of one shard: its image member's name, data offset and size (offset -1: no image), its label."""

    names: list[bytes]
    offsets: list[int]
    sizes: list[int]
    labels: list[int]


def _index_shard(path: Path) -> _ShardIndex:
    """Read the tar headers of one shard (wids' memory-mapped index) and group its members into samples
    by webdataset's rule: consecutive members whose names agree up to the first dot of the file name."""
    mmtar = _require("wids.wids_mmtar")
    try:
        tar = mmtar.MMIndexedTar(str(path))
    except (ValueError, OSError, struct.error, UnicodeDecodeError) as err:
        raise ValueError(f"shard {path} is not a readable tar file ({type(err).__name__}: {err})") from err
    found = _ShardIndex([], [], [], [])
    try:
        key = None
        for name, header, size in tar.by_index:  # in file order
            folder, _, file = name.rpartition("/")
            stem, _, suffix = file.partition(".")
            if (folder, stem) != key:  # a new sample; until its image shows up it has none
                key = folder, stem
                found.names.append(f"{name.rpartition('.')[0]} (no image)".encode())
                found.offsets.append(-1)
                found.sizes.append(0)
                found.labels.append(0)
            suffix = suffix.lower()
            if suffix == "cls":
                found.labels[-1] = _parse_label(tar.mmapped_file[header + _TAR_HEADER:header + _TAR_HEADER + size],
                                                path, name)
            elif suffix in _IMAGE_SUFFIXES and found.offsets[-1] < 0:
                found.names[-1], found.offsets[-1], found.sizes[-1] = name.encode(), header + _TAR_HEADER, size
    finally:
        tar.close()
    return found


def _parse_label(data: bytes, path: Path, member: str) -> int:
    try:
        return int(bytes(data).decode().strip())
    except ValueError as err:
        raise ValueError(f"shard {path}: {member} should hold a class id (decimal text), "
                         f"holds {bytes(data)[:20]!r}") from err


class ImageShards(CroppedImages):
    """The samples of webdataset shards (``data.shards``: a brace pattern or a folder, see
    :func:`shard_files`) in pattern order, as (image in [-1, 1] (3, S, S), label) pairs cropped like
    :class:`ctok.data.images.ImageFolder`'s; a sample that cannot be decoded, or has no image, is a
    :class:`ctok.data.images.BrokenImage` that ``collate`` drops and reports.

    Shards written by ``ctok make-shards`` from a folder give the folder's items at the same indices.
    """

    def __init__(self, shards: str | os.PathLike, image_size: int, *, crop: str = "center", hflip: bool = False):
        super().__init__(image_size, crop=crop, hflip=hflip)
        self.source = str(shards)
        paths, self.classes = shard_files(shards)
        self.paths = [str(p) for p in paths]
        indexes = [_index_shard(p) for p in tqdm(paths, desc="indexing shards", unit="shard", leave=False,
                                                  disable=len(paths) < 50)]
        # Compact arrays, not per-sample Python objects: DataLoader workers share them after the fork.
        self._shard = np.concatenate([np.full(len(ix.labels), i, dtype=np.int32) for i, ix in enumerate(indexes)])
        self._names = np.array([n for ix in indexes for n in ix.names], dtype=bytes)
        self._offsets = np.array([o for ix in indexes for o in ix.offsets], dtype=np.int64)
        self._sizes = np.array([s for ix in indexes for s in ix.sizes], dtype=np.int64)
        self.labels = np.array([y for ix in indexes for y in ix.labels], dtype=np.int64)
        if not len(self.labels):
            raise ValueError(f"the shards of data.shards {self.source!r} hold no samples")
        if not self.classes and self.labels.max() > 0:
            # Shards without a shards.json (made by other tools) carry class ids but not their names.
            self.classes = [str(c) for c in range(int(self.labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, index: int) -> tuple[str, int, Callable[[], Image.Image]]:
        shard = self.paths[self._shard[index]]
        name = f"{shard}:{self._names[index].decode()}"
        read = functools.partial(_read_image, shard, int(self._offsets[index]), int(self._sizes[index]), name)
        return name, int(self.labels[index]), read


def _read_image(shard: str, offset: int, size: int, name: str) -> Image.Image:
    if offset < 0:
        raise ValueError(f"the sample has no image member ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) < size:
        raise ValueError(f"the shard ends {size - len(data)} bytes before the end of this image (truncated)")
    return read_rgb(_NamedBytes(data, name), name)


class _NamedBytes(io.BytesIO):
    """An image's bytes that PIL's error messages call by the sample's name, not by an object address."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)
