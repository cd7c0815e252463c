"""Pretrained networks: finding their files (override, hub cache), offline errors, loading them."""
from __future__ import annotations

import huggingface_hub.constants as hub_constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from ctok.models.teachers import (
    ALEXNET,
    DINO_DISCRIMINATOR,
    DINOV2_TEACHER,
    SIGLIP_TEACHER,
    VGG16,
    MissingWeightsError,
    WeightsRequest,
    feature_teacher,
    load_pretrained_encoder,
    locate,
    locate_all,
    torchvision_trunk,
)
from ctok.models.vit import VIT_SIZES, ViTEncoder

TINY = "vit_tiny_patch16_224"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """An offline machine with nothing downloaded."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def _save_random_timm(name: str, path, **kwargs):
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.state_dict()


def test_every_missing_file_is_named_at_once(empty_caches):
    requests = [
        WeightsRequest("DINOv2 teacher", DINOV2_TEACHER, config_key="teachers.dinov2.file"),
        WeightsRequest("SigLIP teacher", SIGLIP_TEACHER, config_key="teachers.siglip.file"),
        WeightsRequest("LPIPS trunk", VGG16, config_key="loss.lpips_vgg_file"),
        WeightsRequest("DINO discriminator", DINO_DISCRIMINATOR, file=str(empty_caches / "nope.pth"),
                       config_key="gan.dino_file"),
    ]
    with pytest.raises(MissingWeightsError) as err:
        locate_all(requests)
    message = str(err.value)
    assert message.startswith("4 pretrained network(s) unavailable")
    for expected in ("huggingface-cli download timm/vit_large_patch14_dinov2.lvd142m model.safetensors",
                     "timm/vit_so400m_patch14_siglip_224.webli", "teachers.dinov2.file=/path/to/the/file",
                     "https://download.pytorch.org/models/vgg16-397923af.pth",
                     str(empty_caches / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"),
                     f"gan.dino_file={empty_caches / 'nope.pth'} does not exist", "random_init_pretrained"):
        assert expected in message


def test_a_cached_hub_file_is_found_offline(empty_caches):
    cfg = timm.models.get_pretrained_cfg(TINY)
    snapshot = empty_caches / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    state = _save_random_timm(TINY, snapshot / "model.safetensors")
    path = locate(WeightsRequest("teacher", TINY))
    assert path == snapshot / "model.safetensors"
    teacher = feature_teacher(TINY, image_size=224, patch_size=16, weights=path)
    torch.testing.assert_close(teacher.vit.blocks[2].mlp.fc1.weight, state["blocks.2.mlp.fc1.weight"])


def test_local_file_wins_and_features_are_patch_tokens(tmp_path):
    file = tmp_path / "teacher.safetensors"
    state = _save_random_timm(TINY, file)
    teacher = feature_teacher(TINY, image_size=64, patch_size=16, weights=locate(WeightsRequest("t", TINY, str(file))))
    torch.testing.assert_close(teacher.vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert teacher.vit.pos_embed.shape == (1, 17, 192)  # resampled to 64 px
    assert teacher.feature_dim == 192 and teacher.num_patches == 16
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    mean = torch.tensor(teacher.vit.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(teacher.vit.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = teacher.vit.forward_features(((images + 1) / 2 - mean) / std)[:, 1:]
    torch.testing.assert_close(teacher(images), expected)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_vgg16_trunk_loads_torchvision_keys(tmp_path):
    from torchvision.models import vgg

    torch.manual_seed(0)
    trunk = vgg.make_layers(vgg.cfgs["D"])
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()} | {"classifier.0.bias": torch.zeros(3)},
               tmp_path / "vgg16.pth")
    loaded = torchvision_trunk(VGG16, tmp_path / "vgg16.pth")
    torch.testing.assert_close(loaded[28].weight, trunk[28].weight)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_alexnet_trunk_loads_torchvision_keys_and_unknown_trunks_are_refused(tmp_path):
    from torchvision.models import AlexNet

    torch.manual_seed(0)
    trunk = AlexNet().features
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, tmp_path / "alexnet.pth")
    loaded = torchvision_trunk(ALEXNET, tmp_path / "alexnet.pth")
    torch.testing.assert_close(loaded[10].weight, trunk[10].weight)
    with pytest.raises(ValueError, match="no torchvision trunk 'resnet50'"):
        torchvision_trunk("resnet50", None)


@pytest.mark.slow
def test_encoder_initialised_from_dinov2(tmp_path):
    file = tmp_path / "dinov2.safetensors"
    name = "vit_small_patch14_dinov2.lvd142m"
    state = _save_random_timm(name, file)
    encoder = ViTEncoder(image_size=32, patch_size=16, size=VIT_SIZES["small"], num_latent_tokens=4)
    load_pretrained_encoder(encoder.model, name, image_size=32, patch_size=16, weights=file)
    torch.testing.assert_close(encoder.model.blocks[5].attn.qkv.weight, state["blocks.5.attn.qkv.weight"])
    torch.testing.assert_close(encoder.model.blocks[5].ls2.gamma, state["blocks.5.ls2.gamma"])
    # Patch embedding and positions are resampled from DINOv2's 14 px / 518 px to 16 px / 32 px.
    resampled = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)),
                                  img_size=32, patch_size=16, num_classes=0)
    torch.testing.assert_close(encoder.model.patch_embed.proj.weight, resampled.patch_embed.proj.weight)
    torch.testing.assert_close(encoder.model.pos_embed, resampled.pos_embed)

    wrong = ViTEncoder(image_size=32, patch_size=16, size=VIT_SIZES["tiny"], num_latent_tokens=4)
    with pytest.raises(ValueError, match="does not fit the encoder.*shape mismatches"):
        load_pretrained_encoder(wrong.model, name, image_size=32, patch_size=16, weights=file)


def _teacher_inputs(overrides: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images and what each feature teacher of tiny-maetok (DINOv2 and SigLIP stand-ins) was fed."""
    from ctok.models.tokenizer import TokenizerConfig
    from ctok.training.config import load_config
    from ctok.training.tokenizer_config import TokenizerTrainConfig, tokenizer_config
    from ctok.training.tokenizer_setup import build_teachers

    cfg = load_config(TokenizerTrainConfig, "tiny-maetok", overrides)
    teachers = build_teachers(cfg, TokenizerConfig(**tokenizer_config(cfg.model)), found={})
    assert sorted(teachers) == ["dinov2", "siglip"]
    seen = {}
    for name, teacher in teachers.items():
        teacher.vit.patch_embed.register_forward_pre_hook(lambda _, args, name=name: seen.update({name: args[0]}))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    for teacher in teachers.values():
        teacher(images)
    return images, seen


def test_teachers_get_imagenet_normalised_images_siglip_included():
    """MAETok's code feeds SigLIP ImageNet statistics too, not SigLIP's own 0.5 / 0.5."""
    images, seen = _teacher_inputs([])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for name in ("dinov2", "siglip"):
        torch.testing.assert_close(seen[name], ((images + 1) / 2 - mean) / std, msg=lambda m: f"{name}: {m}")


def test_siglip_normalization_option_feeds_siglip_its_own_statistics():
    images, seen = _teacher_inputs(["teachers.siglip_normalization=siglip"])
    torch.testing.assert_close(seen["siglip"], ((images + 1) / 2 - 0.5) / 0.5)  # i.e. the [-1, 1] images
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["dinov2"], ((images + 1) / 2 - mean) / std)  # DINOv2 is not affected


def test_unknown_teacher_normalization_is_refused():
    from ctok.training.config import load_config
    from ctok.training.tokenizer_config import TokenizerTrainConfig

    with pytest.raises(ValueError, match="siglip_normalization"):
        load_config(TokenizerTrainConfig, "tiny-maetok", ["teachers.siglip_normalization=clip"])
    with pytest.raises(ValueError, match="teacher input normalization must be one of"):
        feature_teacher(TINY, image_size=32, patch_size=16, weights=None, normalization="clip")
