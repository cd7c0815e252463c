"""Where a metric network's published weight file comes from: a path, an environment variable, torch's cache.

The file is looked up in this order, the first hit wins:

1. an explicit path given by the caller (a command-line option);
2. an environment variable naming the file (``CTOK_INCEPTION_WEIGHTS`` for Inception);
3. torch's hub cache, ``$TORCH_HOME/hub/checkpoints/<file name>`` (``~/.cache/torch/...``), where
   torch-fidelity puts the same file, so a machine that ever ran it has it;
4. a download into that cache, unless the process is offline (``HF_HUB_OFFLINE=1``, the switch the
   rest of ctok honours).

When none of these works, the error names the file, its URL and the places it may be put.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ctok.atomic_files import file_sha256
from ctok.downloads import torch_cache_file, torch_cache_path


@dataclass(frozen=True)
class WeightFile:
    """A published weight file: its name in torch's cache, its URL and its SHA-256 (or a prefix of it)."""

    what: str
    filename: str
    url: str
    sha256: str
    env_var: str


def resolve_weight_file(spec: WeightFile, explicit: str | os.PathLike | None = None) -> Path:
    """The local path of ``spec``'s file (see the module docstring for the search order)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{spec.what} weights: no file at {path}")
        return path
    from_env = os.environ.get(spec.env_var)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{spec.what} weights: {spec.env_var}={from_env} names no file")
        return path
    try:
        return torch_cache_file(spec.filename, spec.url, spec.sha256)
    except FileNotFoundError as reason:
        raise FileNotFoundError(
            f"{spec.what} weights ({spec.filename}) are not on this machine. Download {spec.url} "
            f"and put it at {torch_cache_path(spec.filename)}, or anywhere and point {spec.env_var} "
            f"(or the command's weights option) at it ({reason})"
        ) from None


def load_state_dict(spec: WeightFile, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256) of a weight file, unpickled without running code (``weights_only``).

    A file whose checksum differs from the published one still loads (a user may convert the
    weights themselves), with a warning, since its numbers will not match published ones.
    """
    sha = file_sha256(path)
    if not sha.startswith(spec.sha256):
        warnings.warn(
            f"{path} is not the published {spec.filename} (sha256 {sha[:16]}..., expected "
            f"{spec.sha256[:16]}...); metrics computed with it are not comparable to published numbers",
            stacklevel=3,
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a loadable PyTorch state dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state, sha
