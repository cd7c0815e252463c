"""The Inception-V3 of the TF FID graph (``classify_image_graph_def.pb``, 2015-12-05) in PyTorch.

ADM's evaluator reads three things from that graph: ``pool_3`` (2048-d, FID, precision/recall),
``mixed_6/conv`` (sFID) and the logits of ``softmax/logits/MatMul`` (IS). Here they come from the
same weights, converted to PyTorch by torch-fidelity (``weights-inception-2015-12-05-6726825d.pth``).

The layers are torchvision's Inception-V3 blocks, whose module names are the ones in that file,
with the graph's three departures from the paper's network restored:
* average pools in the blocks ignore the zero padding (TF's ``AvgPool`` with SAME padding);
* the last block (``mixed_10``) pools its pooling branch with a max, not an average;
* 1008 output classes, and the logits are the bare MatMul (ADM applies no bias).

``mixed_6/conv`` is the ReLU output of the 1x1 branch of ``mixed_6``. TF numbers the 17x17 blocks
mixed_3 (the grid reduction, torchvision's Mixed_6a) to mixed_7 (Mixed_6e), so mixed_6 is
**Mixed_6d**; torch-fidelity's converter maps ``mixed_6/conv/conv2d_params`` to
``Mixed_6d.branch1x1.conv``, and in the graph the op named ``mixed_6/conv`` is neither
``mixed_6/conv/Conv2D`` nor ``mixed_6/conv/batchnorm`` but the layer's output after them, the ReLU
(192 channels, 17 x 17). ADM keeps its first 7 channels and flattens the NHWC tensor, so the
2023-d vector is ordered (row, column, channel); the order matters only against stored ``mu_s``.

Input handling follows the graph: uint8 pixel values as floats, TF's bilinear resize to 299, then
``(x - 128) / 128``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)

from ctok.metrics.tf_resize import resize_bilinear_tf
from ctok.metrics.weight_files import WeightFile, load_state_dict, resolve_weight_file
from ctok.uint8 import to_uint8
from ctok.validation import check_tensor

INCEPTION_WEIGHTS = WeightFile(
    what="Inception-V3 (the TF FID graph, converted by torch-fidelity)",
    filename="weights-inception-2015-12-05-6726825d.pth",
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    env_var="CTOK_INCEPTION_WEIGHTS",
)
# The identity of the network whose features ADM's reference statistics (mu, sigma, mu_s, sigma_s) hold.
PUBLISHED_IDENTITY = f"inception-2015-12-05:sha256:{INCEPTION_WEIGHTS.sha256}"
RANDOM_IDENTITY = "inception-2015-12-05:random-init:seed=0 (NOT comparable to any published number)"

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
NUM_LOGITS = 1008


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(InceptionA):
    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))]


class _InceptionC(InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        return [self.branch1x1(x), b7, b7d, self.branch_pool(_tf_avg_pool(x))]


class _InceptionE(InceptionE):
    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return [self.branch1x1(x), b3, b3d, self.branch_pool(pooled)]


class InceptionV3Features(Inception3):
    """ADM's Inception features of images (B, 3, H, W) in [-1, 1], any H and W.

    ``forward`` returns ``{"pool": (B, 2048), "spatial": (B, 2023), "logits": (B, 1008)}`` in float32.
    Images are first quantised to the 256 levels of an 8-bit image (:func:`ctok.uint8.to_uint8`): the
    TF graph only ever saw uint8 files, and this makes an image read from a uint8 file and mapped
    to [-1, 1] give exactly the features of the file. ``identity`` names the weights.
    """

    def __init__(self):
        super().__init__(
            num_classes=NUM_LOGITS, aux_logits=False, init_weights=False,
            inception_blocks=[BasicConv2d, _InceptionA, InceptionB, _InceptionC, InceptionD, _InceptionE, None],
        )
        self.Mixed_7c = _InceptionE(2048, max_pool=True)
        self.identity = "inception-2015-12-05:unloaded"

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_tensor("images", images, (None, 3, None, None))
        if images.numel() and (float(images.min()) < -1.5 or float(images.max()) > 1.5):
            raise ValueError(
                f"images must lie in [-1, 1], got values in [{float(images.min()):.3g}, {float(images.max()):.3g}]"
                " (map uint8 images with x / 127.5 - 1)"
            )
        pixels = to_uint8(images).float()
        x = (resize_bilinear_tf(pixels, (INPUT_SIZE, INPUT_SIZE)) - 128) / 128
        for stem in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                     self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2):
            x = stem(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        branches = self.Mixed_6d._forward(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = torch.cat(branches, 1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = self.avgpool(x).flatten(1)
        logits = pool @ self.fc.weight.T
        return {"pool": pool, "spatial": spatial, "logits": logits}


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> InceptionV3Features:
    """The FID Inception network in eval mode, without gradients.

    ``weights``: a path to the weight file; None to look it up (``CTOK_INCEPTION_WEIGHTS``, then
    torch's hub cache, then a download unless offline); or ``"random"`` for a randomly initialised
    network (seed 0) that exercises the pipeline but whose numbers mean nothing.
    """
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = InceptionV3Features()
            # PyTorch's default init shrinks the activations by orders of magnitude over 90 layers;
            # He init keeps them O(1), so random features still tell images apart.
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        model.identity = RANDOM_IDENTITY
    else:
        path = resolve_weight_file(INCEPTION_WEIGHTS, weights)
        state, sha = load_state_dict(INCEPTION_WEIGHTS, Path(path))
        model = InceptionV3Features()
        expected = model.state_dict()
        # The converted file has no BatchNorm step counters; nothing else may differ.
        missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in expected]
        reshaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
        if missing or unexpected or reshaped:
            raise ValueError(
                f"{path} is not an Inception-V3 FID weight file: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}, wrong shape {reshaped[:3]} "
                f"({len(missing)}, {len(unexpected)}, {len(reshaped)} in all)"
            )
        model.load_state_dict(state, strict=False)
        model.identity = f"inception-2015-12-05:sha256:{sha}"
    return model.eval().requires_grad_(False).to(device)
