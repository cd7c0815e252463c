"""Evaluation arithmetic: metric networks and distances run in true float32, whatever training set.

PyTorch lets convolutions use TF32 on Ampere and later GPUs by default (cuDNN's
``conv.fp32_precision`` is ``"tf32"``), and ctok's trainer switches matmuls to TF32 too. TF32 keeps 10
mantissa bits, enough to move Inception features and hence FID in the third significant digit,
and ADM's evaluator never used it. :func:`ieee_float32` switches every float32 convolution and
matmul backend to full precision for the duration of a block and restores the previous settings
afterwards; it uses only PyTorch's per-backend ``fp32_precision`` flags, since mixing them with the
legacy ``allow_tf32`` flags is an error in current PyTorch.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# (backend, operation) pairs whose float32 precision evaluation pins.
_OPERATIONS = (("cuda", "matmul"), ("cudnn", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv"))


def _flags(backend: str, operation: str):
    return getattr(getattr(torch.backends, backend), operation)


def float32_modes() -> dict[str, str]:
    """The current float32 precision of each pinned backend operation, e.g. ``{"cudnn.conv": "tf32", ...}``."""
    return {f"{b}.{op}": _flags(b, op).fp32_precision for b, op in _OPERATIONS}


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Run the block with TF32 (and any reduced float32 mode) off for convolutions and matmuls."""
    saved = [(b, op, _flags(b, op).fp32_precision) for b, op in _OPERATIONS]
    for b, op, _ in saved:
        _flags(b, op).fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, op, value in saved:
            _flags(b, op).fp32_precision = value
