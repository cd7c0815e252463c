"""Each tokenizer-training loss against its formula, computed independently."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from ctok.losses import (
    DiffAugment,
    LeCAM,
    LPIPSLoss,
    adaptive_generator_weight,
    alignment_loss,
    alignment_projection,
    consistency_loss,
    gan_losses,
    gan_weight_at,
    hinge_discriminator_loss,
    hinge_generator_loss,
    negative_cosine,
    non_saturating_discriminator_loss,
    non_saturating_generator_loss,
    perceptual_weight_at,
    repeat_tokens_to_patches,
    strong_augment,
)
from ctok.training.config import build_config
from ctok.training.sharding import BatchRandom, BatchSplit
from ctok.training.task import TrainedModule
from ctok.training.tokenizer import DiscriminatorObjective, TokenizerForward, TokenizerTask, TokenizerTrainConfig

REAL = [2.0, 0.5, -1.0, 0.0]
FAKE = [-2.0, 0.3, 1.0, -0.5]


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# (discriminator loss, generator loss) of each named GAN objective on REAL / FAKE, by hand.
GAN_FORMULAS = {
    "hinge": (0.5 * (sum(max(0.0, 1 - r) for r in REAL) / 4 + sum(max(0.0, 1 + f) for f in FAKE) / 4),
              -sum(FAKE) / 4),
    "non_saturating": (0.5 * (-sum(math.log(_sigmoid(r)) for r in REAL) / 4
                              - sum(math.log(1 - _sigmoid(f)) for f in FAKE) / 4),
                       -sum(math.log(_sigmoid(f)) for f in FAKE) / 4),
}


@pytest.mark.parametrize("kind, functions", [
    ("hinge", (hinge_discriminator_loss, hinge_generator_loss)),
    ("non_saturating", (non_saturating_discriminator_loss, non_saturating_generator_loss)),
])
def test_gan_losses_follow_their_formulas_called_directly_and_by_name(kind, functions):
    expected_d, expected_g = GAN_FORMULAS[kind]
    for discriminator_loss, generator_loss in (functions, gan_losses(kind)):
        assert discriminator_loss(_t(REAL), _t(FAKE)).item() == pytest.approx(expected_d)
        assert generator_loss(_t(FAKE)).item() == pytest.approx(expected_g)


def test_every_gan_loss_name_has_a_formula_here():
    from ctok.losses.adversarial import DISCRIMINATOR_LOSSES, GENERATOR_LOSSES

    assert set(DISCRIMINATOR_LOSSES) == set(GENERATOR_LOSSES) == set(GAN_FORMULAS)
    with pytest.raises(ValueError, match="'hinge', 'non_saturating'.*'wasserstein'"):
        gan_losses("wasserstein")


def test_lecam_anchors_and_penalty():
    lecam = LeCAM(decay=0.9)
    lecam.update(_t(REAL), _t(FAKE))
    lecam.update(_t([1.0]), _t([-1.0]))
    mean_real, mean_fake = sum(REAL) / 4, sum(FAKE) / 4
    anchor_real = 0.9 * (0.1 * mean_real) + 0.1 * 1.0
    anchor_fake = 0.9 * (0.1 * mean_fake) + 0.1 * -1.0
    assert lecam.anchor_real.item() == pytest.approx(anchor_real)
    assert lecam.anchor_fake.item() == pytest.approx(anchor_fake)
    expected = (sum(max(0.0, r - anchor_fake) ** 2 for r in REAL) / 4
                + sum(max(0.0, anchor_real - f) ** 2 for f in FAKE) / 4)
    assert lecam(_t(REAL), _t(FAKE)).item() == pytest.approx(expected, rel=1e-6)
    # The anchors travel with checkpoints.
    restored = LeCAM(decay=0.9)
    restored.load_state_dict(lecam.state_dict())
    assert restored.anchor_real.item() == pytest.approx(anchor_real)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    rec, gan = (weight * a).sum() ** 2, (weight * b).sum()
    grad_rec = 2 * (weight * a).sum().detach() * a
    expected = grad_rec.norm() / (b.norm() + 1e-4)
    got = adaptive_generator_weight(rec, gan, weight)
    assert got.item() == pytest.approx(expected.item())
    assert not got.requires_grad and weight.grad is None  # no side effect on .grad
    # A generator loss that does not move the layer gives the clamp.
    assert adaptive_generator_weight((weight * a).sum(), (weight * 0).sum(), weight).item() == pytest.approx(1e4)


def test_weights_over_steps():
    assert [gan_weight_at(s, 0.4, 30) for s in (0, 29, 30, 31)] == [0.0, 0.0, 0.4, 0.4]
    assert [perceptual_weight_at(s, 2.0, 10) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]
    assert perceptual_weight_at(0, 1.0, 0) == 1.0


# -- LPIPS --------------------------------------------------------------------------------------
def _vgg16_trunk() -> nn.Sequential:
    from torchvision.models import vgg

    return vgg.make_layers(vgg.cfgs["D"])


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """VGG16 weights under torchvision's key names (random values stand in for ImageNet's; the
    classifier, which LPIPS never reads, is left out to keep the test fast)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in _vgg16_trunk().state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def lpips_loss(vgg_file):
    return LPIPSLoss(vgg_file)


def test_lpips_matches_its_formula(vgg_file, lpips_loss):
    import lpips

    loss = lpips_loss
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1

    trunk = _vgg16_trunk()
    state = torch.load(vgg_file, weights_only=True)
    trunk.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
    lins = torch.load(Path(lpips.__file__).parent / "weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        out, h = [], (img - shift) / scale
        for i, layer in enumerate(trunk[:30]):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    with torch.no_grad():
        per_image = sum(
            (lins[f"lin{k}.model.1.weight"] * (fx - fy).square()).sum(1).mean((1, 2))
            for k, (fx, fy) in enumerate(zip(taps(x), taps(y)))
        )
        torch.testing.assert_close(loss(x, y), per_image.mean(), rtol=1e-4, atol=1e-6)
        assert loss(x, x).item() == 0.0


def test_lpips_is_frozen_and_passes_gradients(lpips_loss):
    loss = lpips_loss
    loss.train()
    assert not loss.training and not any(p.requires_grad for p in loss.parameters())
    y = torch.zeros(1, 3, 32, 32, requires_grad=True)
    loss(torch.rand(1, 3, 32, 32), y).backward()
    assert y.grad.abs().sum() > 0


# -- DiffAugment and consistency -----------------------------------------------------------------
class FixedDraws:
    """A ``rand`` that returns given values (per sample), one list per call."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def __call__(self, *shape):
        return torch.tensor(self.draws.pop(0), dtype=torch.float32)


def test_translation_shifts_with_zero_fill():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    # max shift = 1 pixel; u -> floor(u * 3) - 1: 0.9 -> +1, 0.0 -> -1, 0.5 -> 0
    aug = DiffAugment("translation", prob=1.0)
    out = aug(x, FixedDraws([0.0, 0.0], [[0.9, 0.0], [0.5, 0.5]]))
    expected0 = torch.zeros(8, 8)
    expected0[1:, :-1] = x[0, 0, :-1, 1:]  # down by one row, left by one column
    torch.testing.assert_close(out[0, 0], expected0)
    torch.testing.assert_close(out[1], x[1])


def test_cutout_zeroes_a_square():
    x = torch.ones(1, 3, 10, 10)
    aug = DiffAugment("cutout", prob=1.0, cutout=0.2)  # 2x2 square
    out = aug(x, FixedDraws([0.0], [[0.5, 0.0]]))  # top = floor(0.5 * 11) - 1 = 4, left = -1
    zeros = (out[0, 0] == 0).nonzero().tolist()
    assert zeros == [[4, 0], [5, 0]]  # the square is clipped at the left border
    assert (out[0] == 0).sum() == 3 * 2


def test_color_follows_its_formula():
    x = torch.rand(1, 3, 4, 4)
    out = DiffAugment("color", prob=1.0)(x, FixedDraws([0.0], [[0.75, 0.25, 0.0]]))
    h = x + 0.25
    h = (h - h.mean(1, keepdim=True)) * 0.5 + h.mean(1, keepdim=True)
    h = (h - h.mean()) * 0.5 + h.mean()
    torch.testing.assert_close(out, h)


def test_augment_probability_and_policies():
    x = torch.rand(64, 3, 16, 16)
    torch.testing.assert_close(DiffAugment(prob=0.0)(x), x)
    changed = (DiffAugment("color", prob=0.5)(x) != x).flatten(1).any(1).float().mean()
    assert 0.25 < changed < 0.75
    with pytest.raises(ValueError, match="unknown DiffAugment policies \\['blur'\\]"):
        DiffAugment("color,blur")


def test_augment_is_differentiable():
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    strong_augment()(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_augment_does_not_depend_on_the_batch_split():
    """Two processes with half the batch each augment exactly as one process with all of it."""
    x = torch.rand(8, 3, 16, 16)
    whole = strong_augment()(x, BatchRandom(7, 3, BatchSplit(8, 1, 1, 0), 0, "cpu").rand)
    halves = [strong_augment()(x[4 * r:4 * r + 4], BatchRandom(7, 3, BatchSplit(8, 1, 2, r), 0, "cpu").rand)
              for r in range(2)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)


def test_consistency_loss_formula():
    x, y = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)

    def disc(img):
        return img.mean(dim=(1, 2, 3))

    aug = DiffAugment("color", prob=1.0)
    draws = [[0.0] * 3, [[1.0, 0.5, 0.5]] * 3, [0.0] * 3, [[1.0, 0.5, 0.5]] * 3]
    got = consistency_loss(disc, x, y, disc(x), disc(y), aug, FixedDraws(*draws))
    # brightness +0.5, saturation x1, contrast x1: every mean moves by exactly 0.5
    assert got.item() == pytest.approx(0.25, rel=1e-5)
    assert consistency_loss(disc, x, y, disc(x), disc(y), DiffAugment([], prob=1.0)).item() == 0.0


# -- alignment --------------------------------------------------------------------------------------
def test_tokens_repeat_over_consecutive_patches():
    tokens = torch.tensor([[[1.0], [2.0]]])
    assert repeat_tokens_to_patches(tokens, 6).flatten().tolist() == [1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="multiple of 4"):
        repeat_tokens_to_patches(torch.zeros(1, 4, 2), 10)


def test_alignment_loss_is_negative_cosine():
    torch.manual_seed(0)
    tokens, teacher = torch.randn(2, 4, 5), torch.randn(2, 16, 5)
    expected = 0.0
    for b in range(2):
        for p in range(16):
            t, f = tokens[b, p // 4], teacher[b, p]
            expected -= float(t @ f / (t.norm() * f.norm())) / 32
    assert alignment_loss(tokens, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert negative_cosine(teacher, 3 * teacher).item() == pytest.approx(-1.0)


def test_alignment_projection_layout():
    mlp = alignment_projection(32, 1024)
    assert [k for k in mlp.state_dict()] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [type(m) for m in mlp] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert mlp(torch.zeros(2, 8, 32)).shape == (2, 8, 1024)


# -- the named losses inside tokenizer training ---------------------------------------------------
def _flat_images(values) -> torch.Tensor:
    """One image per value, every pixel equal to it (so a pixel-mean critic returns ``values``)."""
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()


class PixelMeanCritic(nn.Module):
    def forward(self, images):
        return images.mean(dim=(1, 2, 3))


class FixedReconstruction(nn.Module):
    """Stands in for the training model: reconstructs every batch as ``rec``; no quantiser, no
    auxiliary decoders, no alignment."""

    def __init__(self, rec: torch.Tensor):
        super().__init__()
        self.rec = rec
        self.tokenizer = SimpleNamespace(config=SimpleNamespace(enc_patch_size=4), quantize=None)
        self.auxiliary = None

    def forward(self, images, mask, aux_targets):
        return TokenizerForward(self.rec, None, torch.zeros(()), 0.0, None, {})


@pytest.mark.parametrize("kind", sorted(GAN_FORMULAS))
def test_the_discriminator_objective_uses_the_named_loss(kind):
    objective = DiscriminatorObjective(PixelMeanCritic(), loss=kind, lecam_weight=0.0, consistency_weight=0.0,
                                       diffaugment=False)
    loss, _ = objective(_flat_images(REAL), _flat_images(FAKE), rand=None, gan_weight=0.5)
    assert loss.item() == pytest.approx(0.5 * GAN_FORMULAS[kind][0], rel=1e-6)


@pytest.mark.parametrize("reconstruction", ["mse", "l1"])
@pytest.mark.parametrize("kind", sorted(GAN_FORMULAS))
def test_a_tokenizer_step_uses_the_named_reconstruction_and_generator_losses(reconstruction, kind):
    """Inputs REAL and reconstructions FAKE (flat images): the reconstruction term is the mean
    squared or absolute difference, the generator term the named formula on the critic's FAKE."""
    cfg = build_config(TokenizerTrainConfig, {
        "run": {"out_dir": "unused", "max_steps": 1}, "data": {"flip": False}, "model": {},
        "loss": {"reconstruction": reconstruction, "reconstruction_weight": 1.0},
        "gan": {"loss": kind, "weight": 0.5, "start_step": 0, "adaptive_weight": False, "diffaugment": False},
    })
    model = FixedReconstruction(_flat_images(FAKE))
    critic = SimpleNamespace(discriminator=PixelMeanCritic())
    discriminator = TrainedModule(module=critic, wrapped=lambda *args: (torch.zeros(()), {}))
    task = TokenizerTask(cfg, TrainedModule(module=model, wrapped=model), discriminator, lpips=None, teachers={},
                         masks=None, sample_images=None)
    rng = BatchRandom(seed=0, step=0, split=BatchSplit(4, 1, 1, 0), micro_step=0, device="cpu")
    metrics = task.training_step((_flat_images(REAL),), step=0, rng=rng).logged()

    power = 2 if reconstruction == "mse" else 1
    expected_rec = sum(abs(f - r) ** power for r, f in zip(REAL, FAKE)) / 4
    expected_gen = GAN_FORMULAS[kind][1]
    assert metrics["rec"].item() == pytest.approx(expected_rec, rel=1e-6)
    assert metrics["gan/generator"].item() == pytest.approx(expected_gen, rel=1e-6)
    assert metrics["loss"].item() == pytest.approx(expected_rec + 0.5 * expected_gen, rel=1e-6)
