"""The training loop every ctok trainer shares: DDP, accumulation, clipping, EMA, checkpoints, logs.

A trainer registers the network it trains (``add_model``) and, for a GAN, a discriminator
(``add_discriminator``), hands the returned :class:`~ctok.training.task.TrainedModule` objects to
its *task*, and calls :meth:`Runner.fit` with the task (see :mod:`ctok.training.task` for what a
task is). Generator training (:mod:`ctok.training.generator`) is::

    ctx = init_distributed(cfg.run.device, cfg.run.dist_timeout_min)
    runner = Runner(cfg.run, config_to_dict(cfg), ctx, global_batch=cfg.data.batch_size)
    sit = build_preset("SiT-XL/1", ...)            # after Runner(): it seeds the initialisation
    net = runner.add_model(sit, optim=cfg.optim, ema_decay=cfg.ema.decay)
    runner.fit(FlowMatchingTask(net, ...), latent_dataset, num_workers=cfg.data.num_workers)
    net.ema.save_pretrained(out)

Tokenizer training adds its discriminator, whose task returns both losses of a micro-batch::

    tok = runner.add_model(training_model, optim=cfg.optim, ema_decay=cfg.ema.decay)
    disc = runner.add_discriminator(objective, optim=cfg.gan.optim)
    runner.fit(TokenizerTask(cfg, tok, disc, ...), image_dataset, num_workers=...)

One step, for each of ``run.grad_accum`` micro-batches: ``training_step`` under autocast, then
``StepLosses.model`` back-propagated into the model's parameters and ``StepLosses.discriminator``
(when not None) into the discriminator's; after the last micro-batch, each module that got a loss
takes its learning rate, clipping, AdamW step and EMA update. Modules that are not trained (LPIPS,
a frozen teacher) are not registered.

The runner does everything else: device placement, DistributedDataParallel, bf16 autocast and TF32
on CUDA, torch.compile, activation checkpointing, the learning-rate schedule, the fp32 EMA (timm's
ModelEmaV3), checkpoints that resume exactly, the JSONL log and the progress bar.

Run folder: ``config.yaml`` (the resolved config), ``checkpoints/step-XXXXXXXX.pt`` (the newest
``run.keep_last``), ``log.jsonl``, ``samples/step-XXXXXXXX.png``.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ctok.atomic_files import save_image_grid
from ctok.data.images import usable_workers
from ctok.locking import folder_lock
from ctok.models.checkpointing import block_stacks, set_activation_checkpointing
from ctok.numerics import autocast_dtype
from ctok.training.checkpoint import (
    capture_rng_state,
    check_resumable,
    find_resume_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from ctok.training.config import save_yaml
from ctok.training.distributed import DistContext, barrier, gather_objects, mean_over_processes
from ctok.training.members import Member, register
from ctok.training.run_log import RunLog
from ctok.training.schedule import lr_factor
from ctok.training.sections import FREE_ON_RESUME, OptimSection, RunSection
from ctok.training.sharding import BatchRandom, BatchSplit, GlobalBatchSampler
from ctok.training.task import StepLosses, TrainedModule, TrainingTask
from ctok.uint8 import to_uint8


class Runner:
    """One training run: the model (and a discriminator), the loop, its checkpoints and its logs."""

    def __init__(self, run: RunSection, config: dict, ctx: DistContext, *, global_batch: int,
                 free_on_resume: Iterable[str] = ()):
        """``config`` is the resolved config (saved in the run folder and every checkpoint); keys in
        ``free_on_resume`` (besides :data:`FREE_ON_RESUME`) may differ from the checkpoint's on resume.

        Seeds the global generators with ``run.seed``: build the networks after this, so that every
        process starts from the same weights.
        """
        if not run.out_dir:
            raise ValueError("run.out_dir is not set: pass run.out_dir=DIR")
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
        # "model" and "discriminator": also their names in checkpoints and (suffixes) in the log
        self.members: dict[str, Member] = {}
        self._resume_from = find_resume_checkpoint(run.resume, self.checkpoint_dir)
        if ctx.device.type == "cuda" and run.tf32:
            torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside bf16 autocast
        self.autocast_dtype = autocast_dtype(run.precision, ctx.device)
        # Initialisation draws from the global generator: the same seed on every process gives every
        # process the same initial weights (DDP also broadcasts rank 0's, but the EMA copy is local).
        torch.manual_seed(run.seed)

    # -- registration ----------------------------------------------------------------------
    def add_model(self, module: nn.Module, *, optim: OptimSection, ema_decay: float | None = None,
                  find_unused_parameters: bool = False) -> TrainedModule:
        """Register the network that ``StepLosses.model`` trains, with AdamW and (given a decay) an EMA.

        ``find_unused_parameters``: some steps leave trainable parameters out of the loss (MAETok's
        mask token at an unmasked step); DDP then looks for them after every forward, which costs a
        graph traversal, so only trainers that can skip parameters ask for it. Without it such a
        step stops the next one under torchrun ("Expected to have finished reduction").
        """
        return self._register("model", module, optim, ema_decay, find_unused_parameters)

    def add_discriminator(self, module: nn.Module, *, optim: OptimSection) -> TrainedModule:
        """Register the network that ``StepLosses.discriminator`` trains, with its own AdamW.

        A step that returns no discriminator loss must not call its DDP wrapper either, since a
        forward through DDP waits for gradients; the tokenizer task calls it from ``gan.start_step``
        on, and judges the model's reconstructions through the plain module.
        """
        return self._register("discriminator", module, optim, None, False)

    def _register(self, role: str, module: nn.Module, optim: OptimSection, ema_decay: float | None,
                  find_unused_parameters: bool) -> TrainedModule:
        if role in self.members:
            raise ValueError(f"a {role} is already registered")
        # Activation checkpointing: a model without blocks is refused; a discriminator without them
        # (PatchGAN) is left as it is.
        checkpointed = self.run.activation_checkpointing and bool(block_stacks(module))
        if self.run.activation_checkpointing and role == "model" and not checkpointed:
            raise ValueError(f"run.activation_checkpointing is true, but the model ({type(module).__name__}) has "
                             "no transformer blocks to recompute: set it to false")
        self.members[role] = register(module, self.ctx, optim=optim, global_batch=self.split.global_batch,
                                      compile=self.run.compile, ema_decay=ema_decay,
                                      find_unused_parameters=find_unused_parameters)
        if checkpointed:  # after the EMA copy is taken: the copy (the final weights) carries no training setting
            set_activation_checkpointing(module)
        return self.members[role].handle()

    # -- the loop --------------------------------------------------------------------------
    def fit(self, task: TrainingTask, dataset: Dataset, *, num_workers: int = 0, collate_fn=None) -> None:
        """Train from the newest checkpoint (or from scratch) to ``run.max_steps``.

        ``collate_fn`` defaults to the dataset's own ``collate`` method when it has one.
        """
        if "model" not in self.members:
            raise ValueError("no model is registered: call Runner.add_model before fit")
        with folder_lock(self.run_dir, hold=self.ctx.is_main):
            self._fit(task, dataset, usable_workers(num_workers), collate_fn)

    def _fit(self, task: TrainingTask, dataset: Dataset, num_workers: int, collate_fn) -> None:
        start = self._load_resume_checkpoint()
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.checkpoint_dir)
            save_yaml(self.config, self.run_dir / "config.yaml")
        sampler = GlobalBatchSampler(len(dataset), self.split, self.run.seed, start_step=start)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                            generator=sampler.loader_generator(),
                            collate_fn=collate_fn or getattr(dataset, "collate", None),
                            pin_memory=self.ctx.device.type == "cuda", persistent_workers=num_workers > 0)
        batches = iter(loader)
        log = RunLog(self.run_dir, enabled=self.ctx.is_main, start_step=start, report_to=self.run.report_to,
                     config=self.config, wandb_project=self.run.wandb_project, wandb_entity=self.run.wandb_entity,
                     wandb_mode=self.run.wandb_mode)
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
                if getattr(task, "evaluates_at", None) and task.evaluates_at(done):  # before the checkpoint:
                    self._evaluate(task, done, log)  # a run killed in between evaluates this step again
                if self.run.save_weights and (done % self.run.ckpt_every == 0 or last):
                    self._save_checkpoint(done, sampler)
                if (self.run.sample_every and done % self.run.sample_every == 0) or last:
                    self._save_samples(task, done, log)
        finally:
            bar.close()
            log.close()

    def _train_step(self, task: TrainingTask, batches, step: int) -> dict[str, torch.Tensor]:
        """One step: the gradients of ``run.grad_accum`` micro-batches, then the updates they call for."""
        accum = self.run.grad_accum
        metrics: dict[str, torch.Tensor] = {}
        discriminator_trained = False
        for micro in range(accum):
            batch = _to_device(next(batches), self.ctx.device)
            rng = BatchRandom(self.run.seed, step, self.split, micro, self.ctx.device)
            # Gradients are summed locally and reduced across processes only in the last micro-batch.
            with self._no_sync() if micro < accum - 1 else contextlib.nullcontext():
                with self._autocast():
                    losses = task.training_step(batch, step, rng)
                self._check_losses(losses)
                # Each loss reaches only its own module's parameters: the model's loss runs through the
                # discriminator (the adversarial term) and must leave the discriminator's gradients alone.
                # The discriminator judges detached images: its loss shares no graph with the model's.
                (losses.model / accum).backward(inputs=self.members["model"].params)
                if losses.discriminator is not None:
                    (losses.discriminator / accum).backward(inputs=self.members["discriminator"].params)
                    discriminator_trained = True
            for key, value in losses.logged().items():
                metrics[key] = metrics.get(key, 0.0) + value.detach().float() / accum
        updated = ["model", "discriminator"] if discriminator_trained else ["model"]
        return {**metrics, **self._update(step, updated)}

    def _check_losses(self, losses: StepLosses) -> None:
        if not isinstance(losses, StepLosses):
            raise TypeError(f"training_step must return StepLosses (ctok.training.task), got {type(losses).__name__}")
        if losses.discriminator is not None and "discriminator" not in self.members:
            raise ValueError("training_step returned a discriminator loss, but no discriminator is registered "
                             "(Runner.add_discriminator)")

    def _update(self, step: int, updated: list[str]) -> dict[str, torch.Tensor]:
        """The optimizer step of each module in ``updated``: learning rate, clipping, AdamW, EMA."""
        metrics: dict[str, torch.Tensor] = {}
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
            suffix = "" if name == "model" else f"/{name}"
            metrics[f"lr{suffix}"] = torch.tensor(member.base_lr * factor, dtype=torch.float64)
            metrics[f"grad_norm{suffix}"] = grad_norm.detach().float()
        return metrics

    def _no_sync(self) -> contextlib.ExitStack:
        """DDP's no_sync of every registered module: gradients stay local until the step's last micro-batch."""
        stack = contextlib.ExitStack()
        for member in self.members.values():
            if member.ddp is not None:
                stack.enter_context(member.ddp.no_sync())
        return stack

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    # -- checkpoints -----------------------------------------------------------------------
    def _load_resume_checkpoint(self) -> int:
        if self._resume_from is None:
            return 0
        state = load_checkpoint(self._resume_from)
        check_resumable(state, self._resume_from, self.members, self.config, self.free_on_resume)
        for name, member in self.members.items():
            member.module.load_state_dict(state["modules"][name])
            if member.ema is not None:
                member.ema.module.load_state_dict(state["ema"][name])
            member.optimizer.load_state_dict(state["optimizers"][name])
        if len(state["rng"]) == self.ctx.world_size:
            restore_rng_state(state["rng"][self.ctx.rank])
        else:
            warnings.warn(f"checkpoint was written by {len(state['rng'])} processes, this run has "
                          f"{self.ctx.world_size}: global random generators start from run.seed instead")
        if self.ctx.is_main:
            tqdm.write(f"resuming from {self._resume_from} (step {state['step']})")
        return int(state["step"])

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
                "optimizers": {n: m.optimizer.state_dict() for n, m in self.members.items()},
            }
            save_checkpoint(state, self.checkpoint_dir, step, self.run.keep_last)
        barrier()

    def _evaluate(self, task: TrainingTask, step: int, log: RunLog) -> None:
        """An optional task's held-out scores (the latent dashboard), on the main process; the others wait."""
        if self.ctx.is_main:
            log.log(step, task.evaluate(step))
        barrier()

    def _save_samples(self, task: TrainingTask, step: int, log: RunLog) -> None:
        if self.ctx.is_main:
            images = task.sample_images(step)
            if images is not None:
                path = self.run_dir / "samples" / f"step-{step:08d}.png"
                # Rounded to nearest, as an image file stores a float image; as many rows as columns.
                save_image_grid(path, to_uint8(images.detach()), nrow=max(1, round(images.shape[0] ** 0.5)))
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

