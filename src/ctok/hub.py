"""Checkpoint folders in the released format: ``config.json`` + ``model.safetensors``.

``src`` is a local folder or a Hugging Face hub id (``MAETok/maetok-b-128``). Hub downloads go
through huggingface_hub's cache; offline (``HF_HUB_OFFLINE=1``) or without network, a missing
checkpoint raises an error that says what to download and where to put it. Weights load from
safetensors, or from ``pytorch_model.bin`` with ``weights_only=True`` (no code execution).

Loading is strict about the function and lenient about the rest: unknown config keys are kept,
training-only weights (a REPA teacher, its projection MLP, auxiliary decoders) are ignored, and
every missing, unexpected or mis-shaped weight is reported at once in one error.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from ctok.atomic_files import atomic_write
from ctok.models.diffusion_transformer import DiT, SiT
from ctok.models.tokenizer import Tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"

# Checkpoint entries that only training used; inference must neither need nor build them.
TRAINING_ONLY_PREFIXES = ("repa_model.", "projection.", "aux_")


@dataclass
class LoadReport:
    """What loading found besides the weights it used (shown by ``ctok inspect``)."""

    source: str
    folder: Path
    ignored: list[str] = field(default_factory=list)


def resolve(src: str | os.PathLike) -> Path:
    """A local checkpoint folder for ``src``: the folder itself, or the hub snapshot in the cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    src = str(src)
    if path.exists():
        raise ValueError(f"{src} is a file; pass the checkpoint folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint folder at {src} (and it is not a hub id like 'MAETok/maetok-b-128')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=[CONFIG_NAME, "*.safetensors", LEGACY_WEIGHTS_NAME]))
    except Exception as err:  # offline, no network, unknown repo: all need the same advice
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
        raise FileNotFoundError(
            f"checkpoint {src!r} is not available here ({type(err).__name__}). On a machine with internet run "
            f"`huggingface-cli download {src} --local-dir DIR` (or huggingface_hub.snapshot_download), copy DIR "
            f"here and pass its path instead of the hub id, or put the snapshot in the hub cache ({cache})."
        ) from None


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; found: {sorted(p.name for p in folder.iterdir())}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_NAME).is_file():
        return load_file(str(folder / WEIGHTS_NAME))
    if (folder / LEGACY_WEIGHTS_NAME).is_file():
        state = torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise FileNotFoundError(
        f"{folder} has no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}); found: {sorted(p.name for p in folder.iterdir())}"
    )


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load ``state`` into ``model`` exactly; returns the training-only keys that were ignored."""
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
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    return ignored


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load(src, build, device) -> tuple[nn.Module, LoadReport]:
    folder = resolve(src)
    config = read_config(folder)
    try:
        model = build(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG_NAME}: {err}") from None
    ignored = load_weights(model, read_weights(folder), str(src))
    return model.to(device).eval(), LoadReport(str(src), folder, ignored)


def load_tokenizer(src: str | os.PathLike, device: str | torch.device = "cpu") -> Tokenizer:
    """A released or ctok-trained SoftVQ-VAE / MAETok tokenizer, in eval mode."""
    return _load(src, Tokenizer.from_config, device)[0]


def load_sit(src: str | os.PathLike, device: str | torch.device = "cpu") -> SiT:
    return _load(src, SiT.from_config, device)[0]


def load_dit(src: str | os.PathLike, device: str | torch.device = "cpu") -> DiT:
    return _load(src, DiT.from_config, device)[0]


def model_kind(config: dict) -> str:
    """'tokenizer', 'sit' or 'dit', from a config dict alone."""
    if "encoder_model" in config or "tokenizer_kind" in config:
        return "tokenizer"
    if "learn_sigma" in config or "DiT" in config.get("tags", []):
        return "dit"
    if "hidden_size" in config:
        return "sit"
    raise ValueError("config.json is neither a tokenizer's (encoder_model) nor a SiT/DiT's (hidden_size)")


_BUILDERS = {"tokenizer": Tokenizer.from_config, "sit": SiT.from_config, "dit": DiT.from_config}


def load_any(src: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, LoadReport]:
    """Whatever model the folder holds, with the load report."""
    folder = resolve(src)
    return _load(folder, _BUILDERS[model_kind(read_config(folder))], device)


def save_pretrained(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors``; each file appears whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(folder / WEIGHTS_NAME) as f:
        f.write(save(state))
    with atomic_write(folder / CONFIG_NAME, "w") as f:
        f.write(json.dumps(model.to_config(), indent=2, sort_keys=True) + "\n")
    return folder
