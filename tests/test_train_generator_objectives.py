"""The generator objectives, checked against the formulas with the same random numbers drawn again."""
from __future__ import annotations

import math

import pytest
import torch

from ctok.models.diffusion_transformer import LatentStats, build_preset
from ctok.sampling.gaussian_diffusion import GaussianDiffusion
from ctok.training.generator import DiffusionSection, DiffusionTask, FlowMatchingTask, FlowSection, SamplesSection
from ctok.training.sharding import BatchRandom, BatchSplit
from ctok.training.task import TrainedModule

SPLIT = BatchSplit(4096, 1, 1, 0)


class Spy(torch.nn.Module):
    """Records what the objective feeds the network and answers a fixed prediction."""

    def __init__(self, ema, out_channels):
        super().__init__()
        self.ema, self.out_channels = ema, out_channels

    def forward(self, x, t, y):
        self.seen = (x, t, y)
        return torch.full((*x.shape[:2], self.out_channels), 0.25)


def make_task(kind, x0, labels, **objective):
    ema = build_preset("SiT-S/1" if kind == "sit" else "DiT-S/1", input_size=x0.shape[1], in_channels=x0.shape[2],
                       num_classes=10, depth=1, hidden_size=32, num_heads=2, class_dropout_prob=0.1)
    spy = Spy(ema, ema.out_channels)
    common = dict(net=TrainedModule(spy, spy, ema), latents=lambda batch, rng: (x0, labels), tokenizer=None,
                  stats=LatentStats(0.0, 1.0, "test"), samples=SamplesSection())
    if kind == "sit":
        return FlowMatchingTask(**common, flow=FlowSection(**objective)), spy
    return DiffusionTask(**common, diffusion=DiffusionSection(**objective)), spy


def rng(step=3):
    return BatchRandom(11, step, SPLIT, 0, torch.device("cpu"))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_matching_regresses_the_path_velocity(path):
    x0 = torch.randn(4096, 4, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4096) % 10
    task, spy = make_task("sit", x0, labels, path_type=path, time_sampling="lognormal")
    loss = task.training_step(None, 3, rng()).model

    again = rng()  # the same draws, in the objective's order: label dropout, time, noise
    dropped = again.rand() < 0.1
    n = again.randn()
    noise = again.randn(4, 2)
    if path == "linear":
        t = 1 / (1 + torch.exp(-n))
        alpha, sigma, d_alpha, d_sigma = 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    else:
        t = 2 / math.pi * torch.atan(torch.exp(n))
        alpha, sigma = torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)
        d_alpha, d_sigma = -math.pi / 2 * sigma, math.pi / 2 * alpha
    x_seen, t_seen, y_seen = spy.seen
    torch.testing.assert_close(t_seen, t)
    torch.testing.assert_close(x_seen, alpha[:, None, None] * x0 + sigma[:, None, None] * noise)
    target = d_alpha[:, None, None] * x0 + d_sigma[:, None, None] * noise
    torch.testing.assert_close(loss, (0.25 - target).pow(2).mean())
    assert torch.equal(y_seen, torch.where(dropped, 10, labels))
    # label dropout replaces about 10% of the labels by the null class 10
    assert 0.08 < float((y_seen == 10).float().mean()) < 0.12
    # log-normal in sigma/alpha: the median time is where sigma = alpha
    assert float(t_seen.median()) == pytest.approx(0.5, abs=0.03)


def test_uniform_time_sampling_is_uniform():
    task, spy = make_task("sit", torch.zeros(4096, 4, 2), torch.zeros(4096, dtype=torch.long), time_sampling="uniform")
    task.training_step(None, 0, rng())
    t = spy.seen[1]
    assert 0 <= float(t.min()) and float(t.max()) < 1
    assert float(t.mean()) == pytest.approx(0.5, abs=0.02) and float(t.var()) == pytest.approx(1 / 12, abs=0.01)


def test_diffusion_objective_is_the_hybrid_loss_at_uniform_steps():
    x0 = torch.randn(4096, 4, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4096) % 10
    task, spy = make_task("dit", x0, labels, schedule="cosine")
    out = task.training_step(None, 5, rng(5)).logged()

    again = rng(5)
    again.rand()  # label dropout
    t = again.randint(1000)
    noise = again.randn(4, 2)
    diffusion = GaussianDiffusion("cosine", 1000)
    assert torch.equal(spy.seen[1], t)
    torch.testing.assert_close(spy.seen[0], diffusion.q_sample(x0, t, noise))
    reference = diffusion.training_losses(lambda x, s, y: torch.full((*x.shape[:2], 4), 0.25), x0, t, labels, noise)
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(out[key], reference[key].mean())
    assert float(out["mse"]) == pytest.approx(float((noise - 0.25).pow(2).mean()), rel=1e-5)
