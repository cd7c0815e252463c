"""What a run reports: a console line and a JSONL record per log step, and the trackers of ``run.report_to``.

``<run_dir>/log.jsonl`` holds one JSON object per log step (step, losses, lr, grad norm,
samples/s, ...). It is the record to plot from. A run that starts at step N (0, or the step of the
checkpoint it resumes from) drops the lines past N, which a killed run wrote and this one computes
again. TensorBoard and Weights & Biases (:mod:`ctok.training.trackers`) receive the same records at
the same steps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ctok.atomic_files import atomic_write
from ctok.training.trackers import Tracker, open_trackers


def read_log(path: str | Path) -> list[dict]:
    """The records of a run's ``log.jsonl``, in order (a missing file has none)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    def __init__(self, run_dir: str | Path, *, enabled: bool, start_step: int = 0, report_to: Sequence[str] = (),
                 config: dict | None = None, wandb_project: str = "ctok", wandb_entity: str | None = None,
                 wandb_mode: str = "auto"):
        """``enabled``: whether this process reports (the main one); the others write and open nothing."""
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        if self.path.exists():
            self._truncate_after(start_step)
        self.trackers = open_trackers(report_to, Path(run_dir), start_step=start_step, config=config,
                                      wandb_project=wandb_project, wandb_entity=wandb_entity, wandb_mode=wandb_mode)

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a process killed while writing it
                continue
            if record["step"] <= step:
                kept.append(line)
        with atomic_write(self.path, "w") as f:
            f.writelines(line + "\n" for line in kept)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(" | ".join([f"step {step}"] + [f"{k} {_short(v)}" for k, v in metrics.items()]))
        for tracker in self.trackers:
            tracker.scalars(step, metrics)

    def add_image_file(self, step: int, tag: str, path: Path) -> None:
        """Announce a picture the run wrote, and hand it to the trackers."""
        if not self.enabled:
            return
        tqdm.write(f"step {step} | {tag}: {path}")
        for tracker in self.trackers:
            tracker.image(step, tag, path)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _short(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e6):
        return str(int(value))
    if not math.isfinite(value) or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4f}"
    return f"{value:.3e}"
