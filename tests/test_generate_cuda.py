"""``ctok generate`` and the samplers on a GPU: bf16 autocast, CUDA generators, repeatable images.

Skipped without CUDA. The models are small random ones written here, so that these tests need
neither the shared fixtures nor downloads.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.tiny_tokenizer import TINY_TOKENIZER
from ctok.cli import main
from ctok.metrics.sample_npz import NpzImages
from ctok.models.diffusion_transformer import DiT, SiT
from ctok.models.tokenizer import Tokenizer
from ctok.sampling import sample_dit, sample_sit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The ViTs at vit_tiny's own width and depth (192 wide, 12 layers), not the 64-wide 2-layer ones.
TOKENIZER = {**TINY_TOKENIZER, "encoder_size": None, "decoder_size": None}
GENERATOR = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=2)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """adaLN-Zero starts as the identity; small random weights make every layer matter."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-checkpoints")
    randomised(Tokenizer.from_config(TOKENIZER)).save_pretrained(root / "tok")
    randomised(SiT.from_config(GENERATOR)).save_pretrained(root / "sit")
    randomised(DiT.from_config(GENERATOR)).save_pretrained(root / "dit")
    return root


@pytest.mark.parametrize("model", ["sit", "dit"])
def test_generate_on_cuda_repeats_its_images(checkpoints, tmp_path, model):
    def generate(out):
        assert main(["generate", "--tokenizer", str(checkpoints / "tok"), "--model", str(checkpoints / model),
                     "--out", str(out), "--device", "cuda", "--num-images", "10", "--batch-size", "4",
                     "--steps", "20", "--cfg-scale", "1.5", "--seed", "4"]) == 0
        return np.concatenate(list(NpzImages(out / "samples.npz").batches(16)))

    first, second = generate(tmp_path / "a"), generate(tmp_path / "b")
    assert first.shape == (10, 32, 32, 3)
    assert np.array_equal(first, second)
    assert len({image.tobytes() for image in first}) == 10


def test_samplers_on_cuda_agree_with_the_cpu():
    sit = randomised(SiT.from_config(GENERATOR))
    dit = randomised(DiT.from_config(GENERATOR))
    noise = torch.randn(6, 8, 4)
    labels = torch.arange(6)
    cuda = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    for solver in ("euler", "heun"):
        cpu_out = sample_sit(sit, noise, labels, num_steps=10, solver=solver, cfg_scale=2.0)
        gpu_out = sample_sit(sit.to(cuda), noise.to(cuda), labels.to(cuda), num_steps=10, solver=solver, cfg_scale=2.0)
        torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-4, atol=1e-4)
        sit.cpu()
    cpu_out = sample_dit(dit, noise, labels, num_steps=10, solver="ddim", cfg_scale=2.0)
    gpu_out = sample_dit(dit.to(cuda), noise.to(cuda), labels.to(cuda), num_steps=10, solver="ddim", cfg_scale=2.0)
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-4, atol=1e-4)
    # The stochastic samplers draw from per-sample CUDA generators.
    gens = [torch.Generator(cuda).manual_seed(i) for i in range(6)]
    out = sample_sit(sit.to(cuda), noise.to(cuda), labels.to(cuda), num_steps=10, generator=gens)
    assert out.device.type == "cuda" and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="generator is on cpu but the samples are on cuda"):
        sample_dit(dit, noise.to(cuda), labels.to(cuda), num_steps=3, generator=torch.Generator())
