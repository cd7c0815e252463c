"""What a run reports: a console line and a JSONL record per log step, TensorBoard and W&B on request.

``<run_dir>/log.jsonl`` holds one JSON object per log step (step, losses, lr, grad norm,
samples/s, ...). It is the record to plot from. After a resume, the lines the killed run wrote past
its last checkpoint are dropped, since the resumed run computes those steps again.
TensorBoard and Weights & Biases are optional packages: they are imported only when the config asks
for them, and asking for one that is not installed stops the run before it starts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from ctok.atomic_files import atomic_write


def read_log(path: str | Path) -> list[dict]:
    """The records of a run's ``log.jsonl``, in order (a missing file has none)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    def __init__(self, run_dir: str | Path, *, enabled: bool, resume_step: int | None = None,
                 tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("run.tensorboard is true but tensorboard is not installed: "
                                 "pip install tensorboard") from err
            self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ValueError(f"run.wandb is {wandb_project!r} but wandb is not installed: "
                                 "pip install wandb") from err
            self._wandb = wandb.init(project=wandb_project, name=Path(run_dir).name, dir=str(run_dir),
                                     config=config, resume="allow", id=Path(run_dir).resolve().name)

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
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def add_image_file(self, step: int, tag: str, path: Path) -> None:
        """Announce a picture the run wrote (W&B also uploads it)."""
        if not self.enabled:
            return
        tqdm.write(f"step {step} | {tag}: {path}")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _short(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e6):
        return str(int(value))
    if not math.isfinite(value) or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4f}"
    return f"{value:.3e}"
