"""Datasets: folders of images (ImageNet layout or flat) and Fashion-MNIST for the demo."""
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
    ImageBatch,
    ImageFolder,
    center_crop_adm,
    pil_to_tensor,
    random_crop_adm,
)
from ctok.data.sources import open_images

__all__ = [
    "BrokenImage",
    "CLASS_NAMES",
    "FashionMNIST",
    "IMAGE_EXTENSIONS",
    "ImageBatch",
    "ImageFolder",
    "center_crop_adm",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_fashion_mnist_raw",
    "open_images",
    "pil_to_tensor",
    "random_crop_adm",
    "to_model_images",
]
