"""ctok.integrations.diffusers: a ctok tokenizer behind diffusers' autoencoder API, in diffusers' folder
layout, computing exactly what the tokenizer computes, and back to a ctok checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.autoencoders.vae import DecoderOutput  # noqa: E402

from ctok.integrations.diffusers import CtokAutoencoder, CtokEncoderOutput  # noqa: E402
from ctok.loading import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# The conformance tokenizers' configs (SoftVQ; MAETok with RoPE and MoVQ) with 2-layer, 64-wide ViTs:
# every code path, at a size whose checkpoint writes and loads in a blink.
SMALL = {"encoder_size": [64, 2, 2], "decoder_size": [64, 2, 2]}


@pytest.fixture(scope="module")
def tokenizer_dir(conformance_dir, tmp_path_factory):
    """A folder with a small SoftVQ and a small MAETok checkpoint (random weights)."""
    from ctok.models.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    torch.manual_seed(0)
    for name in ("softvq_small", "maetok_small"):
        config = json.loads((conformance_dir / name / "config.json").read_text())
        Tokenizer.from_config({**config, **SMALL}).save_pretrained(root / name)
    return root


def _images(tok, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, tok.image_size, tok.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("name", ["softvq_small", "maetok_small"])
def test_from_ctok_encodes_and_decodes_exactly_as_the_tokenizer(tokenizer_dir, name):
    tok = load_tokenizer(tokenizer_dir / name)
    vae = CtokAutoencoder.from_ctok(tokenizer_dir / name)
    assert not vae.training and not vae.tokenizer.training
    x = _images(tok)
    encoded = vae.encode(x)
    assert isinstance(encoded, CtokEncoderOutput)
    assert torch.equal(encoded.latents, tok.encode(x))
    decoded = vae.decode(encoded.latents)
    assert isinstance(decoded, DecoderOutput)
    assert torch.equal(decoded.sample, tok.decode(tok.encode(x)))
    assert torch.equal(vae(x).sample, decoded.sample)  # forward: the reconstruction
    (latents,) = vae.encode(x, return_dict=False)
    (sample,) = vae.decode(latents, return_dict=False)
    assert torch.equal(latents, encoded.latents) and torch.equal(sample, decoded.sample)


def test_diffusers_save_and_load_keep_the_function_and_convert_back(tokenizer_dir, tmp_path):
    src = tokenizer_dir / "maetok_small"
    tok = load_tokenizer(src)
    CtokAutoencoder.from_ctok(src).save_pretrained(tmp_path / "diffusers")
    assert sorted(p.name for p in (tmp_path / "diffusers").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert config["_class_name"] == "CtokAutoencoder" and config["tokenizer_config"] == tok.to_config()

    vae = CtokAutoencoder.from_pretrained(tmp_path / "diffusers")  # diffusers' own loader
    assert not vae.training
    x = _images(tok, 3)
    z = tok.encode(x)
    assert torch.equal(vae.encode(x).latents, z)
    assert torch.equal(vae.decode(z).sample, tok.decode(z))

    back = vae.to_ctok(tmp_path / "ctok")
    assert sorted(p.name for p in back.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert load_tokenizer(back).identity() == tok.identity()  # the same config and weights


def test_scaling_and_shift_factor_are_the_tokenizers_normalisation(conformance_dir, tmp_path):
    config = json.loads((conformance_dir / "softvq_small" / "config.json").read_text())
    with torch.device("meta"):  # the config is the point here, not weights
        vae = CtokAutoencoder(tokenizer_config={**config, "vq_mean": 0.25, "vq_std": 2.0})
    assert vae.config.scaling_factor == 0.5 and vae.config.shift_factor == 0.25
    z = torch.randn(2, 8, 8)
    # diffusers pipelines scale latents as (z - shift_factor) * scaling_factor
    assert torch.allclose((z - vae.config.shift_factor) * vae.config.scaling_factor, vae.tokenizer.normalize(z))
    vae.save_config(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["scaling_factor"] == 0.5 and saved["shift_factor"] == 0.25
    disagrees = r"scaling_factor 0.18215 disagrees with the tokenizer config \(vq_mean 0.25, vq_std 2.0 give 0.5\)"
    with pytest.raises(ValueError, match=disagrees), torch.device("meta"):
        CtokAutoencoder(tokenizer_config={**config, "vq_mean": 0.25, "vq_std": 2.0}, scaling_factor=0.18215)
