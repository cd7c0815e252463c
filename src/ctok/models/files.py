"""The files of a checkpoint folder in the released format: ``config.json`` + ``model.safetensors``.

ctok also writes a model card, ``README.md`` (:mod:`ctok.model_card`), beside them; loading reads
neither it nor any other file of the folder.

Weights load from safetensors, or from a legacy ``pytorch_model.bin`` with ``weights_only=True``
(no code execution). Loading is strict about the function and lenient about the rest:
training-only weights (a REPA teacher, its projection MLP, auxiliary decoders) are ignored, and
every missing, unexpected or mis-shaped weight is reported at once in one error. Writing is atomic
(:mod:`ctok.atomic_files`): each file appears whole or not at all.

This module imports no model and not :mod:`ctok.hub`; :class:`ctok.models.base.PretrainedModel`
builds its ``from_pretrained`` and ``save_pretrained`` on it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from ctok.atomic_files import atomic_write, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
CARD_NAME = "README.md"

# Checkpoint entries that only training used; inference must neither need nor build them.
TRAINING_ONLY_PREFIXES = ("repa_model.", "projection.", "aux_")


@dataclass
class LoadReport:
    """What loading found besides what it used (shown by ``ctok inspect``): the training-only
    weights it ignored and the config keys it kept without using them."""

    source: str
    folder: Path
    ignored: list[str] = field(default_factory=list)
    unused_config_keys: list[str] = field(default_factory=list)


def read_config(folder: Path) -> dict:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; found: {sorted(p.name for p in folder.iterdir())}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def weights_file(folder: Path) -> Path:
    """The weights file of a checkpoint folder: model.safetensors, else a legacy pytorch_model.bin."""
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder} has no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}); found: {sorted(p.name for p in folder.iterdir())}"
    )


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint folder, on the CPU (a .bin is read with ``weights_only=True``)."""
    path = weights_file(folder)
    try:
        if path.name == WEIGHTS_NAME:
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors' and torch's errors for a truncated, foreign or damaged file
        kind = "a safetensors file" if path.name == WEIGHTS_NAME else "a PyTorch state dict"
        raise ValueError(f"{path} ({path.stat().st_size:,} bytes) is not {kind} that can be read, probably "
                         f"truncated or of another format ({type(err).__name__}: {' '.join(str(err).split())}); "
                         "download or copy it again") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, *, assign: bool = False) -> list[str]:
    """Load ``state`` into ``model`` exactly; returns the training-only keys that were ignored.

    ``assign=True`` makes the checkpoint's tensors (cast to the model's dtypes) the model's own
    instead of copying them: what a model built on the meta device needs.
    """
    expected = model.state_dict()
    ignored = sorted(k for k in state if k not in expected and k.startswith(TRAINING_ONLY_PREFIXES))
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(ignored))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing:
        problems.append(f"missing {len(missing)}: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
    if shapes:
        problems.append("wrong shape: " + _listing(
            [f"{k} {tuple(state[k].shape)} (config expects {tuple(expected[k].shape)})" for k in shapes]))
    if problems:
        raise ValueError(f"weights of {source} do not fit its config.json: " + "; ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items() if k in expected}, strict=True,
                          assign=assign)
    return ignored


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def write_checkpoint(folder: str | Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``folder``; each file appears whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_write(folder / WEIGHTS_NAME) as f:
        f.write(save(tensors))
    write_json(folder / CONFIG_NAME, config, sort_keys=True)
    return folder
