"""Training checkpoints: written atomically, rotated, found again after a crash, loaded safely.

A checkpoint is one ``step-XXXXXXXX.pt`` file in ``<run_dir>/checkpoints``. It is written to a
temporary file in the same folder, flushed to disk, and renamed over its final name, so a process
killed at any moment leaves either the previous set of checkpoints or the new one, never a partial
file under a checkpoint name. Loading uses ``torch.load(weights_only=True)``: a checkpoint holds
only tensors and plain data, so a tampered file cannot run code.

Loading also maps the file instead of reading it (``mmap=True``, which needs torch.save's zip
format, its default): every rank of a node resumes from the same file, and read into memory each
would hold a private copy of it (8 x 10.8 GB for SiT-XL on an 8-GPU node). Mapped, the pages sit
once in the page cache and are only touched when copied onto the device. The mapping is private
(copy on write): a CPU run whose AdamW keeps the loaded tensors as its state updates copies of
the pages, never the file.

Which checkpoint a run continues from (``run.resume``) and whether it may (the config must not
have changed beyond the keys free on resume) is decided here too.
"""
from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ctok.atomic_files import atomic_write
from ctok.settings_check import changed_keys, describe_changes

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``folder``, oldest first; temporary files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = ((_NAME.match(p.name), p) for p in folder.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete temporary files that a killed writer left behind (they never carry a checkpoint name)."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(".step-*.tmp"):
            leftover.unlink(missing_ok=True)


def save_checkpoint(state: dict, folder: str | Path, step: int, keep_last: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``, then delete all but the newest ``keep_last``."""
    path = checkpoint_path(folder, step)
    with atomic_write(path) as f:
        torch.save(state, f)
    if keep_last > 0:
        for _, old in list_checkpoints(folder)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch's own message would blame the format, not the file
        raise ValueError(f"{path} is not a training checkpoint (torch.save's zip format): truncated, or another file")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def find_resume_checkpoint(resume: bool | str, folder: str | Path) -> Path | None:
    """The checkpoint ``run.resume`` names: the newest in ``folder`` (true), a given file (a path), or none.

    ``false`` with checkpoints already in ``folder`` is refused rather than overwriting a run.
    """
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"run.resume names checkpoint {path}, which does not exist")
        return path
    existing = list_checkpoints(folder)
    if resume:
        return existing[-1][1] if existing else None
    if existing:
        raise ValueError(f"run.resume is false but {folder} already holds checkpoints; "
                         "resume (run.resume=true) or choose another run.out_dir")
    return None


def check_resumable(state: dict, path: Path, modules: Iterable[str], config: dict, free: set[str]) -> None:
    """Refuse to continue from checkpoint ``state`` (read from ``path``) into a run that differs from it.

    The checkpoint must hold every module of ``modules``, and the resolved ``config`` may differ from
    the checkpoint's only at the dotted keys in ``free``.
    """
    missing = sorted(set(modules) - set(state["modules"]))
    if missing:
        raise ValueError(f"checkpoint {path} has no state for modules {missing}")
    ours, theirs = _flatten(config), _flatten(state["config"])
    changed = changed_keys(theirs, ours, ignore=free)
    if changed:
        detail = describe_changes(theirs, ours, changed)
        raise ValueError(f"cannot resume from {path}: the config changed ({detail}); "
                         f"only {sorted(free)} may change on resume")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def capture_rng_state() -> dict:
    """This process's random generators: Python, NumPy, torch CPU and every CUDA device."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "state": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": np_state["state"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

