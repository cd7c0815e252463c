"""Weight files that ctok downloads: the offline switch and torch's hub cache, shared by every locator.

``HF_HUB_OFFLINE=1`` (read as huggingface_hub reads it) is the one switch that stops ctok from
downloading anything: weights for metrics and teachers, and datasets. Files that torch.hub,
torchvision and torch-fidelity download live in ``$TORCH_HOME/hub/checkpoints``, so a file any of
them fetched once is found here too. What ctok computes and keeps for later (the evaluator's
reference features) lives in its own cache folder, :func:`ctok_cache_dir`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def torch_cache_path(filename: str) -> Path:
    """Where torch.hub (and torch-fidelity, torchvision) keep a downloaded weight file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def ctok_cache_dir() -> Path:
    """Where ctok keeps what it computed and may reuse: ``$CTOK_CACHE``, else ``$XDG_CACHE_HOME/ctok``
    (``~/.cache/ctok`` by default)."""
    if os.environ.get("CTOK_CACHE"):
        return Path(os.environ["CTOK_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ctok"


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads: ctok's one offline switch, read as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def torch_cache_file(filename: str, url: str, sha256: str | None = None, *, progress: bool = True) -> Path:
    """``$TORCH_HOME/hub/checkpoints/<filename>``, downloaded from ``url`` first when it is missing.

    Raises FileNotFoundError whose message says why there is no file (offline, or the download's
    error), for the caller to append to its own advice. ``sha256``: a prefix the download must match.
    """
    cached = torch_cache_path(filename)
    if cached.is_file():
        return cached
    if offline():
        raise FileNotFoundError("not downloading: HF_HUB_OFFLINE is set")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        # download_url_to_file writes to a temporary file and moves it into place, and refuses a
        # file whose hash does not start with the prefix.
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=sha256, progress=progress)
    except Exception as err:  # no network, proxy, HTTP error: all need the same advice
        raise FileNotFoundError(f"download failed: {type(err).__name__}: {err}") from None
    return cached
