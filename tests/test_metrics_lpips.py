"""LPIPS as a metric: per-image values against the published definition, and the missing-weights error."""
from __future__ import annotations

import os

import pytest
import torch
from torchvision.models import vgg

from ctok.metrics import lpips
from ctok.metrics.lpips import VGG16_ENV, load_lpips_vgg

VGG_RELU_OUTPUTS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A VGG16 trunk with random weights, saved as torchvision names its ImageNet file's entries."""
    torch.manual_seed(0)
    trunk = vgg.make_layers(vgg.cfgs["D"])
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, path)
    return path, trunk.eval()


def lpips_by_definition(trunk, x, y):
    """LPIPS v0.1: ImageNet-scaled inputs, unit-normalised VGG activations, calibrated channel weights."""
    import lpips as lpips_package

    lins = torch.load(os.path.join(os.path.dirname(lpips_package.__file__), "weights", "v0.1", "vgg.pth"),
                      map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def activations(images):
        h, found = (images - shift) / scale, []
        for index, layer in enumerate(trunk):
            h = layer(h)
            if index in VGG_RELU_OUTPUTS:
                found.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return found

    total = 0
    with torch.no_grad():
        for level, (fx, fy) in enumerate(zip(activations(x), activations(y))):
            weight = lins[f"lin{level}.model.1.weight"].view(1, -1, 1, 1)
            total = total + (weight * (fx - fy).square()).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_matches_its_definition(vgg_file):
    path, trunk = vgg_file
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 48, 48, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 48, 48, generator=g)).clamp(-1, 1)
    got = lpips(x, y, vgg_weights=path)
    assert got.shape == (3,)
    torch.testing.assert_close(got, lpips_by_definition(trunk, x, y), rtol=1e-5, atol=1e-7)
    assert torch.all(got > 0)
    torch.testing.assert_close(lpips(x, x, vgg_weights=path), torch.zeros(3), rtol=0, atol=1e-7)


def test_network_is_reusable_frozen_and_found_through_the_environment(vgg_file, monkeypatch):
    path, trunk = vgg_file
    monkeypatch.setenv(VGG16_ENV, str(path))
    net = load_lpips_vgg()
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).view(2, 3, 32, 32)
    torch.testing.assert_close(lpips(x, x.flip(-1), network=net), lpips_by_definition(trunk, x, x.flip(-1)),
                               rtol=1e-5, atol=1e-7)


def test_missing_vgg_weights_offline_say_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(VGG16_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    message = str(err.value)
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert VGG16_ENV in message


def test_lpips_rejects_mismatched_or_non_rgb_inputs(vgg_file):
    path, _ = vgg_file  # the inputs are checked before any network is built
    with pytest.raises(ValueError, match="differ in shape"):
        lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 16, 16), vgg_weights=path)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lpips(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), vgg_weights=path)
