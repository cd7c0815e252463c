"""Checkpoint folders in the released format: ``config.json`` + ``model.safetensors``.

``src`` is a local folder or a Hugging Face hub id (``MAETok/maetok-b-128``). Hub downloads go
through huggingface_hub's cache; offline (``HF_HUB_OFFLINE=1``) or without network, a missing
checkpoint raises an error that says what to download and where to put it. Weights load from
safetensors, or from ``pytorch_model.bin`` with ``weights_only=True`` (no code execution).

Loading is strict about the function and lenient about the rest: unknown config keys are kept,
training-only weights (a REPA teacher, its projection MLP, auxiliary decoders) are ignored, and
every missing, unexpected or mis-shaped weight is reported at once in one error. A checkpoint of
another kind (a SiT folder given to ``load_tokenizer``) is named as such before anything is built.

The model is built on the meta device and the checkpoint's tensors are assigned to it, so loading
pays neither for allocating nor for randomly initialising weights that are overwritten at once.
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
from ctok.models.diffusion_transformer import PRESET_NAMES as GENERATOR_PRESETS
from ctok.models.diffusion_transformer import RELEASED_EXAMPLES, DiT, SiT
from ctok.models.tokenizer import PRESET_NAMES as TOKENIZER_PRESETS
from ctok.models.tokenizer import RELEASED, Tokenizer
from ctok.validation import parse_device

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
    """A local checkpoint folder for ``src``: the folder itself, or the hub snapshot in the cache.

    ``src`` is read as a hub id only when it cannot be a local path: ``owner/name`` with one slash,
    not starting with ``.``, ``/`` or ``~``, and no local folder ``owner``. A preset name
    (``maetok-b-128``, ``SiT-XL/1``) is refused with what to call instead.
    """
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"src must be a checkpoint folder or hub id (str or path), got {type(src).__name__}")
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    src = str(src)
    if path.exists():
        raise ValueError(f"{src} is a file; pass the checkpoint folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    _refuse_preset_name(src)
    if _is_local_path(src):
        parent = path.parent
        where = (f": {parent} exists, so {src} is read as a local path, but it holds no {path.name}"
                 if str(parent) != "." and parent.is_dir() else "")
        raise FileNotFoundError(
            f"no checkpoint folder at {src}{where} (hub ids look like 'MAETok/maetok-b-128')")
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


def _is_local_path(src: str) -> bool:
    """Whether ``src`` must be a local path rather than a hub id (see :func:`resolve`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if (src.count("/") != 1 or src.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in src)
            or Path(src).parent.is_dir()):
        return True
    try:
        validate_repo_id(src)
    except HFValidationError:
        return True
    return False


def _refuse_preset_name(src: str) -> None:
    """Raise ValueError when ``src`` names a preset: a config with random weights, not a checkpoint."""
    if src in TOKENIZER_PRESETS:
        released = (f"the released weights are the hub id {RELEASED[src]}" if src in RELEASED
                    else f"no weights of this preset were released (those that were: {', '.join(RELEASED.values())})")
        raise ValueError(f"{src!r} is a preset name, not a checkpoint: ctok.build_tokenizer({src!r}) builds it "
                         f"with random weights; {released}")
    if src in GENERATOR_PRESETS:
        family = src.partition("-")[0]
        released = (f"released weights have hub ids like {RELEASED_EXAMPLES[src]} (one per tokenizer)"
                    if src in RELEASED_EXAMPLES else "no weights of this size were released")
        raise ValueError(f"{src!r} is a preset name, not a checkpoint: ctok.build_{family.lower()}({src!r}, "
                         f"input_size=..., in_channels=...) builds it with random weights; {released}")


def read_config(folder: Path) -> dict:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; found: {sorted(p.name for p in folder.iterdir())}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


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
    if path.name == WEIGHTS_NAME:
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


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


# The class of each kind model_kind tells apart, its name in messages, and how a user loads it.
_CLASSES = {"tokenizer": Tokenizer, "sit": SiT, "dit": DiT}
_NAMES = {"tokenizer": "tokenizer", "sit": "SiT", "dit": "DiT"}
_LOADERS = {"tokenizer": "ctok.load_tokenizer (or Tokenizer.from_pretrained)",
            "sit": "ctok.load_sit (or SiT.from_pretrained)", "dit": "ctok.load_dit (or DiT.from_pretrained)"}


def _load(src, model_class: type[nn.Module], device) -> tuple[nn.Module, LoadReport]:
    wanted = next((kind for kind, cls in _CLASSES.items()
                   if isinstance(model_class, type) and issubclass(model_class, cls)), None)
    if wanted is None:
        raise TypeError(f"model_class must be Tokenizer, SiT or DiT, got {model_class!r}")
    device = parse_device(device)
    folder = resolve(src)
    config = read_config(folder)
    try:
        found = model_kind(config)
    except ValueError:
        found = None  # not recognisable: building it says what is wrong
    if found not in (None, wanted):
        raise ValueError(f"{src} is a {_NAMES[found]} checkpoint, not a {_NAMES[wanted]}; "
                         f"load it with {_LOADERS[found]}")
    weights_file(folder)  # checked before building: a missing file should not cost a model's worth of time
    try:
        with torch.device("meta"):
            model = model_class.from_config(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG_NAME}: {err}") from None
    ignored = load_weights(model, read_weights(folder), str(src), assign=True)
    return model.to(device).eval(), LoadReport(str(src), folder, ignored)


def load_pretrained(model_class: type[nn.Module], src: str | os.PathLike,
                    device: str | torch.device = "cpu") -> nn.Module:
    """A checkpoint of ``model_class`` (Tokenizer, SiT or DiT), in eval mode on ``device``.

    ``src`` is a local folder or a hub id; ``device`` is ``"auto"`` (the GPU if there is one),
    ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... A checkpoint of another kind is refused, naming the
    loader to use. Every ``load_*`` function and ``from_pretrained`` method comes here.
    """
    return _load(src, model_class, device)[0]


def load_tokenizer(src: str | os.PathLike, device: str | torch.device = "cpu") -> Tokenizer:
    """A released or ctok-trained SoftVQ-VAE / MAETok tokenizer, in eval mode (see :func:`load_pretrained`)."""
    return load_pretrained(Tokenizer, src, device)


def load_sit(src: str | os.PathLike, device: str | torch.device = "cpu") -> SiT:
    """A released or ctok-trained SiT, in eval mode (see :func:`load_pretrained`)."""
    return load_pretrained(SiT, src, device)


def load_dit(src: str | os.PathLike, device: str | torch.device = "cpu") -> DiT:
    """A released or ctok-trained DiT, in eval mode (see :func:`load_pretrained`)."""
    return load_pretrained(DiT, src, device)


def model_kind(config: dict) -> str:
    """'tokenizer', 'sit' or 'dit', from a config dict alone."""
    if "encoder_model" in config or "tokenizer_kind" in config:
        return "tokenizer"
    if "learn_sigma" in config or "DiT" in config.get("tags", []):
        return "dit"
    if "hidden_size" in config:
        return "sit"
    raise ValueError("config.json is neither a tokenizer's (encoder_model) nor a SiT/DiT's (hidden_size)")


def load_any(src: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, LoadReport]:
    """Whatever model the folder holds, with the load report."""
    folder = resolve(src)
    return _load(folder, _CLASSES[model_kind(read_config(folder))], device)


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
