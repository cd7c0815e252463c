"""Opening a training or evaluation image source by its path: Fashion-MNIST's files, an image folder, or shards."""
from __future__ import annotations

import os

from torch.utils.data import Dataset

from ctok.data import fashion_mnist
from ctok.data.images import ImageFolder
from ctok.data.shards import ImageShards


def open_images(path: str | os.PathLike, image_size: int, *, crop: str = "center") -> Dataset:
    """The images under ``path`` as (image in [-1, 1] (3, S, S), label) pairs.

    A folder with Fashion-MNIST's IDX files gives its training split (32 px, used whole); any
    other folder is read as an image folder (ImageNet class sub-folders, or flat) with ADM's
    ``crop`` ("center" or "random"). Nothing is downloaded: ``path`` names the data to use.
    """
    try:
        folder = fashion_mnist.find_fashion_mnist(path, download=False)
    except FileNotFoundError:
        return ImageFolder(path, image_size, crop=crop)
    if crop != "center":
        raise ValueError("Fashion-MNIST images are used whole (padded to 32 px), not cropped: set data.crop=center")
    if image_size != fashion_mnist.IMAGE_SIZE:
        raise ValueError(f"Fashion-MNIST images are {fashion_mnist.IMAGE_SIZE} px but the tokenizer takes "
                         f"{image_size} px images (model.image_size={fashion_mnist.IMAGE_SIZE} trains one that fits)")
    return fashion_mnist.FashionMNIST("train", folder, download=False)


def open_images_or_shards(images: str | os.PathLike | None, shards: str | os.PathLike | None, image_size: int, *,
                          crop: str = "center") -> Dataset:
    """The training images a config's ``data.images`` or ``data.shards`` (exactly one) names:
    :func:`open_images` of the one, or :class:`ctok.data.shards.ImageShards` of the other."""
    if images is None and shards is None:
        raise ValueError("set data.images to the training images (an image folder, ImageNet class sub-folders or "
                         "flat, or Fashion-MNIST's folder) or data.shards to their webdataset shards "
                         "(from `ctok make-shards`)")
    if images is not None and shards is not None:
        raise ValueError("set only one of data.images and data.shards: they are two ways to give the same images")
    if shards is not None:
        return ImageShards(shards, image_size, crop=crop)
    return open_images(images, image_size, crop=crop)
