"""Discriminators: global batch norm (one process and two), the DINO feature heads, PatchGAN."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ctok.models.discriminators import DinoDiscriminator, GlobalBatchNorm, PatchGANDiscriminator


def test_global_batch_norm_is_batch_norm_in_one_process():
    torch.manual_seed(0)
    norm = GlobalBatchNorm(5, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(6, 5, 7, dtype=torch.float64) * 3 + 1
    expected = F.batch_norm(x, None, None, norm.weight.double(), norm.bias.double(), training=True, eps=1e-6)
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.float()).dtype == torch.float32


def _two_process_batch_norm(rank: int, store: str, x: torch.Tensor, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    norm = GlobalBatchNorm(4)
    part = x[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    y = norm(part)
    (y * torch.arange(4.0).view(1, 4, 1)).square().mean().backward()
    for p in norm.parameters():
        dist.all_reduce(p.grad)
        p.grad /= 2
    out[rank] = (y.detach(), part.grad, norm.weight.grad, norm.bias.grad)
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batch_norm_spans_processes(tmp_path):
    """Two processes with three samples each compute what one process with all six does, gradients included."""
    torch.manual_seed(1)
    x = torch.randn(6, 4, 5)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_two_process_batch_norm, args=(str(tmp_path / "store"), x, out), nprocs=2)

    torch.manual_seed(0)
    norm = GlobalBatchNorm(4)
    whole = x.clone().requires_grad_(True)
    y = norm(whole)
    # Each process averaged over its half; averaging the two halves' gradients is this loss.
    (y * torch.arange(4.0).view(1, 4, 1)).square().mean().backward()
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), y.detach())
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), whole.grad * 2)  # local means: 3, not 6, samples
    torch.testing.assert_close(out[0][2], norm.weight.grad)
    torch.testing.assert_close(out[0][3], norm.bias.grad)


def _small_vit():
    """DINO ViT-S/16's layout at test size: 4 blocks of width 192, 64-px input."""
    return timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=0)


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return _small_vit()


def test_dino_discriminator_shapes_and_frozen_backbone(tiny_vit):
    disc = DinoDiscriminator(tiny_vit, input_size=64, key_blocks=(1, 3))
    images = torch.rand(3, 3, 64, 64, requires_grad=True) * 2 - 1
    images.retain_grad()
    logits = disc(images)
    assert logits.shape == (3, 3 * 16)  # three levels (embedding, blocks 2 and 4) x 16 tokens
    logits.mean().backward()
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert images.grad.abs().sum() > 0  # the generator learns through the frozen backbone
    trainable = {n for n, p in disc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("heads.") for n in trainable)
    disc.train()
    assert disc.heads.training and not disc.backbone.training


def test_dino_discriminator_reads_normalised_tokens(tiny_vit):
    disc = DinoDiscriminator(tiny_vit, input_size=64, key_blocks=(1,))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    levels = disc.token_features(images)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((images + 1) / 2 - mean) / std
    with torch.no_grad():
        tokens = tiny_vit.patch_embed(x)
        tokens = torch.cat([tiny_vit.cls_token.expand(2, -1, -1), tokens], dim=1) + tiny_vit.pos_embed
        after = tiny_vit.blocks[1](tiny_vit.blocks[0](tokens))
    torch.testing.assert_close(levels[0], (tokens[:, 1:] + tokens[:, :1]).transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(levels[1], (after[:, 1:] + after[:, :1]).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_dino_discriminator_resizes_to_its_input_size(tiny_vit):
    disc = DinoDiscriminator(tiny_vit, input_size=64, key_blocks=(0,))
    assert disc(torch.rand(1, 3, 128, 128)).shape == (1, 2 * 16)
    assert disc(torch.rand(1, 3, 32, 32)).shape == (1, 2 * 16)


def test_dino_heads_are_spectrally_normalised(tiny_vit):
    disc = DinoDiscriminator(tiny_vit, input_size=64, key_blocks=(0,))
    conv = disc.heads[0][0][0]
    for _ in range(50):  # each training forward runs one power iteration
        conv(torch.zeros(1, 192, 4))
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert sigma.item() == pytest.approx(1.0, rel=1e-3)


def test_dino_discriminator_rejects_bad_settings(tiny_vit):
    with pytest.raises(ValueError, match=r"key_blocks \(4,\) must lie in \[0, 3\]"):
        DinoDiscriminator(tiny_vit, key_blocks=(4,))
    no_class = _small_vit()
    no_class.num_prefix_tokens = 0
    with pytest.raises(ValueError, match="class token"):
        DinoDiscriminator(no_class)


def test_patchgan_grid():
    disc = PatchGANDiscriminator(width=8, num_layers=3)
    assert disc(torch.rand(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert disc(torch.rand(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # pix2pix's 70x70-receptive-field grid


class FixedDraws:
    """A ``shared_rand`` that always returns ``values`` and records how many numbers were asked for."""

    def __init__(self, *values: float):
        self.values = torch.tensor(values)
        self.calls = []

    def __call__(self, *shape: int) -> torch.Tensor:
        self.calls.append(shape)
        return self.values[: shape[0]]


@pytest.fixture(scope="module")
def dino_224():
    """The recipe's geometry (224-px input, patch 16) on a 2-block tiny ViT."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=0)
    return DinoDiscriminator(vit, input_size=224, key_blocks=(1,))


def _backbone_input(disc: DinoDiscriminator, images: torch.Tensor, draws) -> torch.Tensor:
    """What the frozen ViT reads when training shows ``images`` to the discriminator."""
    from ctok.training.tokenizer import judge

    seen = []
    hook = disc.backbone.patch_embed.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        judge(disc, images, draws)
    finally:
        hook.remove()
    return seen[0]


def _imagenet(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def test_dino_discriminator_crops_one_window_of_larger_images(dino_224):
    images = torch.rand(3, 3, 256, 256) * 2 - 1
    draws = FixedDraws(0.2, 0.5, 0.9)  # 0.2 < 1/2: crop; top = floor(0.5 x 33), left = floor(0.9 x 33)
    seen = _backbone_input(dino_224, images, draws)
    assert draws.calls == [(3,)]
    torch.testing.assert_close(seen, _imagenet(images)[..., 16:240, 29:253], rtol=0, atol=1e-6)


def test_dino_discriminator_otherwise_area_resizes(dino_224):
    images = torch.rand(3, 3, 256, 256) * 2 - 1
    seen = _backbone_input(dino_224, images, FixedDraws(0.7, 0.5, 0.9))  # 0.7 >= 1/2: resize
    torch.testing.assert_close(seen, F.interpolate(_imagenet(images), size=(224, 224), mode="area"))


def test_dino_discriminator_reads_input_size_images_unchanged_and_draws_nothing(dino_224):
    images = torch.rand(2, 3, 224, 224) * 2 - 1
    draws = FixedDraws(0.2, 0.5, 0.9)
    torch.testing.assert_close(_backbone_input(dino_224, images, draws), _imagenet(images))
    assert draws.calls == []


def test_dino_crop_probability_bounds_the_branches():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1, num_classes=0)
    images = torch.rand(1, 3, 96, 96)
    never = DinoDiscriminator(vit, input_size=64, key_blocks=(0,), crop_prob=0.0)
    always = DinoDiscriminator(vit, input_size=64, key_blocks=(0,), crop_prob=1.0)
    assert never.random_view(images, FixedDraws(0.0, 0.5, 0.5)) is images
    torch.testing.assert_close(always.random_view(images, FixedDraws(0.999, 0.0, 0.999)), images[..., :64, 32:])
    with pytest.raises(ValueError, match=r"crop_prob must lie in \[0, 1\], got 1.5"):
        DinoDiscriminator(vit, input_size=64, key_blocks=(0,), crop_prob=1.5)
