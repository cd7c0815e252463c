"""The config sections every trainer shares: ``run:``, ``optim:`` and ``ema:``, and the keys that may change on resume.

Each trainer's config (:mod:`ctok.training.tokenizer_config`, :mod:`ctok.training.generator`) is
built from these and its own sections; :class:`ctok.training.runner.Runner` reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ctok.training.dist_timeout import DEFAULT_DIST_TIMEOUT_MIN
from ctok.training.trackers import check_trackers


@dataclass
class RunSection:
    """``run:`` where the run lives and how it is driven."""

    out_dir: str | None  # None only where the recipe derives it (generators: from the tokenizer's name)
    max_steps: int
    seed: int = 0
    grad_accum: int = 1
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 3
    save_weights: bool = True  # false: no training checkpoints and no final weights (throughput measurements)
    sample_every: int = 0  # 0: only at the end
    # true: continue from the run folder's newest checkpoint if there is one; false: start fresh
    # (refused if the folder has checkpoints); or a path to the checkpoint to continue from.
    resume: bool | str = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype on CUDA; the CPU always runs fp32
    tf32: bool = True
    compile: bool = False
    # true: recompute the transformer blocks in the backward pass (ctok.models.checkpointing): less
    # memory for about one more forward pass of time; a model without blocks is refused
    activation_checkpointing: bool = False
    dist_timeout_min: int = DEFAULT_DIST_TIMEOUT_MIN  # under torchrun: how long a collective waits for all ranks
    # Experiment trackers besides log.jsonl (ctok.training.trackers): tensorboard, wandb.
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    wandb_project: str = "ctok"
    wandb_entity: str | None = None  # None: W&B's default (WANDB_ENTITY, or your own account)
    # auto: WANDB_MODE if set, else online with an API key configured and offline without one
    wandb_mode: Literal["auto", "online", "offline"] = "auto"

    replaced_keys: ClassVar[dict[str, str]] = {  # the keys run.report_to replaced, and how to say it now
        "tensorboard": "run.report_to: [tensorboard] (override: run.report_to=[tensorboard])",
        "wandb": "run.report_to: [wandb] with run.wandb_project: NAME",
    }

    def __post_init__(self):
        check_trackers(self.report_to)  # a missing package is named when the config is read


@dataclass
class OptimSection:
    """``optim:`` AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    scale_lr: bool = False  # multiply lr by global_batch / 256
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0


@dataclass
class EMASection:
    """``ema:`` the exponential moving average of the trained weights (kept in fp32)."""

    decay: float = 0.9999


# Resolved-config keys that may change when a run is resumed: they change where a run lives, how it
# is watched or how long it goes on, not what a step computes. Trainers add their own.
FREE_ON_RESUME = frozenset({"run.out_dir", "run.max_steps", "run.log_every", "run.ckpt_every", "run.keep_last",
                            "run.save_weights", "run.sample_every", "run.resume", "run.device", "run.compile",
                            "run.activation_checkpointing", "run.dist_timeout_min", "run.report_to",
                            "run.wandb_project", "run.wandb_entity", "run.wandb_mode",
                            # the keys run.report_to replaced: checkpoints written before still hold them
                            "run.tensorboard", "run.wandb"})
