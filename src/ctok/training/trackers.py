"""Experiment trackers: TensorBoard and Weights & Biases see what ``log.jsonl`` records.

``run.report_to: [tensorboard, wandb]`` (default: none) names the trackers of a run. Each one gets
every scalar record at the step ``log.jsonl`` gives it (the latent dashboard's ``eval/...`` scores
included), the sample grids as images, and the resolved config as hyper-parameters. Only the main
process of a distributed run opens them.

- TensorBoard: event files in ``<run_dir>/tensorboard``. Every run writes with
  ``purge_step = start step + 1``, so TensorBoard hides what a killed run logged past the checkpoint
  it resumed from, the same records ``log.jsonl`` drops.
- W&B: the run folder's ``wandb/`` holds W&B's files, and ``wandb/ctok-run-id`` the id of the W&B run,
  which a resumed run continues (``run.wandb_project``, ``run.wandb_entity``). W&B cannot take back a
  logged step: the values a killed run logged past its checkpoint stay. ``run.wandb_mode: auto``
  follows ``WANDB_MODE`` when it is set, else logs online when an API key is configured (``wandb
  login`` or ``WANDB_API_KEY``) and offline otherwise, saying so: ``wandb sync`` uploads it later.

Both packages are optional (``pip install 'ctok[track]'``); a config that asks for a missing one is
refused when it is read, before anything runs.
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Protocol, Sequence

from tqdm import tqdm

from ctok.atomic_files import atomic_write

INSTALL = "pip install 'ctok[track]'"


class Tracker(Protocol):
    def scalars(self, step: int, metrics: dict[str, float]) -> None: ...

    def image(self, step: int, tag: str, path: Path) -> None: ...

    def close(self) -> None: ...


def check_trackers(report_to: Sequence[str]) -> None:
    """Refuse a tracker named twice, or one whose package is not installed (naming the pip command)."""
    if len(set(report_to)) != len(report_to):
        raise ValueError(f"run.report_to names a tracker twice: {list(report_to)}")
    for name in report_to:
        if importlib.util.find_spec(name) is None:  # the packages are called like the trackers
            raise ValueError(f"run.report_to has {name} but the {name} package is not installed: {INSTALL}")


def open_trackers(report_to: Sequence[str], run_dir: Path, *, start_step: int, config: dict | None,
                  wandb_project: str, wandb_entity: str | None, wandb_mode: str) -> list[Tracker]:
    """The trackers of ``report_to`` for a run that starts (or resumes) at ``start_step``."""
    opened: list[Tracker] = []
    try:
        for name in report_to:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(run_dir / "tensorboard", start_step, config))
            else:
                opened.append(WandbTracker(run_dir, start_step, config, project=wandb_project,
                                           entity=wandb_entity, mode=wandb_mode))
    except BaseException:
        for tracker in opened:  # the run does not start: leave no writer open behind it
            tracker.close()
        raise
    return opened


class TensorBoardTracker:
    def __init__(self, folder: Path, start_step: int, config: dict | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        _wait_until_newer_than_the_event_files_in(folder)
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1)
        if config is not None:
            for summary in hparams(_hparam_values(config), {}):
                self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        # Written now, as log.jsonl is: a run killed later loses none of the steps it resumes after.
        self.writer.flush()

    def image(self, step: int, tag: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wait_until_newer_than_the_event_files_in(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and the name starts with the second the
    file was opened in, then the host and the process id. A run resumed within the same second as the run
    it continues (a restart loop after a quick crash) could sort first: TensorBoard would then take the
    older file's steps for a rewind and drop the resumed run's. Waiting for the next second (at most one,
    bounded in case another host's clock runs ahead) keeps the files in the order they were written."""
    seconds = [int(name.split(".")[3]) for name in (p.name for p in folder.glob("events.out.tfevents.*"))
               if name.split(".")[3].isdigit()]
    if not seconds:
        return
    deadline = time.monotonic() + 2
    while int(time.time()) <= max(seconds) and time.monotonic() < deadline:
        time.sleep(0.01)


def _hparam_values(config: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """The resolved config flattened to dotted keys, as TensorBoard's hyper-parameters take them:
    numbers, text and booleans (lists become their text, None is left out)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_hparam_values(value, f"{prefix}{key}."))
        elif value is not None:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class WandbTracker:
    def __init__(self, run_dir: Path, start_step: int, config: dict | None, *, project: str,
                 entity: str | None, mode: str):
        import wandb

        id_file = run_dir / "wandb" / "ctok-run-id"
        resumed_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else None
        self.run = wandb.init(project=project, entity=entity, mode=_wandb_mode(mode, run_dir), dir=str(run_dir),
                              name=run_dir.resolve().name, id=resumed_id, resume="allow" if resumed_id else None,
                              config=config)
        with atomic_write(id_file, "w") as f:  # a run killed meanwhile leaves the previous id whole
            f.write(self.run.id + "\n")

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def image(self, step: int, tag: str, path: Path) -> None:
        import wandb

        self.run.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_mode(setting: str, run_dir: Path) -> str | None:
    """The mode for ``wandb.init`` (None: W&B reads ``WANDB_MODE``) of ``run.wandb_mode``."""
    import wandb

    if setting == "auto" and os.environ.get("WANDB_MODE"):
        return None
    if setting == "offline":
        return setting
    if wandb.login(prompt=False, verify=False):  # an API key is configured: never prompts
        return "online"
    if setting == "online":
        raise ValueError("run.wandb_mode is online but no W&B API key is configured: run `wandb login` "
                         "(or set WANDB_API_KEY), or set run.wandb_mode=offline")
    tqdm.write(f"W&B: no API key is configured, logging offline under {run_dir / 'wandb'} "
               "(upload it with `wandb sync`, or run `wandb login` first)")
    return "offline"
