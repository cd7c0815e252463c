"""LPIPS as a metric, AlexNet and VGG: per-image values against the published definition, and the
missing-weights error."""
from __future__ import annotations

import os

import pytest
import torch
from torchvision.models import AlexNet, vgg

from ctok.metrics import lpips
from ctok.metrics.lpips import DEFAULT_NET, WEIGHTS_ENV, load_lpips

# Indices of the ReLUs whose outputs LPIPS compares, in torchvision's `features` of each trunk.
RELU_OUTPUTS = {"vgg": (3, 8, 15, 22, 29), "alex": (1, 4, 7, 9, 11)}
FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def make_trunk(net: str) -> torch.nn.Sequential:
    return vgg.make_layers(vgg.cfgs["D"]) if net == "vgg" else AlexNet().features


@pytest.fixture(scope="module", params=["alex", "vgg"])
def trunk_file(request, tmp_path_factory):
    """(net, path, trunk): a trunk with random weights, saved as torchvision names its ImageNet file's entries."""
    torch.manual_seed(0)
    trunk = make_trunk(request.param)
    path = tmp_path_factory.mktemp(request.param) / FILES[request.param]
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, path)
    return request.param, path, trunk.eval()


def lpips_by_definition(net, trunk, x, y):
    """LPIPS v0.1: ImageNet-scaled inputs, unit-normalised activations, calibrated channel weights."""
    import lpips as lpips_package

    lins = torch.load(os.path.join(os.path.dirname(lpips_package.__file__), "weights", "v0.1", f"{net}.pth"),
                      map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def activations(images):
        h, found = (images - shift) / scale, []
        for index, layer in enumerate(trunk):
            h = layer(h)
            if index in RELU_OUTPUTS[net]:
                found.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
            if index == RELU_OUTPUTS[net][-1]:
                break
        return found

    total = 0
    with torch.no_grad():
        for level, (fx, fy) in enumerate(zip(activations(x), activations(y))):
            weight = lins[f"lin{level}.model.1.weight"].view(1, -1, 1, 1)
            total = total + (weight * (fx - fy).square()).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_matches_its_definition(trunk_file):
    net, path, trunk = trunk_file
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 64, 64, generator=g)).clamp(-1, 1)
    got = lpips(x, y, net=net, weights=path)
    assert got.shape == (3,)
    torch.testing.assert_close(got, lpips_by_definition(net, trunk, x, y), rtol=1e-5, atol=1e-7)
    assert torch.all(got > 0)
    torch.testing.assert_close(lpips(x, x, net=net, weights=path), torch.zeros(3), rtol=0, atol=1e-7)


def test_the_two_variants_give_different_numbers(trunk_file):
    net, path, _ = trunk_file
    other = "vgg" if net == "alex" else "alex"
    x = torch.linspace(-1, 1, 3 * 64 * 64).view(1, 3, 64, 64)
    assert load_lpips(net, path).net == net
    with pytest.raises(ValueError, match="must be one of"):
        load_lpips("squeeze", path)
    assert not torch.allclose(lpips(x, x.flip(-1), net=net, weights=path),
                              lpips(x, x.flip(-1), net=other, weights=None, network=_random_network(other)))


def _random_network(net):
    from ctok.losses.perceptual import LPIPSLoss

    return LPIPSLoss(None, net=net)


def test_network_is_reusable_frozen_and_found_through_the_environment(trunk_file, monkeypatch):
    net, path, trunk = trunk_file
    monkeypatch.setenv(WEIGHTS_ENV[net], str(path))
    network = load_lpips(net)
    assert not any(p.requires_grad for p in network.parameters())
    x = torch.linspace(-1, 1, 2 * 3 * 64 * 64).view(2, 3, 64, 64)
    torch.testing.assert_close(lpips(x, x.flip(-1), network=network),
                               lpips_by_definition(net, trunk, x, x.flip(-1)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_missing_weights_offline_say_what_to_download_and_where(net, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(WEIGHTS_ENV[net], raising=False)
    with pytest.raises(FileNotFoundError) as err:
        lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), net=net)
    message = str(err.value)
    assert f"https://download.pytorch.org/models/{FILES[net]}" in message
    assert str(tmp_path / "hub" / "checkpoints" / FILES[net]) in message
    assert WEIGHTS_ENV[net] in message


def test_the_default_variant_is_alexnet_as_in_the_fields_tables(tmp_path, monkeypatch):
    torch.manual_seed(0)
    trunk = make_trunk("alex").eval()
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, tmp_path / FILES["alex"])
    monkeypatch.setenv(WEIGHTS_ENV["alex"], str(tmp_path / FILES["alex"]))
    x = torch.linspace(-1, 1, 3 * 64 * 64).view(1, 3, 64, 64)
    assert DEFAULT_NET == "alex"
    torch.testing.assert_close(lpips(x, x.flip(-1)), lpips_by_definition("alex", trunk, x, x.flip(-1)),
                               rtol=1e-5, atol=1e-7)
