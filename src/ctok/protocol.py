"""The protocol card: what a number was computed under, carried by every result JSON ctok writes.

"I can't reproduce the number" is, in this field, nearly always an unstated protocol detail: a
different feature network or weight file, fewer samples, another label scheme, sampler, step count,
guidance, quantisation, precision mode or numeric mode. ``ctok evaluate``, ``ctok reconstruct``,
``ctok generate`` and the demo therefore write a ``protocol`` object beside their numbers. Its
fields are those of :class:`ProtocolCard`; a field that does not apply to a result (the sampler of
a reconstruction) is null. The environment (device, dtype, TF32 state, torch and ctok versions) is
filled in by :meth:`ProtocolCard.here`.

How to report a ctok number: "FID 1.67 (ADM protocol, PyTorch port; ctok 0.1.0)", keeping the
JSON's protocol card with it.
"""
from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field

import torch

# What the numbers of ``ctok evaluate`` follow: guided-diffusion's evaluations/evaluator.py.
ADM_PROTOCOL = "ADM evaluator protocol, PyTorch port (ctok)"
# ImageNet FIDs in the literature are of 50,000 samples; fewer give a biased (higher) FID.
PUBLISHED_SAMPLE_COUNT = 50_000
# How samples are labelled: ``ctok generate`` cycles through the classes in order.
CLASS_BALANCED = "class-balanced (image i has class i mod num_classes)"


@dataclass
class ProtocolCard:
    """One result's protocol: every field a reader needs to compare the number with another."""

    protocol: str = ADM_PROTOCOL
    feature_network: str | None = None  # identity, with the weight file's sha256 for Inception
    num_samples: int | None = None
    num_reference: int | None = None
    label_scheme: str | None = None
    sampler: dict | None = None  # model kind, solver, steps, NFE per sample, guidance scale and interval, path
    quantisation: str | None = None  # how float images became uint8 (see ctok.uint8)
    precision_recall: str | None = None  # "adm-fp16" or "float32"
    lpips: str | None = None  # "alex" or "vgg"
    ssim: str | None = None  # "standard" or "llamagen"
    seed: int | None = None
    device: str = ""
    dtype: str = "float32"
    float32_modes: dict = field(default_factory=dict)  # TF32 state of the backends when the card was made
    torch_version: str = torch.__version__
    ctok_version: str = ""

    @classmethod
    def here(cls, device: str | torch.device = "cpu", **fields) -> "ProtocolCard":
        """A card for a result computed now on ``device``, with ``fields`` set and the environment filled in."""
        from ctok import __version__
        from ctok.numerics import float32_modes

        return cls(device=device_name(device), float32_modes=float32_modes(), ctok_version=__version__, **fields)

    def to_dict(self) -> dict:
        """The JSON form: every field, null where it does not apply."""
        return dataclasses.asdict(self)


def device_name(device: str | torch.device) -> str:
    """A readable name of the device: the GPU's model for CUDA, the processor for the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.processor() or platform.machine()})"


def few_samples_warning(num_samples: int, reference: str) -> str | None:
    """A one-line warning when fewer than 50,000 samples are scored against an ImageNet reference
    (recognised by its name, e.g. ``VIRTUAL_imagenet256_labeled.npz``), else None."""
    if num_samples >= PUBLISHED_SAMPLE_COUNT or "imagenet" not in str(reference).lower():
        return None
    return (f"warning: {num_samples} samples scored against an ImageNet reference; published FIDs use "
            f"{PUBLISHED_SAMPLE_COUNT:,} and fewer samples give a higher FID, so do not compare the two")
