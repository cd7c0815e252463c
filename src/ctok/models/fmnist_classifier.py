"""A small CNN trained on Fashion-MNIST: the demo's stand-in for Inception-V3 as the FID feature network.

Inception's ImageNet features say little about 32x32 greyscale clothing, so the demo computes its
FID in the feature space of a classifier trained on the demo's own data, the common practice for
(Fashion-)MNIST generative models. Its outputs mirror what the ADM evaluator takes from Inception:
``"pool"`` (the global-average-pooled penultimate features, the FID space), ``"logits"`` (for an
Inception Score) and ``"spatial"`` (a mid-level feature map, the analogue of sFID's mixed_6).

The packaged weights are trained by ``scripts/train_fmnist_classifier.py``; its record (test
accuracy, command, seed, date) sits next to them in ``ctok/assets/fmnist_classifier.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import resources

import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from ctok.validation import check_tensor

WEIGHTS_NAME = "fmnist_classifier.safetensors"
RECORD_NAME = "fmnist_classifier.json"
NUM_CLASSES = 10
IMAGE_SIZE = 32


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FashionMNISTClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px) and a linear head; about 140k parameters.

    ``forward(x)`` takes images (B, 3, 32, 32) in [-1, 1] and returns
    ``{"pool": (B, 128), "logits": (B, 10), "spatial": (B, 64, 8, 8)}``.
    ``identity`` names the weights ("untrained" until loaded by :func:`load_fmnist_classifier`).
    """

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 16), nn.MaxPool2d(2))                    # 16 x 16
        self.stage1 = nn.Sequential(_conv(16, 32), _conv(32, 32), nn.MaxPool2d(2))  # 8 x 8
        self.stage2 = nn.Sequential(_conv(32, 64), _conv(64, 64))                   # 8 x 8
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), _conv(64, self.feature_dim))   # 4 x 4
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)
        self.identity = "untrained"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_tensor("images", x, (None, 3, IMAGE_SIZE, IMAGE_SIZE))
        # Catches the usual mistake of [0, 1] or [0, 255] inputs; decoded samples overshoot [-1, 1] a little.
        if x.numel() and (float(x.min()) < -1.5 or float(x.max()) > 1.5):
            raise ValueError(
                f"images must lie in [-1, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]"
            )
        spatial = self.stage2(self.stage1(self.stem(x)))
        pool = self.stage3(spatial).mean(dim=(2, 3))
        return {"pool": pool, "logits": self.head(pool), "spatial": spatial}


def load_fmnist_classifier(path: str | os.PathLike | None = None,
                           device: str | torch.device = "cpu") -> FashionMNISTClassifier:
    """The trained classifier in eval mode, from ``path`` or (default) the weights packaged with ctok.

    ``identity`` becomes ``"fmnist-classifier-<first 12 hex digits of the file's sha256>"``, so an
    FID computed with it can name the exact feature network.
    """
    if path is None:
        blob = resources.files("ctok").joinpath("assets", WEIGHTS_NAME).read_bytes()
    else:
        with open(path, "rb") as f:
            blob = f.read()
    model = FashionMNISTClassifier()
    model.load_state_dict(load_safetensors_bytes(blob))
    model.identity = f"fmnist-classifier-{hashlib.sha256(blob).hexdigest()[:12]}"
    return model.eval().requires_grad_(False).to(device)


def packaged_record() -> dict:
    """The training record of the packaged weights (test accuracy, command, seed, epochs, date)."""
    return json.loads(resources.files("ctok").joinpath("assets", RECORD_NAME).read_text())
