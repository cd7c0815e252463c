"""Checks on user-supplied tensors that fail early with a message naming what was expected.

A shape mismatch deep inside a matmul produces a traceback that names neither the argument
nor the expected value; every public entry point calls these first instead.
"""
from __future__ import annotations

import math
import warnings

import torch

# How far images may stray outside [-1, 1] before encode refuses them. A bicubic or Lanczos resize
# overshoots at sharp edges, and a decoder's unclamped output fed back in does too, by a tenth or
# two; the usual mistakes are far outside: [0, 255] pixels, or ImageNet-normalised images (about
# [-2.1, 2.6]).
IMAGE_RANGE_TOLERANCE = 0.25


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
    """Raise ValueError unless ``x`` holds ``batch`` rows (the batch of the main input)."""
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


def check_model_input(name: str, x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``x``, a floating tensor on the model's ``device``, cast to the model's ``dtype``.

    Any floating precision is accepted (float64 images from NumPy, say) and cast, since the model
    can only compute in its own; integer and bool tensors are refused, as their values would be
    read as something else (uint8 pixels as values far outside [-1, 1]).
    """
    if not x.is_floating_point():
        hint = ": convert uint8 pixels with x.float() / 127.5 - 1" if x.dtype == torch.uint8 else ""
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}{hint}")
    if x.device != device:
        raise ValueError(f"{name} are on {x.device} but the model is on {device}; move them with .to({str(device)!r})")
    return x.to(dtype)


def check_image_range(name: str, x: torch.Tensor) -> None:
    """Raise ValueError unless the images' values lie in [-1, 1] (give or take IMAGE_RANGE_TOLERANCE)
    and are finite; warn when the whole batch lies in [0, 1].

    A [0, 1] batch is only warned about: it is what ``torchvision``'s ``ToTensor`` gives, but a batch
    of bright [-1, 1] images can lie there too, so refusing it would reject valid input.
    """
    if not x.numel():
        return
    low, high = torch.stack(torch.aminmax(x.detach())).tolist()  # one device sync for both
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if low < -1 - IMAGE_RANGE_TOLERANCE or high > 1 + IMAGE_RANGE_TOLERANCE:
        hint = ("; [0, 255] pixels convert with x / 127.5 - 1" if low >= 0 and high > 2
                else "; ImageNet-normalised images? undo the mean/std normalisation first" if low < -1 else "")
        raise ValueError(f"{name} must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}]{hint}")
    if low >= 0 and high <= 1:
        warnings.warn(f"{name} all lie in [0, 1] (values in [{low:.3g}, {high:.3g}]) but are expected in [-1, 1]: "
                      "if they are [0, 1] images, pass x * 2 - 1 (as they are, they reconstruct washed out); "
                      "if they are bright [-1, 1] images, ignore this warning", stacklevel=3)


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, with ``"auto"``: the GPU when there is one, else the CPU.

    Raises ValueError for a string torch does not read as a device, and for a CUDA device on a
    machine without one (rather than failing later, inside the first ``.to``).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device ('auto', 'cpu', 'cuda', 'cuda:1' ...), "
                        f"got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:1' ..., got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asks for a GPU, but torch sees no CUDA device here; use 'cpu' or 'auto'")
    return parsed
