"""One tokenizer training step against a hand computation of every loss term.

``TokenizerTask.training_step`` runs on shrunken tiny-maetok / tiny-softvq tokenizers with
deterministic stand-ins for LPIPS, the feature teachers and the discriminator's network; each
term of L_G and L_D is recomputed here from the outputs the step's forward pass produced.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ctok.features.hog import hog_feature_dim, hog_patch_targets
from ctok.losses.alignment import alignment_projection
from ctok.models.auxiliary_decoders import AuxiliaryDecoders
from ctok.models.tokenizer import Tokenizer
from ctok.training.config import load_config
from ctok.training.masking import MaskSchedule
from ctok.training.sections import RunSection
from ctok.training.sharding import BatchRandom, BatchSplit
from ctok.training.task import StepLosses, TrainedModule
from ctok.training.tokenizer import DiscriminatorObjective, TokenizerTask, TokenizerTrainingModel
from ctok.training.tokenizer_config import (
    AlignmentSection,
    AuxiliarySection,
    DataSection,
    GANSection,
    LossSection,
    TokenizerTrainConfig,
    tokenizer_config,
)
from ctok.training.tokenizer_setup import init_linear_xavier

BATCH, PATCH, TEACHER_WIDTHS = 4, 8, {"dinov2": 6, "siglip": 5}
GAN_START = 6
# Every weight differs from 1 and from the others, so a weight that is ignored or swapped shows.
LOSS = dict(reconstruction_weight=1.7, perceptual_weight=0.9, perceptual_warmup=8)
GAN = dict(weight=0.4, start_step=GAN_START, lecam_weight=0.3, consistency_weight=2.5)
AUX = dict(hog_weight=0.8, dinov2_weight=0.6, siglip_weight=0.35)
ALIGN_WEIGHT = 0.15


class PooledDistance(nn.Module):
    """LPIPS stand-in: a perceptual-like distance that is neither the L1 nor the L2 of the pixels."""

    def forward(self, images, reconstructions):
        return F.avg_pool2d(images - reconstructions, 4).abs().sqrt().mean()


class PatchTeacher(nn.Module):
    """Frozen feature teacher stand-in: a fixed linear map of each 8-px patch, (B, P, width)."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, PATCH, stride=PATCH).requires_grad_(False)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)


class Recorder(nn.Module):
    """Calls the training model as the task's ``model`` and keeps what went in and came out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, images, mask, targets):
        out = self.model(images, mask, targets)
        self.calls.append(SimpleNamespace(images=images, mask=mask, out=out))
        return out


@dataclass
class Setup:
    cfg: TokenizerTrainConfig
    task: TokenizerTask
    recorder: Recorder
    model: TokenizerTrainingModel
    critic: nn.Module
    lpips: nn.Module
    teachers: dict


def _tokenizer(kind: str) -> Tokenizer:
    # The packaged tiny configs, shrunk to one block of width 32 (two heads of 16, as RoPE needs
    # a head width divisible by 4); SoftVQ gets 8 tokens so that alignment repeats each twice.
    model = load_config(TokenizerTrainConfig, f"tiny-{kind}").model
    model.update(encoder_size=[32, 1, 2], decoder_size=[32, 1, 2])
    if kind == "softvq":
        model.update(num_latent_tokens=8)
    return Tokenizer.from_config(tokenizer_config(model))


@pytest.fixture
def make_setup():
    """``make_setup(kind, reconstruction=..., adaptive_weight=...)``: a task with stub networks."""

    def make(kind: str, *, reconstruction: str = "mse", adaptive_weight: bool = True) -> Setup:
        torch.manual_seed(0)
        tokenizer = _tokenizer(kind)
        teachers = {name: PatchTeacher(width) for name, width in TEACHER_WIDTHS.items()}
        projection = auxiliary = None
        if kind == "maetok":
            targets = {"hog": (hog_feature_dim(patch_size=PATCH), "mse"),
                       **{name: (width, "cosine") for name, width in TEACHER_WIDTHS.items()}}
            auxiliary = AuxiliaryDecoders(targets, image_size=32, patch_size=PATCH, num_latent_tokens=16,
                                          latent_dim=8, width=16, depth=1, num_heads=2)
        else:
            projection = alignment_projection(8, TEACHER_WIDTHS["dinov2"], hidden_dim=16)
        model = TokenizerTrainingModel(tokenizer, projection, auxiliary).train()
        # Xavier everywhere: the zero-initialised MoVQ modulations would hide the latents from the
        # decoders, and every term should depend on the encoder.
        init_linear_xavier(model)
        critic = nn.Conv2d(3, 1, PATCH, stride=PATCH)
        nn.init.normal_(critic.weight, std=0.3)  # real logits on both sides of the hinge margin
        objective = DiscriminatorObjective(critic, loss="hinge", lecam_weight=GAN["lecam_weight"],
                                           consistency_weight=GAN["consistency_weight"], diffaugment=False)
        cfg = TokenizerTrainConfig(
            run=RunSection(out_dir="unused", max_steps=100, seed=3), data=DataSection(flip=True), model={},
            loss=LossSection(reconstruction=reconstruction, **LOSS),
            gan=GANSection(adaptive_weight=adaptive_weight, diffaugment=False, **GAN),
            auxiliary=AuxiliarySection(enabled=kind == "maetok", **AUX),
            alignment=AlignmentSection(enabled=kind == "softvq", weight=ALIGN_WEIGHT, hidden_dim=16),
        )
        # An annealed schedule that stays at 0.5 for these steps: half of the 16 patches masked.
        masks = MaskSchedule(0.4, 0.6, schedule="anneal", start=0.5, steps=10**9) if tokenizer.masks_tokens else None
        recorder = Recorder(model)
        lpips = PooledDistance()
        # the recorder stands where the runner's DDP wrapper would; the critic is called outside it
        task = TokenizerTask(cfg, TrainedModule(module=model, wrapped=recorder),
                             TrainedModule(module=objective, wrapped=objective), lpips, teachers, masks,
                             torch.zeros(1, 3, 32, 32))
        return Setup(cfg, task, recorder, model, critic, lpips, teachers)

    return make


def _run_step(setup: Setup, step: int) -> StepLosses:
    torch.manual_seed(1)
    images = torch.rand(BATCH, 3, 32, 32) * 2 - 1
    rng = BatchRandom(seed=3, step=step, split=BatchSplit(BATCH, 1, 1, 0), micro_step=0, device="cpu")
    out = setup.task.training_step((images,), step, rng)
    seen = setup.recorder.calls[-1].images
    # data.flip: each sample is the original or its mirror image, and this seed flips some but not all.
    flipped = [torch.equal(seen[i], images[i].flip(-1)) for i in range(BATCH)]
    assert all(f or torch.equal(seen[i], images[i]) for i, f in enumerate(flipped))
    assert 0 < sum(flipped) < BATCH
    return out


def _expected_terms(setup: Setup, step: int) -> dict:
    """Every term of L_G and L_D computed here from the step's recorded forward pass."""
    call = setup.recorder.calls[-1]
    x, mask, fwd = call.images, call.mask, call.out
    cfg, tok = setup.cfg, setup.model.tokenizer
    rec = fwd.rec
    terms = {"rec": ((rec - x).square() if cfg.loss.reconstruction == "mse" else (rec - x).abs()).mean(),
             "lpips": setup.lpips(x, rec)}
    # LPIPS ramps linearly from 0 over its warm-up.
    perceptual_weight = LOSS["perceptual_weight"] * min(1.0, step / LOSS["perceptual_warmup"])
    nll = LOSS["reconstruction_weight"] * terms["rec"] + perceptual_weight * terms["lpips"]
    total = nll
    if tok.variant == "softvq":
        # Entropy of the soft assignments at temperature 0.01: per-row entropy minus that of the mean;
        # the codebook is detached inside the logits, so this term does not move it.
        q = tok.quantize
        z = tok.quant_conv(tok.encoder(x))
        groups = F.normalize(z.view(BATCH, q.num_codebooks, -1, z.shape[-1]), dim=-1)
        codebook = F.normalize(q.embedding, dim=-1).detach()
        logits = torch.einsum("bgnd,gkd->bgnk", groups, codebook).reshape(-1, q.codebook_size) / 0.01
        p = F.softmax(logits, dim=-1)
        mean_p = p.mean(0)
        per_row = -(p * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
        terms["entropy"] = 0.01 * (per_row + (mean_p * torch.log(mean_p + 1e-6)).sum())
        # Alignment: each of the 8 projected tokens stands for 2 consecutive teacher patches.
        teacher = setup.teachers["dinov2"](x)
        projected = setup.model.projection(fwd.z).repeat_interleave(teacher.shape[1] // fwd.z.shape[1], dim=1)
        terms["align"] = -F.cosine_similarity(projected, teacher, dim=-1).mean()
        total = total + terms["entropy"] + ALIGN_WEIGHT * terms["align"]
    else:
        # Auxiliary decoders: mean over the masked patches only; MSE for HOG, negative cosine otherwise.
        weights = mask.float()
        targets = {"hog": hog_patch_targets(x, patch_size=PATCH), **{n: t(x) for n, t in setup.teachers.items()}}
        for name, target in targets.items():
            prediction = setup.model.auxiliary.decoders[name](fwd.z)
            per_patch = ((prediction - target).square().mean(-1) if name == "hog"
                         else -F.cosine_similarity(prediction, target, dim=-1))
            terms[f"aux/{name}"] = (per_patch * weights).sum() / weights.sum()
            total = total + AUX[f"{name}_weight"] * terms[f"aux/{name}"]
    if step >= GAN_START:
        terms["gan/generator"] = -setup.critic(rec).mean()
        if cfg.gan.adaptive_weight:
            # ||grad nll|| / (||grad L_gen|| + 1e-4) at the decoder's last layer, a constant.
            last = tok.decoder.to_pixel.model.weight
            g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
            g_gan = torch.autograd.grad(terms["gan/generator"], last, retain_graph=True)[0]
            terms["gan/adaptive_weight"] = (g_nll.norm() / (g_gan.norm() + 1e-4)).detach()
        else:
            terms["gan/adaptive_weight"] = torch.tensor(1.0)
        total = total + terms["gan/adaptive_weight"] * GAN["weight"] * terms["gan/generator"]
        # L_D on the same images and detached reconstructions; the LeCAM anchors start at 0 and
        # have taken one update (decay 0.999) from this batch's mean logits.
        real, fake = setup.critic(x), setup.critic(rec.detach())
        terms["disc/adversarial"] = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
        anchor_real, anchor_fake = 0.001 * real.mean(), 0.001 * fake.mean()
        terms["disc/lecam"] = (torch.relu(real - anchor_fake).square().mean()
                               + torch.relu(anchor_real - fake).square().mean())
    terms["loss"] = total
    return terms


@pytest.mark.parametrize("kind, reconstruction", [("maetok", "mse"), ("softvq", "l1")])
@pytest.mark.parametrize("step", [GAN_START - 1, GAN_START])
def test_generator_loss_is_the_weighted_sum_of_its_terms(make_setup, kind, reconstruction, step):
    setup = make_setup(kind, reconstruction=reconstruction)
    out = _run_step(setup, step)
    expected = _expected_terms(setup, step)
    logged = out.logged()
    for name, value in expected.items():
        torch.testing.assert_close(logged[name], value, msg=lambda m: f"{name}: {m}")
    # The GAN starts at gan.start_step exactly: before it neither the generator term nor a
    # discriminator loss exists (the runner then leaves the discriminator alone).
    gan_keys = {"gan/generator", "gan/adaptive_weight", "loss/discriminator"}
    assert gan_keys <= set(logged) if step >= GAN_START else not gan_keys & set(logged)
    assert (out.discriminator is not None) == (step >= GAN_START)
    # Same value is not enough: the loss must also reach the parameters as the formula does.
    params = [p for p in setup.model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.model, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(expected["loss"], params, retain_graph=True, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_masked_step_masks_the_scheduled_share_of_patches(make_setup):
    setup = make_setup("maetok")
    out = _run_step(setup, 3)
    mask = setup.recorder.calls[-1].mask
    assert float(out.logs["mask_ratio"]) == pytest.approx(0.5 * (1 - 3 / 10**9))
    assert mask.shape == (BATCH, 16) and mask.sum(1).tolist() == [8] * BATCH
    assert len({tuple(row.tolist()) for row in mask}) > 1  # drawn per sample, not one mask for all


def test_a_step_whose_annealed_ratio_reached_zero_is_unmasked(make_setup):
    """Regression: the tokenizer drew a published 40-60% mask itself once the annealed ratio was 0."""
    setup = make_setup("maetok")
    setup.task.masks = MaskSchedule(0.4, 0.6, schedule="anneal", start=0.6, steps=2)
    out = _run_step(setup, 3)
    call = setup.recorder.calls[-1]
    assert float(out.logs["mask_ratio"]) == 0.0 and call.mask is None
    with torch.no_grad():
        assert torch.equal(call.out.rec, setup.model.tokenizer.eval()(call.images))


@pytest.mark.parametrize("kind", ["maetok", "softvq"])
def test_discriminator_loss_formula_and_isolation(make_setup, kind):
    setup = make_setup(kind)
    out = _run_step(setup, GAN_START + 2)
    expected = _expected_terms(setup, GAN_START + 2)
    # L_D = w_gan (hinge + w_lecam LeCAM) + w_cr CR: the consistency term is not scaled by w_gan.
    cr = out.logs["disc/consistency"]
    assert cr > 0
    adversarial = expected["disc/adversarial"] + GAN["lecam_weight"] * expected["disc/lecam"]
    torch.testing.assert_close(out.discriminator, GAN["weight"] * adversarial + GAN["consistency_weight"] * cr)
    # It trains the critic only: the reconstructions it saw were detached from the tokenizer.
    params = [p for p in setup.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.discriminator, params, retain_graph=True, allow_unused=True)
    assert all(g is None for g in grads)
    assert torch.autograd.grad(out.discriminator, setup.critic.weight, retain_graph=True)[0].any()


def test_without_adaptive_weight_the_gan_term_has_its_plain_weight(make_setup):
    setup = make_setup("maetok", adaptive_weight=False)
    out = _run_step(setup, GAN_START)
    expected = _expected_terms(setup, GAN_START)
    assert float(out.logs["gan/adaptive_weight"]) == 1.0
    torch.testing.assert_close(out.model, expected["loss"])
