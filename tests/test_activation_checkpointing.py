"""Activation checkpointing (``run.activation_checkpointing``): the blocks are recomputed, and nothing else changes.

A step with recomputation must give the loss and gradients of a step without it (drop path drawing
the same samples twice), only in train mode with gradients, without touching configs or weights;
the runner switches it on at registration and refuses it for a model without blocks; the key may
change on resume. The slow tests run it under torchrun (DDP) and torch.compile.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import yaml
from torch.utils.data import TensorDataset

import ctok.models.checkpointing as checkpointing
from ctok.models.auxiliary_decoders import AuxiliaryDecoders
from ctok.models.checkpointing import block_stacks, set_activation_checkpointing
from ctok.models.diffusion_transformer import DiT, SiT
from ctok.models.discriminators import DinoDiscriminator, PatchGANDiscriminator
from ctok.models.tokenizer import Tokenizer
from ctok.training.checkpoint import list_checkpoints, load_checkpoint
from ctok.training.config import build_config, config_to_dict, load_config
from ctok.training.distributed import init_distributed
from ctok.training.masking import random_patch_mask
from ctok.training.runner import Runner
from ctok.training.sections import FREE_ON_RESUME, EMASection, OptimSection, RunSection
from ctok.training.task import StepLosses
from ctok.training.tokenizer import TokenizerTrainingModel
from ctok.training.tokenizer_config import TokenizerTrainConfig, tokenizer_config
from ctok.training.tokenizer_setup import decoder_positions, init_linear_xavier

pytestmark = pytest.mark.usefixtures("one_thread")

GENERATOR = dict(input_size=8, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10,
                 class_dropout_prob=0.5)  # label dropout: a random draw outside the blocks


def block_calls(model: nn.Module) -> list[str]:
    """A list that every block forward (``...blocks.N``) appends its name to."""
    calls: list[str] = []
    for name, module in model.named_modules():
        if re.search(r"blocks\.\d+$", name):
            module.register_forward_pre_hook(lambda m, args, name=name: calls.append(name))
    return calls


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(plain: nn.Module, step, seed: int = 0) -> list[str]:
    """Run ``step(model)`` (a scalar loss) on ``plain`` and on a checkpointed copy from the same global
    RNG state: equal losses and gradients. Returns the copy's block calls (forward and recompute)."""
    recomputed = copy.deepcopy(plain)
    set_activation_checkpointing(recomputed)
    plain_calls, calls = block_calls(plain), block_calls(recomputed)
    results = []
    for model in (plain, recomputed):
        torch.manual_seed(seed)
        loss = step(model)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # every block ran once more, in the backward pass: the equality above is not a model left alone
    assert len(calls) == 2 * len(plain_calls) > 0
    return calls


# -- a tokenizer step: drop path, masking, MoVQ decoders with RoPE, auxiliary decoders -------
def tokenizer_training_model() -> TokenizerTrainingModel:
    model = load_config(TokenizerTrainConfig, "tiny-maetok").model
    model.update(encoder_size=[32, 2, 2], decoder_size=[32, 2, 2], enc_drop_path_rate=0.5, dec_drop_path_rate=0.5)
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_config(tokenizer_config(model))
    c = tokenizer.config
    auxiliary = AuxiliaryDecoders({"hog": (12, "mse"), "dinov2": (6, "cosine")}, image_size=32, patch_size=8,
                                  num_latent_tokens=c.num_latent_tokens, latent_dim=c.codebook_embed_dim, width=16,
                                  depth=2, num_heads=2, positions=decoder_positions(c))
    training = TokenizerTrainingModel(tokenizer, None, auxiliary).train()
    init_linear_xavier(training)  # the zero-initialised MoVQ modulations would hide the latents from the decoders
    return training


def tokenizer_step(model: TokenizerTrainingModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)  # the inputs are fixed; only drop path draws from the global RNG
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    mask = random_patch_mask(torch.rand(4, 16, generator=g), 0.5)
    targets = {"hog": torch.randn(4, 16, 12, generator=g), "dinov2": torch.randn(4, 16, 6, generator=g)}
    out = model(images, mask, targets)
    return (out.rec - images).square().mean() + sum(out.auxiliary.values())


def test_a_tokenizer_step_is_the_same_with_recomputed_blocks():
    model = tokenizer_training_model()
    # drop path is live: another draw gives another loss, so a replay with other draws would show
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.append(tokenizer_step(copy.deepcopy(model)).item())
    assert losses[0] != losses[1]
    calls = assert_same_step(model, tokenizer_step)
    assert {"tokenizer.encoder.model.blocks.1", "tokenizer.decoder.model.blocks.1",
            "auxiliary.decoders.dinov2.decoder.model.blocks.1"} <= set(calls)


@pytest.mark.parametrize("cls", [SiT, DiT])
def test_a_generator_step_is_the_same_with_recomputed_blocks(cls):
    torch.manual_seed(0)
    model = cls.from_config(GENERATOR).train()
    for p in model.parameters():  # adaLN-Zero starts every block at the identity: make the blocks matter
        nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(6, 8, 4, generator=g), torch.randn(6, 8, model.out_channels, generator=g)
    t = torch.rand(6, generator=g) if cls is SiT else torch.randint(0, 1000, (6,), generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    calls = assert_same_step(model, lambda m: (m(x, t, y) - target).square().mean())
    assert len(calls) == 2 * GENERATOR["depth"]


class Judged(nn.Module):
    """A reconstruction (a parameter here, so that its gradient is compared too) and the discriminator judging it."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.fake = nn.Parameter(torch.rand(2, 3, 32, 32) * 2 - 1)
        self.discriminator = discriminator

    def forward(self) -> torch.Tensor:
        return -self.discriminator(self.fake).mean()  # the generator's hinge term


def test_the_dino_discriminator_recomputes_its_frozen_blocks_for_the_generator_loss():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=0)
    model = Judged(DinoDiscriminator(vit, input_size=32, key_blocks=(0, 2), kernel_size=3)).train()
    calls = assert_same_step(model, lambda m: m())
    assert len(calls) == 2 * 3
    assert model.fake.grad.abs().sum() > 0  # the frozen blocks pass the gradient on to the images


# -- only in training, and never part of the model ------------------------------------------
def test_recomputation_happens_only_while_a_graph_is_recorded(monkeypatch):
    checkpoints = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: checkpoints.append(1) or real(*a, **k))
    model = SiT.from_config(GENERATOR)
    set_activation_checkpointing(model)
    x, t, y = torch.randn(2, 8, 4), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        model.train()(x, t, y)
        model.eval()(x, t, y)
    with torch.inference_mode():
        model(x, t, y)
    assert checkpoints == []
    # eval mode with gradients: how the generator trainer trains (label dropout is the task's)
    model.eval()(x, t, y).sum().backward()
    assert len(checkpoints) == GENERATOR["depth"]
    set_activation_checkpointing(model, False)
    model(x, t, y).sum().backward()
    assert len(checkpoints) == GENERATOR["depth"]


def test_the_switch_changes_neither_config_nor_weights(tmp_path):
    model = SiT.from_config(GENERATOR)
    config, state = model.to_config(), model.state_dict()
    assert set_activation_checkpointing(model) == 1 and model.activation_checkpointing
    assert model.to_config() == config and model.state_dict().keys() == state.keys()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == config
    loaded = SiT.from_pretrained(tmp_path)
    assert not loaded.activation_checkpointing
    # the tokenizer: its encoder and decoder are the stacks
    tokenizer = tokenizer_training_model().tokenizer
    assert set_activation_checkpointing(tokenizer) == 2
    assert "activation" not in json.dumps(tokenizer.to_config())


@pytest.mark.parametrize("module", [nn.Linear(3, 3), PatchGANDiscriminator(width=4, num_layers=1)])
def test_a_module_without_blocks_is_refused(module):
    with pytest.raises(ValueError, match=f"{type(module).__name__} has no transformer blocks"):
        set_activation_checkpointing(module)


# -- the runner: applied at registration, refused without blocks, free on resume ------------
def runner(out_dir, **run) -> Runner:
    section = build_config(RunSection, {"out_dir": str(out_dir), "max_steps": 4, "log_every": 2, "ckpt_every": 2,
                                        "device": "cpu", **run})
    return Runner(section, {"run": config_to_dict(section)}, init_distributed("cpu"), global_batch=4)


def test_the_runner_switches_registered_models_and_refuses_one_without_blocks(tmp_path):
    run = runner(tmp_path, activation_checkpointing=True)
    net = run.add_model(SiT.from_config(GENERATOR), optim=OptimSection(), ema_decay=0.9)
    assert net.module.activation_checkpointing and not net.ema.activation_checkpointing  # the export is left alone
    patchgan = PatchGANDiscriminator(width=4, num_layers=1)
    run.add_discriminator(patchgan, optim=OptimSection())  # no blocks: left as it is
    assert not block_stacks(patchgan)
    with pytest.raises(ValueError, match=r"run.activation_checkpointing is true, but the model \(Linear\) has no "
                                         "transformer blocks to recompute"):
        runner(tmp_path / "b", activation_checkpointing=True).add_model(nn.Linear(2, 2), optim=OptimSection())
    assert not runner(tmp_path / "c").add_model(SiT.from_config(GENERATOR), optim=OptimSection()).module \
        .activation_checkpointing


class VelocityTask:
    def __init__(self, net):
        self.net = net

    def training_step(self, batch, step, rng):
        x, y = batch
        t, noise = rng.rand(), rng.randn(8, 4)
        xt = (1 - t)[:, None, None] * x + t[:, None, None] * noise
        return StepLosses(model=(self.net(xt, t, y) - (noise - x)).square().mean())

    def sample_images(self, step):
        return None


def train_sit(out_dir, max_steps: int, **run) -> dict[str, torch.Tensor]:
    r = runner(out_dir, max_steps=max_steps, **run)
    # in eval mode, as the generator trainer trains: the network draws nothing from the global generator
    sit = SiT.from_config(GENERATOR).eval()
    net = r.add_model(sit, optim=OptimSection(lr=1e-2), ema_decay=EMASection().decay)
    g = torch.Generator().manual_seed(0)
    r.fit(VelocityTask(net.wrapped), TensorDataset(torch.randn(16, 8, 4, generator=g), torch.arange(16) % 10))
    return load_checkpoint(list_checkpoints(out_dir / "checkpoints")[-1][1])


def test_the_key_round_trips_and_may_change_on_resume(tmp_path):
    assert "run.activation_checkpointing" in FREE_ON_RESUME
    whole = train_sit(tmp_path / "whole", 4)
    train_sit(tmp_path / "resumed", 2)
    resumed = train_sit(tmp_path / "resumed", 4, activation_checkpointing=True)  # switched on mid-run
    assert resumed["config"]["run"]["activation_checkpointing"] is True
    saved = yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())["run"]
    assert build_config(RunSection, saved).activation_checkpointing is True
    for key, value in whole["modules"]["model"].items():
        torch.testing.assert_close(resumed["modules"]["model"][key], value, rtol=0, atol=0, msg=key)


# -- DDP and torch.compile (slow) -----------------------------------------------------------
@pytest.mark.slow
def test_two_processes_with_recomputed_blocks_train_like_two_without(synthetic_fashion_mnist, tmp_path):
    """tiny-maetok under torchrun (2 CPU processes, DDP) with drop path: the same weights after 3 steps
    with and without activation checkpointing, the DINO discriminator included."""
    args = ["train-tokenizer", "--config", "tiny-maetok", f"data.images={synthetic_fashion_mnist}",
            "data.batch_size=4", "samples.num_images=2", "loss.perceptual_weight=0", "gan.start_step=1",
            "run.max_steps=3", "run.ckpt_every=3", "model.enc_drop_path_rate=0.3", "model.dec_drop_path_rate=0.3"]
    states = {}
    for on in (False, True):
        out = tmp_path / f"ckpt-{on}"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "ctok", *args, f"run.out_dir={out}", f"run.activation_checkpointing={str(on).lower()}"],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        states[on] = load_checkpoint(list_checkpoints(out / "checkpoints")[-1][1])
    for module in ("model", "discriminator"):
        for key, value in states[False]["modules"][module].items():
            torch.testing.assert_close(states[True]["modules"][module][key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{module}.{key}: {m}")


@pytest.mark.slow
def test_compiled_recomputation_gives_the_eager_gradients():
    torch.manual_seed(0)
    model = SiT.from_config(GENERATOR).eval()  # as the generator trainer trains; no random draws to differ
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    compiled_model = copy.deepcopy(model)
    set_activation_checkpointing(compiled_model)
    compiled = torch.compile(compiled_model)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(6, 8, 4, generator=g), torch.rand(6, generator=g), torch.randint(0, 10, (6,), generator=g)
    for m in (model, compiled):
        torch.manual_seed(0)
        m(x, t, y).square().mean().backward()
    for name, grad in grads(model).items():
        torch.testing.assert_close(compiled_model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
