"""Checks on user-supplied tensors that fail early with a message naming what was expected.

A shape mismatch deep inside a matmul produces a traceback that names neither the argument
nor the expected value; every public entry point calls these first instead.
"""
from __future__ import annotations

import torch


def check_tensor(name: str, x: torch.Tensor, shape: tuple, *, finite: bool = True) -> None:
    """Raise ValueError unless ``x`` is a tensor whose shape matches ``shape``.

    ``shape`` holds ints for fixed sizes and None for free ones (the batch, usually).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    expected = "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"
    if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_batch(name: str, x: torch.Tensor, batch: int) -> None:
    if x.shape[0] != batch:
        raise ValueError(f"{name} has batch size {x.shape[0]}, expected {batch} (the batch of x)")


def check_labels(name: str, y: torch.Tensor, batch: int, num_labels: int) -> None:
    """Class ids must be integers in [0, num_labels)."""
    check_tensor(name, y, (batch,))
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_labels):
        raise ValueError(
            f"{name} must lie in [0, {num_labels - 1}], got values in [{int(y.min())}, {int(y.max())}]"
        )
