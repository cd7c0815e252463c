"""The shared training loop on a toy regression task: exact resume, accumulation, several optimizers, logs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ctok.training.checkpoint import list_checkpoints, load_checkpoint
from ctok.training.config import build_config, config_to_dict
from ctok.training.distributed import init_distributed
from ctok.training.runner import Runner
from ctok.training.sections import EMASection, OptimSection, RunSection
from ctok.training.task import StepLosses


@dataclass
class ToyConfig:
    run: RunSection
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)


def toy_config(out_dir, **run) -> ToyConfig:
    settings = {"out_dir": str(out_dir), "max_steps": 12, "log_every": 3, "ckpt_every": 4, "keep_last": 2,
                "device": "cpu", "seed": 7, **run}
    return build_config(ToyConfig, {"run": settings, "optim": {"lr": 0.5, "warmup_steps": 2, "schedule": "cosine"},
                                    "ema": {"decay": 0.9}})


def toy_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, x @ torch.arange(1.0, 6.0) + 0.5)


class Regression:
    """Noisy least squares; the noise comes from the per-sample random numbers."""

    def __init__(self, net):
        self.net = net

    def training_step(self, batch, step, rng):
        x, y = batch
        x = x + 0.1 * rng.randn(5)
        return StepLosses(model=(self.net(x).squeeze(-1) - y).pow(2).mean())

    def sample_images(self, step):
        return None


class Crash(Exception):
    pass


class CrashingRegression(Regression):
    def __init__(self, net, crash_at: int):
        super().__init__(net)
        self.crash_at = crash_at

    def training_step(self, batch, step, rng):
        if step == self.crash_at:
            raise Crash
        return super().training_step(batch, step, rng)


def train(cfg: ToyConfig, data, global_batch: int = 16, crash_at: int | None = None,
          task: type[Regression] = Regression) -> Runner:
    runner = Runner(cfg.run, config_to_dict(cfg), init_distributed("cpu"), global_batch=global_batch)
    net = runner.add_model(nn.Linear(5, 1), optim=cfg.optim, ema_decay=cfg.ema.decay)
    runner.fit(task(net.wrapped) if crash_at is None else CrashingRegression(net.wrapped, crash_at), data)
    return runner


def states(runner: Runner) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in runner.members["model"].module.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in runner.members["model"].ema.module.state_dict().items()})
    for i, s in runner.members["model"].optimizer.state_dict()["state"].items():
        out.update({f"adam.{i}.{k}": v for k, v in s.items()})
    return out


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    data = toy_data()
    whole = train(toy_config(tmp_path / "whole"), data)
    with pytest.raises(Crash):  # dies during step 7 (the 7th update); the last checkpoint is step 4's
        train(toy_config(tmp_path / "split"), data, crash_at=6)
    resumed = train(toy_config(tmp_path / "split"), data)
    a, b = states(whole), states(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # EMA and model differ (the EMA is really averaged), and the run learned something.
    assert not torch.equal(a["model.weight"], a["ema.weight"])
    whole_log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    split_log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    # The crashed run had logged step 6, past its checkpoint: that line was replaced by the resumed run's.
    assert [r["step"] for r in split_log] == [3, 6, 9, 12]
    # (the resumed run's step-6 line averages steps 5-6 only; later intervals are whole again)
    assert [r["loss"] for r in whole_log][2:] == [r["loss"] for r in split_log][2:]


def test_checkpoints_hold_everything_needed_and_are_rotated(tmp_path):
    train(toy_config(tmp_path), toy_data())
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [8, 12]
    state = load_checkpoint(tmp_path / "checkpoints" / "step-00000012.pt")
    assert state["step"] == 12
    assert set(state) >= {"modules", "ema", "optimizers", "rng", "data_order", "config"}
    assert state["data_order"] == {"seed": 7, "epoch": 3, "position": 0, "global_batch": 16, "dataset_size": 64}
    assert state["config"]["optim"]["lr"] == 0.5
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert (tmp_path / "config.yaml").read_text().startswith("run:")


def test_log_has_one_line_per_log_step_with_losses_lr_and_speed(tmp_path):
    train(toy_config(tmp_path), toy_data())
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "samples_per_s"}
    # cosine after 2 warm-up steps of 12: the mean lr over steps 9..11 is well below the peak
    assert records[-1]["lr"] < 0.5 * 0.3
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    data = toy_data()
    full = states(train(toy_config(tmp_path / "a", max_steps=6), data))
    accumulated = states(train(toy_config(tmp_path / "b", max_steps=6, grad_accum=4), data))
    for key in full:
        torch.testing.assert_close(accumulated[key], full[key], rtol=1e-5, atol=1e-6, msg=key)


def test_global_batch_must_split_evenly(tmp_path):
    cfg = toy_config(tmp_path, grad_accum=3)
    with pytest.raises(ValueError, match="divisible by grad_accum"):
        Runner(cfg.run, config_to_dict(cfg), init_distributed("cpu"), global_batch=16)


class Adversarial:
    """A model and a discriminator, each with its own loss; the discriminator's only from ``disc_from`` on."""

    def __init__(self, gen, disc, disc_from: int):
        self.gen, self.disc, self.disc_from = gen, disc, disc_from

    def training_step(self, batch, step, rng):
        x, _ = batch
        fake = self.gen(x)
        model_loss = -self.disc(fake).mean() + fake.pow(2).mean()
        if step < self.disc_from:
            return StepLosses(model=model_loss)
        return StepLosses(model=model_loss, discriminator=self.disc(fake.detach()).mean() - self.disc(x).mean())

    def sample_images(self, step):
        return torch.zeros(4, 3, 8, 8)


def train_adversarial(tmp_path, disc_from: int):
    cfg = toy_config(tmp_path, max_steps=4, log_every=1)
    runner = Runner(cfg.run, config_to_dict(cfg), init_distributed("cpu"), global_batch=16)
    gen = runner.add_model(nn.Linear(5, 5), optim=cfg.optim, ema_decay=0.5).wrapped
    disc = runner.add_discriminator(nn.Linear(5, 1), optim=cfg.optim).wrapped
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in (("gen", gen), ("disc", disc))}
    runner.fit(Adversarial(gen, disc, disc_from), toy_data())
    changed = {name: not all(torch.equal(a, b) for a, b in zip(before[name], m.parameters()))
               for name, m in (("gen", gen), ("disc", disc))}
    changed["disc_grad_left"] = any(p.grad is not None for p in disc.parameters())
    return changed, [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


def test_the_generator_loss_does_not_train_the_discriminator(tmp_path):
    changed, _ = train_adversarial(tmp_path, disc_from=100)
    # the generator loss runs through the discriminator, yet leaves no gradient in it
    assert changed == {"gen": True, "disc": False, "disc_grad_left": False}


def test_a_second_optimizer_steps_only_when_its_loss_is_returned(tmp_path):
    changed, records = train_adversarial(tmp_path, disc_from=2)
    assert changed == {"gen": True, "disc": True, "disc_grad_left": False}
    assert ["loss/discriminator" in r for r in records] == [False, False, True, True]
    assert ["grad_norm/discriminator" in r and "lr/discriminator" in r for r in records] == [False, False, True, True]
    assert (tmp_path / "samples" / "step-00000004.png").is_file()
    state = load_checkpoint(tmp_path / "checkpoints" / "step-00000004.pt")
    assert set(state["modules"]) == set(state["optimizers"]) == {"model", "discriminator"}
    assert set(state["ema"]) == {"model"}


def test_a_discriminator_loss_without_a_discriminator_is_an_error(tmp_path):
    cfg = toy_config(tmp_path, max_steps=1)
    runner = Runner(cfg.run, config_to_dict(cfg), init_distributed("cpu"), global_batch=16)
    net = runner.add_model(nn.Linear(5, 1), optim=cfg.optim).wrapped

    class Wrong(Regression):
        def training_step(self, batch, step, rng):
            return StepLosses(model=super().training_step(batch, step, rng).model, discriminator=torch.zeros(()))

    with pytest.raises(ValueError, match=r"discriminator loss, but no discriminator is registered"):
        runner.fit(Wrong(net), toy_data())
    assert not list_checkpoints(tmp_path / "checkpoints")  # refused before any update


def test_a_step_must_return_typed_losses_and_a_model_must_be_registered(tmp_path):
    cfg = toy_config(tmp_path, max_steps=1)
    runner = Runner(cfg.run, config_to_dict(cfg), init_distributed("cpu"), global_batch=16)
    with pytest.raises(ValueError, match="no model is registered"):
        runner.fit(Regression(None), toy_data())
    net = runner.add_model(nn.Linear(5, 1), optim=cfg.optim).wrapped
    with pytest.raises(ValueError, match="a model is already registered"):
        runner.add_model(nn.Linear(5, 1), optim=cfg.optim)

    class Untyped(Regression):
        def training_step(self, batch, step, rng):
            return {"loss": super().training_step(batch, step, rng).model}

    with pytest.raises(TypeError, match="training_step must return StepLosses .*, got dict"):
        runner.fit(Untyped(net), toy_data())


def test_the_task_is_handed_the_plain_module_its_wrapper_and_the_ema(tmp_path):
    cfg = toy_config(tmp_path, max_steps=2)
    runner = Runner(cfg.run, config_to_dict(cfg), init_distributed("cpu"), global_batch=16)
    linear = nn.Linear(5, 1)
    net = runner.add_model(linear, optim=cfg.optim, ema_decay=0.5)
    disc = runner.add_discriminator(nn.Linear(5, 1), optim=cfg.optim)
    # one process, no compile: the wrapper is the module itself; the EMA is a separate copy
    assert net.module is net.wrapped is linear and disc.ema is None
    assert net.ema is not linear and torch.equal(net.ema.weight, linear.weight)
    runner.fit(Regression(net.wrapped), toy_data())
    # the EMA the task holds is the one the runner updates (and would restore on resume)
    assert not torch.equal(net.ema.weight, linear.weight)
    assert net.ema is runner.members["model"].ema.module


def test_resume_refuses_a_changed_config_and_fresh_start_refuses_old_checkpoints(tmp_path):
    data = toy_data()
    train(toy_config(tmp_path, max_steps=4), data)
    changed = toy_config(tmp_path, max_steps=8)
    changed.optim.lr = 0.1
    with pytest.raises(ValueError, match=r"config changed \(optim.lr: 0.5 -> 0.1\)"):
        train(changed, data)
    with pytest.raises(ValueError, match="run.resume is false but .* already holds checkpoints"):
        train(toy_config(tmp_path, max_steps=8, resume=False), data)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(toy_config(tmp_path, resume=str(tmp_path / "nope.pt")), data)
    # run.max_steps may change: this extends the run
    train(toy_config(tmp_path, max_steps=8), data)
    assert list_checkpoints(tmp_path / "checkpoints")[-1][0] == 8
