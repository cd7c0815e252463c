"""Sharded datasets: an image folder packed into webdataset tar shards, and read back by index.

Why. At ImageNet scale a folder of 1.28 million files strains a shared file system: every epoch
opens every file. ``ctok make-shards`` packs the folder into a few thousand tar files in
webdataset's format instead (written with webdataset's ``TarWriter``): sample i of the folder
(:class:`ctok.data.images.ImageFolder`'s order) becomes the members ``{i:08d}.{ext}``, the file's
original bytes, not re-encoded, and ``{i:08d}.cls``, its class id as decimal text; ``shard_size``
samples go to each ``train-NNNNNN.tar``. ``shards.json`` beside them, written last, records the
counts and the class names; it is also a wids dataset description, so ``wids.ShardListDataset``
opens the same shards.

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
import importlib
import io
import json
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ctok.atomic_files import atomic_write, write_json
from ctok.data.images import IMAGE_EXTENSIONS, CroppedImages, list_images, read_rgb

FORMAT = "ctok-shards"
INDEX_NAME = "shards.json"
PREFIX = "train"
_IMAGE_SUFFIXES = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}
_TAR_HEADER = 512  # a member's data follows its 512-byte header


def _require(module: str):
    """Import an optional package of the ``shards`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"sharded datasets need the {module.split('.')[0]} package: "
                         "pip install webdataset wids (or pip install 'ctok[shards]')") from err


# -- writing -------------------------------------------------------------------------------------
def make_shards(data: str | os.PathLike, out: str | os.PathLike, shard_size: int) -> Path:
    """Write the image folder ``data`` (ImageNet class sub-folders, or flat) as tar shards of
    ``shard_size`` samples in ``out`` (see the module docstring); returns the path of shards.json.

    Each shard appears whole or not at all; shards.json is written last, so its presence means the
    set is complete. Broken image files are copied as they are: training skips them as it would
    in the folder.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    tar_writer = _require("webdataset").TarWriter
    classes, samples = list_images(Path(data))
    out = Path(out)
    if (out / INDEX_NAME).exists():
        raise ValueError(f"{out} already holds a finished set of shards ({INDEX_NAME}); choose another --out")
    digits = max(8, len(str(len(samples) - 1)))
    shardlist = []
    with tqdm(total=len(samples), desc="writing shards", unit="img") as bar:
        for first in range(0, len(samples), shard_size):
            name = f"{PREFIX}-{first // shard_size:06d}.tar"
            part = samples[first:first + shard_size]
            size = _write_shard(out / name, part, first, digits, tar_writer)
            shardlist.append({"url": name, "nsamples": len(part), "filesize": size})
            bar.update(len(part))
    labels = np.array([label for _, label in samples])
    index = {
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
    write_json(out / INDEX_NAME, index, indent=1)
    return out / INDEX_NAME


def _write_shard(path: Path, samples: list[tuple[Path, int]], first: int, digits: int, tar_writer) -> int:
    """One shard of ``samples`` (numbered from ``first``), atomically; returns its size in bytes."""
    with atomic_write(path) as f:
        # mtime 0 instead of the clock: the same folder always gives byte-identical shards.
        with tar_writer(f, encoder=False, mtime=0) as tar:
            for i, (file, label) in enumerate(samples, start=first):
                suffix = file.suffix.lower().lstrip(".")
                tar.write({"__key__": f"{i:0{digits}d}", suffix: file.read_bytes(), "cls": str(label).encode()})
        return f.tell()


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
