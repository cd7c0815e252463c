"""The training loop every ctok trainer shares: DDP, accumulation, clipping, EMA, checkpoints, logs.

A trainer registers its networks with a :class:`Runner` and hands it a *task*: an object with

* ``training_step(batch, step, rng) -> dict[str, Tensor]`` computing this process's micro-batch
  losses (scalar tensors). ``"loss"`` is minimised for the first registered trainable module, ``"loss/<name>"`` for
  the module registered as ``name``; a module whose loss is absent is not updated this step. Every
  entry is logged. Per-sample random numbers come from ``rng`` (a :class:`BatchRandom`), never
  from the global generators, so that the result does not depend on the number of processes.
* ``sample_images(step) -> Tensor | None`` images in [-1, 1], shape (B, 3, H, W), saved as a PNG
  grid every ``run.sample_every`` steps (called on rank 0 only).

The runner does everything else: device placement, DistributedDataParallel, bf16 autocast and TF32
on CUDA, torch.compile, gradient accumulation, the learning-rate schedule, gradient clipping,
AdamW, the fp32 EMA (timm's ModelEmaV3), checkpoints that resume exactly, the JSONL log and the
progress bar. Generator training (:mod:`ctok.training.generator`) is::

    ctx = init_distributed(cfg.run.device)
    runner = Runner(cfg.run, config_to_dict(cfg), ctx, global_batch=cfg.data.batch_size)
    sit = build_preset("SiT-XL/1", ...)            # after Runner(): it seeds the initialisation
    net = runner.add_module("model", sit, optim=cfg.optim, ema_decay=cfg.ema.decay)
    runner.fit(FlowMatchingTask(net, ...), latent_dataset, num_workers=cfg.data.num_workers)
    runner.ema_module("model").save_pretrained(out)

Tokenizer training plugs in the same way, with a second network and optimizer::

    tok = runner.add_module("model", tokenizer, optim=cfg.optim, ema_decay=cfg.ema.decay)
    disc = runner.add_module("discriminator", discriminator, optim=cfg.disc_optim)
    runner.fit(TokenizerTask(tok, disc, ...), image_dataset, num_workers=...)

and its ``training_step`` returns ``{"loss": generator_loss, "loss/discriminator": d_loss, ...}``
(leaving out ``loss/discriminator`` before the GAN starts). Each loss only reaches its own module's
parameters (``backward(inputs=...)``), so the generator loss flowing through the discriminator
leaves the discriminator's gradients alone. Modules that are not trained (LPIPS, a frozen teacher)
are not registered. Under DDP, a module whose forward was run through its DDP wrapper must receive
gradients in the same step: evaluate the discriminator for the generator loss through
``runner.module("discriminator")`` (the plain module) instead.

Run folder: ``config.yaml`` (the resolved config), ``checkpoints/step-XXXXXXXX.pt`` (the newest
``run.keep_last``), ``log.jsonl``, ``samples/step-XXXXXXXX.png``.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Protocol

import torch
import torch.nn as nn
from timm.utils.model_ema import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ctok.atomic_files import save_image_grid
from ctok.settings_check import changed_keys, describe_changes
from ctok.training.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from ctok.training.config import save_yaml
from ctok.training.distributed import DistContext, barrier, gather_objects, mean_over_processes
from ctok.training.run_log import RunLog
from ctok.training.schedule import lr_factor
from ctok.training.sharding import BatchRandom, BatchSplit, GlobalBatchSampler
from ctok.uint8 import to_uint8_round


@dataclass
class RunSection:
    """``run:`` where the run lives and how it is driven."""

    out_dir: str
    max_steps: int
    seed: int = 0
    grad_accum: int = 1
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 3
    sample_every: int = 0  # 0: only at the end
    # true: continue from the run folder's newest checkpoint if there is one; false: start fresh
    # (refused if the folder has checkpoints); or a path to the checkpoint to continue from.
    resume: bool | str = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype on CUDA; the CPU always runs fp32
    tf32: bool = True
    compile: bool = False
    tensorboard: bool = False
    wandb: str | None = None  # a W&B project name turns W&B logging on


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
                            "run.sample_every", "run.resume", "run.device", "run.compile", "run.tensorboard",
                            "run.wandb"})


class TrainingTask(Protocol):
    def training_step(self, batch: Any, step: int, rng: BatchRandom) -> dict[str, torch.Tensor]: ...

    def sample_images(self, step: int) -> torch.Tensor | None: ...


@dataclass
class _Member:
    module: nn.Module  # the plain module: state dicts, EMA, export
    ddp: DistributedDataParallel | None
    forward: nn.Module  # what the task calls: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer | None
    optim: OptimSection | None
    base_lr: float
    ema: ModelEmaV3 | None

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]


class Runner:
    """One training run: registered modules, the loop, its checkpoints and its logs."""

    def __init__(self, run: RunSection, config: dict, ctx: DistContext, *, global_batch: int,
                 free_on_resume: Iterable[str] = ()):
        """``config`` is the resolved config (saved in the run folder and every checkpoint); keys in
        ``free_on_resume`` (besides :data:`FREE_ON_RESUME`) may differ from the checkpoint's on resume.

        Seeds the global generators with ``run.seed``: build the networks after this, so that every
        process starts from the same weights.
        """
        for key in ("max_steps", "log_every", "ckpt_every", "grad_accum"):
            if getattr(run, key) < 1:
                raise ValueError(f"run.{key} must be at least 1, got {getattr(run, key)}")
        self.run = run
        self.config = config
        self.free_on_resume = FREE_ON_RESUME | set(free_on_resume)
        self.ctx = ctx
        self.split = BatchSplit(global_batch, run.grad_accum, ctx.world_size, ctx.rank)
        self.run_dir = Path(run.out_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.members: dict[str, _Member] = {}
        self._resume_from = self._find_resume_checkpoint()
        on_cuda = ctx.device.type == "cuda"
        if on_cuda and run.tf32:
            torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside bf16 autocast
        self.autocast_dtype = torch.bfloat16 if on_cuda and run.precision == "bf16" else None
        # Initialisation draws from the global generator: the same seed on every process gives every
        # process the same initial weights (DDP also broadcasts rank 0's, but the EMA copy is local).
        torch.manual_seed(run.seed)

    # -- registration ----------------------------------------------------------------------
    def add_module(self, name: str, module: nn.Module, *, optim: OptimSection | None = None,
                   ema_decay: float | None = None) -> nn.Module:
        """Put ``module`` on the device, wrap it for DDP/compile, and give it AdamW and an EMA.

        Returns what the task should call in its forward pass.
        """
        if name in self.members:
            raise ValueError(f"a module named {name!r} is already registered")
        module = module.to(self.ctx.device)
        trainable = [p for p in module.parameters() if p.requires_grad]
        if optim is not None and not trainable:
            raise ValueError(f"module {name!r} has an optimizer but no trainable parameters")
        ddp = None
        forward = module
        if self.ctx.is_distributed and trainable:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            ddp = forward = DistributedDataParallel(module, device_ids=ids)
        if self.run.compile:
            forward = torch.compile(forward)
        optimizer, base_lr = None, 0.0
        if optim is not None:
            base_lr = optim.lr * (self.split.global_batch / 256 if optim.scale_lr else 1.0)
            optimizer = torch.optim.AdamW(trainable, lr=base_lr, betas=optim.betas, eps=optim.eps,
                                          weight_decay=optim.weight_decay,
                                          fused=self.ctx.device.type == "cuda")
        ema = ModelEmaV3(module, decay=ema_decay, dtype=torch.float32, exclude_buffers=True) \
            if ema_decay is not None else None
        self.members[name] = _Member(module, ddp, forward, optimizer, optim, base_lr, ema)
        return forward

    def module(self, name: str) -> nn.Module:
        return self.members[name].module

    def ema_module(self, name: str) -> nn.Module:
        ema = self.members[name].ema
        if ema is None:
            raise ValueError(f"module {name!r} was registered without an EMA")
        return ema.module

    # -- the loop --------------------------------------------------------------------------
    def fit(self, task: TrainingTask, dataset: Dataset, *, num_workers: int = 0, collate_fn=None) -> None:
        """Train from the newest checkpoint (or from scratch) to ``run.max_steps``.

        ``collate_fn`` defaults to the dataset's own ``collate`` method when it has one.
        """
        if not any(m.optimizer for m in self.members.values()):
            raise ValueError("no module with an optimizer is registered")
        start = self._load_resume_checkpoint()
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.checkpoint_dir)
            save_yaml(self.config, self.run_dir / "config.yaml")
        sampler = GlobalBatchSampler(len(dataset), self.split, self.run.seed, start_step=start)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                            collate_fn=collate_fn or getattr(dataset, "collate", None),
                            pin_memory=self.ctx.device.type == "cuda", persistent_workers=num_workers > 0)
        batches = iter(loader)
        log = RunLog(self.run_dir, enabled=self.ctx.is_main, resume_step=start if start else None,
                     tensorboard=self.run.tensorboard, wandb_project=self.run.wandb, config=self.config)
        bar = tqdm(total=self.run.max_steps, initial=start, desc="train", disable=not self.ctx.is_main,
                   dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        interval_steps, interval_start = 0, time.perf_counter()
        try:
            for step in range(start, self.run.max_steps):
                metrics = self._train_step(task, batches, step)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                interval_steps += 1
                done = step + 1
                bar.update(1)
                last = done == self.run.max_steps
                if done % self.run.log_every == 0 or last:
                    elapsed = time.perf_counter() - interval_start
                    means = {k: float(v) / interval_steps for k, v in sums.items()}
                    means = mean_over_processes(means, self.ctx)
                    means["samples_per_s"] = interval_steps * self.split.global_batch / max(elapsed, 1e-9)
                    log.log(done, means)
                    bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}")
                    sums, interval_steps, interval_start = {}, 0, time.perf_counter()
                if done % self.run.ckpt_every == 0 or last:
                    self._save_checkpoint(done, sampler)
                if (self.run.sample_every and done % self.run.sample_every == 0) or last:
                    self._save_samples(task, done, log)
        finally:
            bar.close()
            log.close()

    def _train_step(self, task: TrainingTask, batches, step: int) -> dict[str, torch.Tensor]:
        accum = self.run.grad_accum
        metrics: dict[str, torch.Tensor] = {}
        updated: set[str] = set()
        for micro in range(accum):
            batch = _to_device(next(batches), self.ctx.device)
            rng = BatchRandom(self.run.seed, step, self.split, micro, self.ctx.device)
            with contextlib.ExitStack() as stack:
                if micro < accum - 1:
                    # Gradients are summed locally and reduced across processes only once per step.
                    for member in self.members.values():
                        if member.ddp is not None:
                            stack.enter_context(member.ddp.no_sync())
                with self._autocast():
                    out = task.training_step(batch, step, rng)
                targets = self._loss_targets(out)
                for i, (name, loss) in enumerate(targets):
                    torch.autograd.backward(loss / accum, inputs=self.members[name].params,
                                            retain_graph=i < len(targets) - 1)
                    updated.add(name)
            for key, value in out.items():
                metrics[key] = metrics.get(key, 0.0) + value.detach().float() / accum
        for name in updated:
            member = self.members[name]
            factor = lr_factor(step, schedule=member.optim.schedule, warmup_steps=member.optim.warmup_steps,
                               total_steps=self.run.max_steps, min_ratio=member.optim.min_lr_ratio)
            for group in member.optimizer.param_groups:
                group["lr"] = member.base_lr * factor
            clip = member.optim.grad_clip if member.optim.grad_clip is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(member.params, clip)
            member.optimizer.step()
            member.optimizer.zero_grad(set_to_none=True)
            if member.ema is not None:
                member.ema.update(member.module)
            suffix = "" if name == self._main_name else f"/{name}"
            metrics[f"lr{suffix}"] = torch.tensor(member.base_lr * factor, dtype=torch.float64)
            metrics[f"grad_norm{suffix}"] = grad_norm.detach().float()
        return metrics

    @property
    def _main_name(self) -> str:
        return next(name for name, m in self.members.items() if m.optimizer is not None)

    def _loss_targets(self, out: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        targets = []
        for key, value in out.items():
            if key == "loss":
                targets.append((self._main_name, value))
            elif key.startswith("loss/"):
                name = key.removeprefix("loss/")
                if name not in self.members or self.members[name].optimizer is None:
                    trained = [n for n, m in self.members.items() if m.optimizer is not None]
                    raise ValueError(f"training_step returned {key!r} but no trained module is named {name!r}; "
                                     f"trained modules: {trained}")
                targets.append((name, value))
        if not targets:
            raise ValueError(f"training_step must return 'loss' (or 'loss/<module>'), got keys {sorted(out)}")
        return targets

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    # -- checkpoints -----------------------------------------------------------------------
    def _find_resume_checkpoint(self) -> Path | None:
        resume = self.run.resume
        if isinstance(resume, str):
            path = Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"run.resume names checkpoint {path}, which does not exist")
            return path
        existing = list_checkpoints(self.checkpoint_dir)
        if resume:
            return existing[-1][1] if existing else None
        if existing:
            raise ValueError(f"run.resume is false but {self.checkpoint_dir} already holds checkpoints; "
                             "resume (run.resume=true) or choose another run.out_dir")
        return None

    def _load_resume_checkpoint(self) -> int:
        if self._resume_from is None:
            return 0
        state = load_checkpoint(self._resume_from)
        self._check_resumable(state)
        for name, member in self.members.items():
            member.module.load_state_dict(state["modules"][name])
            if member.ema is not None:
                member.ema.module.load_state_dict(state["ema"][name])
            if member.optimizer is not None:
                member.optimizer.load_state_dict(state["optimizers"][name])
        if len(state["rng"]) == self.ctx.world_size:
            restore_rng_state(state["rng"][self.ctx.rank])
        else:
            warnings.warn(f"checkpoint was written by {len(state['rng'])} processes, this run has "
                          f"{self.ctx.world_size}: global random generators start from run.seed instead")
        if self.ctx.is_main:
            tqdm.write(f"resuming from {self._resume_from} (step {state['step']})")
        return int(state["step"])

    def _check_resumable(self, state: dict) -> None:
        missing = sorted(set(self.members) - set(state["modules"]))
        if missing:
            raise ValueError(f"checkpoint {self._resume_from} has no state for modules {missing}")
        ours, theirs = _flatten(self.config), _flatten(state["config"])
        changed = changed_keys(theirs, ours, ignore=self.free_on_resume)
        if changed:
            detail = describe_changes(theirs, ours, changed)
            raise ValueError(f"cannot resume from {self._resume_from}: the config changed ({detail}); "
                             f"only {sorted(self.free_on_resume)} may change on resume")

    def _save_checkpoint(self, step: int, sampler: GlobalBatchSampler) -> None:
        rng = gather_objects(capture_rng_state(), self.ctx)
        if self.ctx.is_main:
            state = {
                "step": step,
                "config": self.config,
                "world_size": self.ctx.world_size,
                "data_order": sampler.state(step),
                "rng": rng,
                "modules": {n: m.module.state_dict() for n, m in self.members.items()},
                "ema": {n: m.ema.module.state_dict() for n, m in self.members.items() if m.ema is not None},
                "optimizers": {n: m.optimizer.state_dict() for n, m in self.members.items() if m.optimizer},
            }
            save_checkpoint(state, self.checkpoint_dir, step, self.run.keep_last)
        barrier()

    def _save_samples(self, task: TrainingTask, step: int, log: RunLog) -> None:
        if self.ctx.is_main:
            images = task.sample_images(step)
            if images is not None:
                path = self.run_dir / "samples" / f"step-{step:08d}.png"
                # Rounded to nearest, as an image file stores a float image; as many rows as columns.
                save_image_grid(path, to_uint8_round(images.detach()), nrow=max(1, round(images.shape[0] ** 0.5)))
                log.add_image_file(step, "samples", path)
        barrier()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple batch (images, labels, ...)
        return type(batch)(*(_to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
