"""Float32 arithmetic modes: evaluation in true float32, generation with TF32 on CUDA, and the state for the record.

PyTorch lets convolutions use TF32 on Ampere and later GPUs by default (cuDNN's
``conv.fp32_precision`` is ``"tf32"``), and ctok's trainer switches matmuls to TF32 too. TF32 keeps 10
mantissa bits, enough to move Inception features and hence FID in the third significant digit,
and ADM's evaluator never used it. :func:`ieee_float32` switches every float32 convolution and
matmul backend to full precision for the duration of a block and restores the previous settings
afterwards; it uses only PyTorch's per-backend ``fp32_precision`` flags, since mixing them with the
legacy ``allow_tf32`` flags is an error in current PyTorch. :func:`tf32_on_cuda` is the opposite
switch, for generation: the released samplers ran with TF32 matmuls and convolutions on CUDA.
:func:`without_autocast` marks a float32 island inside a bf16 autocast region: a block that must
compute in the tensors' own precision (decoding to pixels, SoftVQ's sharp softmax).
:func:`effective_precision` and :func:`autocast_dtype` hold the one rule of a ``precision`` setting
(``run.precision``, ``cache-latents --precision``): bfloat16 autocast on CUDA when ``bf16`` is asked
for, float32 everywhere else: the CPU is where ctok's tests and demo run, and they compare numbers
in float32.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRECISIONS = ("bf16", "fp32")

# (backend, operation) pairs whose float32 precision evaluation pins.
_OPERATIONS = (("cuda", "matmul"), ("cudnn", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv"))


def _flags(backend: str, operation: str):
    return getattr(getattr(torch.backends, backend), operation)


def float32_modes() -> dict[str, str]:
    """The current float32 precision of each pinned backend operation, e.g. ``{"cudnn.conv": "tf32", ...}``."""
    return {f"{b}.{op}": _flags(b, op).fp32_precision for b, op in _OPERATIONS}


@contextmanager
def _float32_precision(operations: tuple[tuple[str, str], ...], precision: str) -> Iterator[None]:
    saved = [(b, op, _flags(b, op).fp32_precision) for b, op in operations]
    for b, op, _ in saved:
        _flags(b, op).fp32_precision = precision
    try:
        yield
    finally:
        for b, op, value in saved:
            _flags(b, op).fp32_precision = value


def ieee_float32() -> contextlib.AbstractContextManager:
    """Run the block with TF32 (and any reduced float32 mode) off for convolutions and matmuls."""
    return _float32_precision(_OPERATIONS, "ieee")


def tf32_on_cuda(device: torch.device) -> contextlib.AbstractContextManager:
    """Allow TF32 for CUDA matmuls and cuDNN convolutions during the block when ``device`` is a GPU;
    restore the caller's settings afterwards. On the CPU it changes nothing."""
    cuda = tuple(pair for pair in _OPERATIONS if pair[0] in ("cuda", "cudnn"))
    return _float32_precision(cuda if torch.device(device).type == "cuda" else (), "tf32")


def without_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Run the block with autocast off for ``device``'s type, so that it computes in the dtypes of
    its tensors; a device type without autocast (``meta``) has nothing to switch off."""
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def effective_precision(precision: str, device: torch.device | str) -> str:
    """What ``precision`` amounts to on ``device``: ``bf16`` only on CUDA, else ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return "bf16" if precision == "bf16" and torch.device(device).type == "cuda" else "fp32"


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: bfloat16, or None for plain float32."""
    return torch.bfloat16 if effective_precision(precision, device) == "bf16" else None
