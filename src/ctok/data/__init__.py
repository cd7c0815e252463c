"""Datasets: folders of images (ImageNet layout or flat), their webdataset shards, and Fashion-MNIST for the demo."""
from ctok.data.fashion_mnist import (
    CLASS_NAMES,
    FashionMNIST,
    find_fashion_mnist,
    load_fashion_mnist,
    load_fashion_mnist_raw,
    to_model_images,
)
from ctok.data.images import (
    IMAGE_EXTENSIONS,
    BrokenImage,
    CroppedImages,
    ImageBatch,
    ImageFolder,
    center_crop_adm,
    pil_to_tensor,
    random_crop_adm,
)
from ctok.data.shards import ImageShards, make_shards
from ctok.data.sources import open_images, open_images_or_shards

__all__ = [
    "BrokenImage",
    "CLASS_NAMES",
    "CroppedImages",
    "FashionMNIST",
    "IMAGE_EXTENSIONS",
    "ImageBatch",
    "ImageFolder",
    "ImageShards",
    "center_crop_adm",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_fashion_mnist_raw",
    "make_shards",
    "open_images",
    "open_images_or_shards",
    "pil_to_tensor",
    "random_crop_adm",
    "to_model_images",
]
