"""Model construction, presets and input validation."""
import pytest
import torch

from ctok.models.diffusion_transformer import SiT, build_preset as build_generator
from ctok.models.tokenizer import PRESET_NAMES, Tokenizer, preset_config

TINY_MAETOK = dict(tokenizer_kind="maetok", image_size=32, base_image_size=32, encoder_model="vit_tiny_patch14_dinov2",
                   decoder_model="vit_tiny_patch14_dinov2_movqv2", num_latent_tokens=8, codebook_embed_dim=4,
                   use_ape=False, use_rope=True, rope_mixed=True, dec_cls_token=False, enc_token_drop=0.4,
                   encoder_size=[64, 2, 2], decoder_size=[32, 1, 2])


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_preset_parameter_counts_match_the_published_sizes():
    # Built on the meta device: sizes without allocating 600M parameters.
    with torch.device("meta"):
        counts = {name: _count(Tokenizer.from_config(preset_config(name)))
                  for name in ("maetok-b-128", "softvq-b-64", "softvq-bl-64", "softvq-l-64")}
        sit_xl = _count(build_generator("SiT-XL/1", input_size=128, in_channels=32))
        dit_xl = _count(build_generator("DiT-XL/1", input_size=64, in_channels=32))
    # SoftVQ-VAE paper: B 173M, BL 391M, L 608M; MAETok-B-128 ~176M (incl. its 0.6M unused
    # decoder patch embedding and position table, kept for the checkpoint format).
    assert round(counts["softvq-b-64"] / 1e6) == 174
    assert round(counts["softvq-bl-64"] / 1e6) == 391
    assert round(counts["softvq-l-64"] / 1e6) == 609
    assert 172e6 < counts["maetok-b-128"] < 177e6
    assert round(sit_xl / 1e6) == 675 and round(dit_xl / 1e6) == 675


def test_every_preset_builds_with_its_resolution():
    for name in PRESET_NAMES:
        config = preset_config(name)
        assert config["image_size"] == (512 if name.endswith("-512") else 256)
    with pytest.raises(ValueError, match="unknown tokenizer preset 'maetok-x'"):
        preset_config("maetok-x")
    with pytest.raises(ValueError, match="unknown generator preset"):
        build_generator("SiT-XL/2", input_size=8, in_channels=4)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tokenizer.from_config(TINY_MAETOK).eval()


def test_tokenizer_shapes_and_normalisation(tiny):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = tiny.encode(x)
    assert z.shape == (2, 8, 4) and tiny.decode(z).shape == (2, 3, 32, 32)
    assert len(tiny.encoder.model.blocks) == 2 and tiny.decoder.model.blocks[0].attn.qkv.in_features == 32
    tiny.config.vq_mean, tiny.config.vq_std = 0.5, 2.0
    assert torch.allclose(tiny.denormalize(tiny.normalize(z)), z, atol=1e-6)
    assert torch.allclose(tiny.normalize(z), (z - 0.5) / 2.0)
    tiny.config.vq_mean, tiny.config.vq_std = 0.0, 1.0


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 33, 33), r"images must have shape \(B, 3, 32, 32\), got \(2, 3, 33, 33\)"),
    (torch.zeros(2, 1, 32, 32), r"got \(2, 1, 32, 32\)"),
    (torch.zeros(3, 32, 32), r"got \(3, 32, 32\)"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN or infinite"),
])
def test_encode_rejects_bad_images(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny.encode(bad)


def test_decode_rejects_bad_latents(tiny):
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 8, 4\), got \(1, 8, 5\)"):
        tiny.decode(torch.zeros(1, 8, 5))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="image_size 40 is not divisible by the patch size 16"):
        Tokenizer.from_config({**TINY_MAETOK, "image_size": 40})
    with pytest.raises(ValueError, match="dec_type='cnn'"):
        Tokenizer.from_config({**TINY_MAETOK, "dec_type": "cnn"})
    with pytest.raises(ValueError, match="unsupported ViT 'vit_huge"):
        Tokenizer.from_config({**TINY_MAETOK, "encoder_model": "vit_huge_patch14_dinov2"})
    with pytest.raises(ValueError, match=r"\[width, depth, heads\] with width divisible by heads, got \[30, 1, 4\]"):
        Tokenizer.from_config({**TINY_MAETOK, "decoder_size": [30, 1, 4]})
    with pytest.raises(ValueError, match="axial RoPE"):
        Tokenizer.from_config({**TINY_MAETOK, "rope_mixed": False})


def test_mask_modelling_only_in_training(tiny):
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    tiny.train()
    torch.manual_seed(1)
    out = tiny.training_forward(x)
    ratio = out.mask.float().mean(1)
    assert out.mask.shape == (4, 4) and torch.all(ratio == ratio[0])  # one ratio per step
    assert 0.25 <= float(ratio[0]) <= 0.75  # round(r * 4) / 4 for r in [0.4, 0.6]
    fixed = tiny.training_forward(x, mask_ratio=0.5)
    assert fixed.mask.sum(1).tolist() == [2, 2, 2, 2]
    assert tiny.training_forward(x, mask_ratio=0.0).mask is None
    tiny.eval()
    assert tiny.training_forward(x).mask is None


def test_mask_ratio_distribution_is_the_published_one(tiny):
    torch.manual_seed(0)
    ratios = torch.tensor([tiny.sample_mask_ratio() for _ in range(4000)])
    assert 0.4 <= float(ratios.min()) and float(ratios.max()) <= 0.6
    # Truncated normal on [0.4, 0.6], loc 0.6, scale 0.25: mean 0.5 - 0.25^2 * (pdf(0) - pdf(-0.8)) / (cdf(0) - cdf(-0.8))
    from scipy.stats import truncnorm
    assert abs(float(ratios.mean()) - truncnorm(-0.8, 0, loc=0.6, scale=0.25).mean()) < 0.003


def test_generator_input_validation():
    sit = SiT.from_config(dict(input_size=6, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5))
    x, t, y = torch.zeros(2, 6, 4), torch.rand(2), torch.tensor([0, 5])
    assert sit(x, t, y).shape == (2, 6, 4)  # 5 is the null class
    with pytest.raises(ValueError, match=r"x must have shape \(B, 6, 4\), got \(2, 6, 3\)"):
        sit(torch.zeros(2, 6, 3), t, y)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 5\], got values in \[0, 6\]"):
        sit(x, t, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"t must have shape \(2\), got \(3,\)|t must have shape"):
        sit(x, torch.rand(3), y)
    with torch.no_grad(), pytest.raises(ValueError, match="NaN"):  # inference checks values too
        sit(x.fill_(float("inf")), t, y)
