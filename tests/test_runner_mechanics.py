"""The runner's optimisation mechanics, step by step against a hand-written AdamW.

A few steps of a linear regression, whose loss draws no random numbers, are replayed here with the
batches the runner fed: the learning-rate schedule (and ``scale_lr``), AdamW with the config's
betas, eps and weight decay, clipping by the global gradient norm, the division of the loss by
``run.grad_accum`` and the EMA must reproduce the runner's parameters, optimizer state and log.
The settings make each of these visible: eps is large next to the gradients (so AdamW is not
blind to their scale), the clip threshold is below the gradient norm, and the EMA decay is not 1/2.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ctok.training.config import build_config, config_to_dict
from ctok.training.distributed import init_distributed
from ctok.training.runner import Runner
from ctok.training.task import StepLosses
from test_runner import ToyConfig

GLOBAL_BATCH = 8
STEPS = 4
# scale_lr: 3.2 x 8 / 256 = 0.1. Cosine after 2 warm-up steps of 4, min_lr_ratio 0.1: warm-up 1/2,
# 2/2, then 0.1 + 0.9 (1 + cos(pi p)) / 2 at p = 0 and p = 1/2.
EXPECTED_LR = [0.1 * f for f in (0.5, 1.0, 1.0, 0.55)]
BETAS, EPS, WEIGHT_DECAY, EMA_DECAY = (0.5, 0.9), 1e-2, 0.1, 0.8


def mechanics_config(out_dir, *, grad_accum: int = 1, grad_clip: float | None = 0.3) -> ToyConfig:
    return build_config(ToyConfig, {
        "run": {"out_dir": str(out_dir), "max_steps": STEPS, "log_every": 1, "ckpt_every": 100,
                "device": "cpu", "seed": 3, "grad_accum": grad_accum},
        "optim": {"lr": 3.2, "scale_lr": True, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY,
                  "schedule": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1, "grad_clip": grad_clip},
        "ema": {"decay": EMA_DECAY},
    })


def regression_data() -> TensorDataset:
    # 16 samples: two global batches per epoch, so the 4 steps cross an epoch boundary
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 3.0]) + 0.5)


def squared_error(weight, bias, x, y):
    return ((x @ weight.T + bias).squeeze(-1) - y).pow(2).mean()


class RecordingRegression:
    """Least squares without noise; remembers every micro-batch it was given, per step."""

    def __init__(self, net):
        self.net = net
        self.batches: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def training_step(self, batch, step, rng):
        x, y = batch
        self.batches.setdefault(step, []).append((x.clone(), y.clone()))
        return StepLosses(model=squared_error(self.net.weight, self.net.bias, x, y))

    def sample_images(self, step):
        return None


def run(cfg: ToyConfig):
    """Train a Linear(3, 1); returns the runner, its initial parameters, the task and the log records."""
    runner = Runner(cfg.run, config_to_dict(cfg), init_distributed("cpu"), global_batch=GLOBAL_BATCH)
    net = runner.add_model(nn.Linear(3, 1), optim=cfg.optim, ema_decay=cfg.ema.decay).wrapped
    initial = [p.detach().clone() for p in net.parameters()]
    task = RecordingRegression(net)
    runner.fit(task, regression_data())
    records = [json.loads(line) for line in (runner.run_dir / "log.jsonl").read_text().splitlines()]
    return runner, initial, task, records


def adamw_step(params, grads, exp_avg, exp_avg_sq, t: int, lr: float):
    """One AdamW update (decoupled weight decay, bias-corrected moments), in place, written out by hand."""
    b1, b2 = BETAS
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        p.mul_(1 - lr * WEIGHT_DECAY)
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * g * g)
        denom = (v / (1 - b2 ** t)).sqrt() + EPS
        p.sub_(lr / (1 - b1 ** t) * m / denom)


def replay(initial, batches, grad_clip):
    """The runner's STEPS steps recomputed in float64 on the recorded batches.

    Returns the parameters, the EMA, AdamW's moments and the gradient norm of every step.
    """
    params = [p.double() for p in initial]
    ema = [p.clone() for p in params]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    norms = []
    for step in range(STEPS):
        # the global batch is the micro-batches together: the mean over it is the mean of their means
        x = torch.cat([x for x, _ in batches[step]]).double()
        y = torch.cat([y for _, y in batches[step]]).double()
        leaves = [p.clone().requires_grad_() for p in params]
        grads = torch.autograd.grad(squared_error(*leaves, x, y), leaves)
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        norms.append(norm)
        if grad_clip is not None:  # torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6), at most 1
            grads = [g * min(1.0, grad_clip / (norm + 1e-6)) for g in grads]
        adamw_step(params, grads, exp_avg, exp_avg_sq, step + 1, EXPECTED_LR[step])
        ema = [EMA_DECAY * e + (1 - EMA_DECAY) * p for e, p in zip(ema, params)]
    return params, ema, exp_avg, exp_avg_sq, norms


def close(actual, expected, what):
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=1e-6, msg=what)


@pytest.mark.parametrize("grad_accum, grad_clip", [(1, 0.3), (2, 0.3), (2, None)])
def test_steps_match_a_hand_written_adamw(tmp_path, grad_accum, grad_clip):
    runner, initial, task, records = run(mechanics_config(tmp_path, grad_accum=grad_accum, grad_clip=grad_clip))
    assert [len(task.batches[s]) for s in range(STEPS)] == [grad_accum] * STEPS
    params, ema, exp_avg, exp_avg_sq, norms = replay(initial, task.batches, grad_clip)
    if grad_clip is not None:  # the clip threshold really cuts the gradients
        assert min(norms) > 2 * grad_clip

    # the log shows the learning rate of every step, the one the replay applied, and the unclipped norm
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in records] == pytest.approx(EXPECTED_LR, rel=1e-12)
    assert [r["grad_norm"] for r in records] == pytest.approx(norms, rel=1e-5)

    optimizer = runner.members["model"].optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(EXPECTED_LR[-1], rel=1e-12)
    trained = zip(runner.members["model"].module.named_parameters(), runner.members["model"].ema.module.parameters(),
                  params, ema, exp_avg, exp_avg_sq)
    for (name, p), e, want_p, want_e, want_m, want_v in trained:
        close(p.detach(), want_p, f"model.{name}")
        close(e.detach(), want_e, f"ema.{name}")
        state = optimizer.state[p]
        assert float(state["step"]) == STEPS
        close(state["exp_avg"], want_m, f"exp_avg.{name}")
        close(state["exp_avg_sq"], want_v, f"exp_avg_sq.{name}")


def test_accumulation_gives_the_update_of_the_whole_batch(tmp_path):
    # Without clipping, a loss summed over micro-batches instead of averaged doubles the gradients:
    # their norm, AdamW's moments and (eps being large) the parameters all show it.
    one, _, one_task, one_log = run(mechanics_config(tmp_path / "one", grad_accum=1, grad_clip=None))
    two, _, two_task, two_log = run(mechanics_config(tmp_path / "two", grad_accum=2, grad_clip=None))
    for step in range(STEPS):  # the same samples, split in two
        assert torch.equal(torch.cat([x for x, _ in two_task.batches[step]]), one_task.batches[step][0][0])
    assert [r["grad_norm"] for r in two_log] == pytest.approx([r["grad_norm"] for r in one_log], rel=1e-5)
    a, b = one.members["model"], two.members["model"]
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b.optimizer.state[q][key], a.optimizer.state[p][key], rtol=1e-6, atol=1e-6)
