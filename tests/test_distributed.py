"""torchrun plumbing inside one process: the process-group timeout, from config key and flag to the
group, and the DDP wrapper every trained module gets (its options, and parameters a step leaves out)."""
from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from ctok.cli import EXIT_BAD_INPUT, build_parser, main
from ctok.training import distributed, generator, tokenizer
from ctok.training.config import load_config
from ctok.training.dist_timeout import DEFAULT_DIST_TIMEOUT_MIN
from ctok.training.distributed import DistContext, init_distributed, shutdown_distributed
from ctok.training.members import register
from ctok.training.sections import FREE_ON_RESUME, OptimSection


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives a job of one process; whatever group the test makes is destroyed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    yield
    shutdown_distributed()


def _group_timeout() -> timedelta:
    return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout


@pytest.mark.parametrize("minutes", [None, 7])
def test_the_timeout_reaches_the_process_group(torchrun_env, minutes):
    init_distributed("cpu") if minutes is None else init_distributed("cpu", minutes)
    assert _group_timeout() == timedelta(minutes=minutes or DEFAULT_DIST_TIMEOUT_MIN)
    assert DEFAULT_DIST_TIMEOUT_MIN == 60  # well above NCCL's 10 minutes: rank 0 writes 10.8 GB checkpoints


@pytest.mark.parametrize("minutes", [0, -5, 1.5, True])
def test_a_timeout_under_a_minute_or_not_whole_is_refused_before_any_group(torchrun_env, minutes):
    with pytest.raises(ValueError, match=r"run.dist_timeout_min, --dist-timeout-min\) must be a whole number"):
        init_distributed("cpu", minutes)
    assert not dist.is_initialized()


class Reached(Exception):
    """What the stand-in for init_distributed raises, carrying the timeout it was given."""


def _reach(device, timeout_min):
    raise Reached(timeout_min)


@pytest.mark.parametrize("command", [
    ["generate", "--tokenizer", "t", "--model", "m", "--out", "o"],
    ["reconstruct", "--tokenizer", "t", "--data", "d", "--out", "o"],
    ["cache-latents", "--tokenizer", "t", "--data", "d", "--out", "o"],
])
def test_the_commands_pass_their_flag_to_the_process_group(monkeypatch, command):
    monkeypatch.setattr(distributed, "init_distributed", _reach)
    for flag, expected in (([], DEFAULT_DIST_TIMEOUT_MIN), (["--dist-timeout-min", "3"], 3)):
        args = build_parser().parse_args(command + flag)
        with pytest.raises(Reached) as reached:
            args._run(args)
        assert reached.value.args == (expected,)


def test_the_trainers_pass_run_dist_timeout_min(monkeypatch, synthetic_fashion_mnist):
    monkeypatch.setattr(tokenizer, "init_distributed", _reach)
    monkeypatch.setattr(generator, "init_distributed", _reach)
    monkeypatch.setattr(generator, "open_training_data", lambda kind, cfg: (None, None, None, "tok"))
    cfg = load_config(tokenizer.TokenizerTrainConfig, "tiny-maetok",
                      [f"data.images={synthetic_fashion_mnist}", "run.dist_timeout_min=4"])
    with pytest.raises(Reached) as reached:
        tokenizer.train_tokenizer(cfg)
    assert reached.value.args == (4,)
    cfg = load_config(generator.SiTTrainConfig, "tiny-sit", ["run.dist_timeout_min=5"])
    with pytest.raises(Reached) as reached:
        generator.train_generator("sit", cfg)
    assert reached.value.args == (5,)
    assert "run.dist_timeout_min" in FREE_ON_RESUME  # a resumed run may wait longer or shorter


def test_a_zero_timeout_is_one_line_of_bad_input(capsys):
    code = main(["generate", "--tokenizer", "t", "--model", "m", "--out", "o", "--dist-timeout-min", "0"])
    assert code == EXIT_BAD_INPUT
    assert "--dist-timeout-min) must be a whole number of minutes, at least 1, got 0" in capsys.readouterr().err


class SometimesUnused(nn.Module):
    """``extra`` takes part only when asked, like MAETok's mask token at an unmasked step."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.extra = nn.Parameter(torch.ones(3))
        self.register_buffer("constant", torch.arange(3.0))

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        return self.linear(x + self.constant + (self.extra if use_extra else 0))


def _wrapped(find_unused_parameters: bool):
    # register() wraps for DDP whenever the context says torchrun; a group of one runs the same reducer.
    ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    return register(SometimesUnused(), ctx, optim=OptimSection(), global_batch=2, compile=False, ema_decay=None,
                    find_unused_parameters=find_unused_parameters)


def test_ddp_without_find_unused_parameters_fails_after_a_step_that_skips_one(torchrun_env):
    init_distributed("cpu")
    member = _wrapped(find_unused_parameters=False)
    x = torch.randn(4, 3)
    member.wrapped(x, False).square().mean().backward()
    with pytest.raises(RuntimeError, match="Expected to have finished reduction in the prior iteration"):
        member.wrapped(x, True)


def test_ddp_leaves_a_skipped_parameter_without_gradient_like_one_process(torchrun_env):
    init_distributed("cpu")
    member = _wrapped(find_unused_parameters=True)
    torch.manual_seed(0)
    plain = SometimesUnused()
    x = torch.randn(4, 3)
    buckets = set()
    for use_extra in (True, False, False, True):
        for net in (member.wrapped, plain):
            net(x, use_extra).square().mean().backward()
        assert (member.module.extra.grad is None) == (not use_extra) == (plain.extra.grad is None)
        for ours, theirs in zip(member.params, plain.parameters()):
            assert (ours.grad is None and theirs.grad is None) or torch.equal(ours.grad, theirs.grad)
        # gradient_as_bucket_view: the gradient lives in DDP's all-reduce bucket, not in a copy of it
        assert member.module.linear.weight.grad._base is not None
        buckets.add(member.module.linear.weight.grad._base.data_ptr())
        member.optimizer.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    assert len(buckets) == 1
    ddp = member.ddp
    assert getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None)) is False
