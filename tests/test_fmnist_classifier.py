"""The demo's FID feature network: output interface, packaged weights, their accuracy on the real test split."""
from __future__ import annotations

import hashlib
from importlib import resources

import pytest
import torch
from safetensors.torch import save_file

from ctok.data.fashion_mnist import load_fashion_mnist, load_fashion_mnist_raw, to_model_images
from ctok.models.fmnist_classifier import FashionMNISTClassifier, load_fmnist_classifier, packaged_record


@pytest.fixture(scope="module")
def packaged():
    return load_fmnist_classifier()


def test_outputs_are_the_evaluator_interface():
    torch.manual_seed(0)
    model = FashionMNISTClassifier().eval()
    out = model(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert set(out) == {"pool", "logits", "spatial"}
    assert out["pool"].shape == (4, 128) and out["logits"].shape == (4, 10) and out["spatial"].shape == (4, 64, 8, 8)
    # The logits are the linear head applied to the pooled features, as the docstring says.
    assert torch.allclose(out["logits"], model.head(out["pool"]), atol=1e-6)
    assert model.identity == "untrained"


def test_bad_inputs_are_named():
    model = FashionMNISTClassifier()
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 32, 32\), got \(2, 1, 32, 32\)"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\], got values in \[0, 255\]"):
        model(torch.full((2, 3, 32, 32), 255.0).index_fill_(0, torch.tensor([0]), 0.0))


def test_packaged_weights_load_with_their_hash_as_identity(packaged):
    blob = resources.files("ctok").joinpath("assets", "fmnist_classifier.safetensors").read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    assert packaged.identity == f"fmnist-classifier-{sha[:12]}"
    assert packaged_record()["sha256"] == sha  # the record describes these very weights
    assert not packaged.training and not any(p.requires_grad for p in packaged.parameters())
    assert len(blob) < 1_000_000


def test_weights_from_a_path_load_exactly(tmp_path):
    torch.manual_seed(1)
    source = FashionMNISTClassifier()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_fmnist_classifier(tmp_path / "w.safetensors")
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    sha = hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert loaded.identity == f"fmnist-classifier-{sha[:12]}"


def test_packaged_classifier_is_accurate_on_the_first_2000_test_images(real_fashion_mnist, packaged):
    images, labels = load_fashion_mnist("test", real_fashion_mnist, limit=2000)
    with torch.no_grad():
        predictions = packaged(images)["logits"].argmax(1)
    assert float((predictions == labels).float().mean()) >= 0.90


@pytest.mark.slow
def test_packaged_record_matches_the_full_test_split(real_fashion_mnist, packaged):
    raw, labels = load_fashion_mnist_raw("test", real_fashion_mnist)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(raw), 1000):
            predicted = packaged(to_model_images(raw[i : i + 1000]))["logits"].argmax(1)
            correct += int((predicted == labels[i : i + 1000]).sum())
    record = packaged_record()
    assert record["test_accuracy"] >= 0.90
    # Thread count and CPU may flip a borderline prediction or two, not more.
    assert abs(correct / len(raw) - record["test_accuracy"]) <= 3 / len(raw)
