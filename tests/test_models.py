"""Model construction, presets and input validation."""
import random
from functools import cache

import numpy as np
import pytest
import torch

from ctok.models import presets, vit
from ctok.models.diffusion_transformer import SiT
from ctok.models.diffusion_transformer import build_preset as build_generator
from ctok.models.rope import grid_positions, rotation_angles
from ctok.models.tokenizer import Tokenizer, build_tokenizer, preset_config
from ctok.models.vit import MoVQBlock
from ctok.uint8 import to_uint8

TINY_MAETOK = dict(variant="maetok", image_size=32, base_image_size=32, encoder_model="vit_tiny_patch14_dinov2",
                   decoder_model="vit_tiny_patch14_dinov2_movqv2", num_latent_tokens=8, codebook_embed_dim=4,
                   use_ape=False, use_rope=True, rope_mixed=True, dec_cls_token=False, enc_token_drop=0.4,
                   encoder_size=[64, 2, 2], decoder_size=[32, 1, 2])
TINY_SOFTVQ = {**TINY_MAETOK, "variant": "softvq", "decoder_model": "vit_tiny_patch14_dinov2", "use_rope": False,
               "use_ape": True, "dec_cls_token": True, "enc_token_drop": 0.0, "codebook_size": 16, "num_codebooks": 2}

# -- presets: what the released models are (REFERENCE.md, the README's preset table) -------------
VIT_B, VIT_L = (768, 12, 12), (1024, 24, 16)  # DINOv2 ViT-B / ViT-L: width, depth, heads
# Parameter counts in millions as the README publishes them (0.1M); None where none is published.
_FAMILIES = {
    "softvq-b-64": dict(variant="softvq", tokens=64, dim=32, encoder=VIT_B, decoder=VIT_B, millions=173.6),
    "softvq-bl-64": dict(variant="softvq", tokens=64, dim=32, encoder=VIT_B, decoder=VIT_L, millions=391.3,
                         vq=(-0.00077168207, 0.07157949)),
    "softvq-l-64": dict(variant="softvq", tokens=64, dim=32, encoder=VIT_L, decoder=VIT_L, millions=608.9),
    "softvq-b-32": dict(variant="softvq", tokens=32, dim=64, encoder=VIT_B, decoder=VIT_B),
    "softvq-bl-32": dict(variant="softvq", tokens=32, dim=64, encoder=VIT_B, decoder=VIT_L),
    # The released softvq-l-32 config names a ViT-B encoder and a ViT-L decoder.
    "softvq-l-32": dict(variant="softvq", tokens=32, dim=64, encoder=VIT_B, decoder=VIT_L,
                        vq=(0.00060894643, 0.029030401)),
    "maetok-b-128": dict(variant="maetok", tokens=128, dim=32, encoder=VIT_B, decoder=VIT_B, millions=173.9),
}
# Every family at 256 px and at 512 px; the token count does not grow with the resolution.
TOKENIZER_PRESETS = {**{name: dict(e, image=256) for name, e in _FAMILIES.items()},
                     **{f"{name}-512": dict(e, image=512, millions=None, vq=None) for name, e in _FAMILIES.items()}}
# SiT / DiT sizes (DiT paper, Table 1): depth, width, heads, parameters in millions (1M published).
GENERATOR_SIZES = {"S": (12, 384, 6, 33), "B": (12, 768, 12, 130), "L": (24, 1024, 16, 458),
                   "XL": (28, 1152, 16, 675)}
GENERATOR_PRESETS = [f"{family}-{size}/1" for family in ("SiT", "DiT") for size in presets.GENERATOR_SIZES]


def _count(model):
    return sum(p.numel() for p in model.parameters())


@cache
def _meta_tokenizer(name: str) -> Tokenizer:
    # On the meta device: shapes without allocating (or initialising) up to 600M parameters.
    with torch.device("meta"):
        return build_tokenizer(name)


def _vit_shape(vit) -> tuple[int, int, int]:
    blocks = vit.model.blocks
    return blocks[0].attn.qkv.in_features, len(blocks), blocks[0].attn.num_heads


def test_every_preset_has_expected_figures():
    # A preset added (or removed) without its published figures here fails.
    assert set(presets.TOKENIZER_PRESET_NAMES) == set(TOKENIZER_PRESETS)
    assert set(presets.GENERATOR_SIZES) == set(GENERATOR_SIZES)


@pytest.mark.parametrize("name", presets.TOKENIZER_PRESET_NAMES)
def test_tokenizer_preset_has_its_published_shape(name):
    expected = TOKENIZER_PRESETS[name]
    tok = _meta_tokenizer(name)
    enc_width, dec_width = expected["encoder"][0], expected["decoder"][0]
    size, tokens, dim = expected["image"], expected["tokens"], expected["dim"]
    assert (tok.kind, tok.variant, tok.image_size, tok.num_tokens, tok.latent_dim) == ("tokenizer", expected["variant"],
                                                                                       size, tokens, dim)
    assert _vit_shape(tok.encoder) == expected["encoder"] and _vit_shape(tok.decoder) == expected["decoder"]
    # Patch 16 in and out: (S/16)^2 image tokens, a linear head to 16 x 16 x 3 pixels.
    assert tok.encoder.model.patch_embed.patch_size == (16, 16) and tok.num_patches == (size // 16) ** 2
    assert tok.encoder.model.patch_embed.img_size == (size, size)
    assert tok.decoder.to_pixel.patch_size == 16 and tok.decoder.to_pixel.model.out_features == 16 * 16 * 3
    # Linear(width -> D) out of the encoder, Linear(D -> width) into the decoder, N latent tokens.
    assert tok.quant_conv.weight.shape == (dim, enc_width) and tok.post_quant_conv.weight.shape == (dec_width, dim)
    assert tok.encoder.latent_tokens.shape == (1, tokens, enc_width)
    assert tok.decoder.latent_pos_embed.shape == (1, tokens, dec_width)
    c = tok.config
    if expected["variant"] == "softvq":
        q = tok.quantize
        assert (q.num_codebooks, q.codebook_size, q.tau, q.entropy_loss_ratio) == (4, 8192, 0.07, 0.01)
        assert q.embedding.shape == (4, 8192, dim)
        # Absolute positions and a decoder class token, no RoPE, no mask modelling.
        assert tok.decoder.use_ape and tok.decoder.model.cls_token is not None
        assert not tok.encoder.use_rope and not tok.masks_tokens
    else:
        # No quantizer; RoPE-Mixed (theta 10) instead of decoder APE, no decoder class token, MoVQ
        # decoder blocks, and mask modelling with ratios in [0.4, 0.6].
        assert tok.quantize is None
        assert tok.encoder.use_rope and tok.decoder.use_rope and c.rope_mixed and c.rope_theta == 10.0
        assert not tok.decoder.use_ape and tok.decoder.model.cls_token is None
        assert all(isinstance(b, MoVQBlock) for b in tok.decoder.model.blocks)
        assert tok.masks_tokens and (c.enc_token_drop, c.enc_token_drop_max) == (0.4, 0.6)
    if expected.get("vq"):
        assert (c.vq_mean, c.vq_std) == expected["vq"]
    count = _count(tok)
    if expected.get("millions") is not None:
        assert round(count / 1e6, 1) == expected["millions"]
    if size == 512:
        # The 512 px model is the 256 px one with position tables for 32 x 32 instead of 16 x 16
        # patches, in the encoder and in the decoder (whose table the checkpoints keep even unused).
        assert count == _count(_meta_tokenizer(name[:-4])) + (32 * 32 - 16 * 16) * (enc_width + dec_width)


@pytest.mark.parametrize("name", GENERATOR_PRESETS)
def test_generator_preset_has_its_published_shape(name):
    depth, hidden, heads, millions = GENERATOR_SIZES[name.split("-")[1].split("/")[0]]
    with torch.device("meta"):
        model = build_generator(name, input_size=128, in_channels=32)
    assert (model.kind, model.config.depth, model.config.hidden_size) == (name[:3].lower(), depth, hidden)
    assert len(model.blocks) == depth and model.blocks[0].attn.qkv.in_features == hidden
    assert model.blocks[0].attn.num_heads == heads
    # Patch 1 on 1-D latents: each of the 128 tokens is embedded alone.
    assert model.num_tokens == 128 and model.pos_embed.shape == (1, 128, hidden)
    assert model.x_embedder.in_features == 32
    # DiT learns its variance (eps and var channels); SiT predicts the velocity only.
    assert model.out_channels == (64 if name.startswith("DiT") else 32)
    assert model.y_embedder.embedding_table.num_embeddings == 1001  # 1000 classes and the null class
    assert round(_count(model) / 1e6) == millions
    if name == "SiT-XL/1":
        assert round(_count(model) / 1e6, 1) == 674.9  # the README's figure for 128 x 32 latents


def test_unknown_presets_are_refused():
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


@pytest.mark.parametrize("config", [TINY_MAETOK, TINY_SOFTVQ], ids=["maetok", "softvq"])
def test_decode_computes_in_float32_inside_bf16_autocast(config):
    """Decoded pixels become uint8 levels, which a bf16 output misses; ``ctok generate`` samples
    under bf16 autocast on CUDA, and decode leaves it (CPU autocast stands in for CUDA's here)."""
    torch.manual_seed(0)
    tok = Tokenizer.from_config(config).eval()
    z = torch.randn(4, 8, 4)
    reference = tok.decode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = tok.decode(z)
        with torch.no_grad():  # what decode computed before it left autocast
            in_bf16 = tok.decoder(tok.post_quant_conv(z), z)
    assert images.dtype == torch.float32 and torch.equal(images, reference)
    assert in_bf16.dtype == torch.bfloat16
    moved = (to_uint8(in_bf16.float()) != to_uint8(reference)).float().mean()
    assert moved > 0.05, f"only {moved:.1%} of pixels would move: the case shows nothing"


def test_rope_positions_of_a_grid_beyond_the_trained_one_are_built_once(tmp_path, monkeypatch):
    """A RoPE tokenizer used above its base_image_size (the 512-px models) rotates by the positions
    of its actual grid: built with the model, moved with it, not saved, not rebuilt per forward."""
    torch.manual_seed(0)
    tok = Tokenizer.from_config({**TINY_MAETOK, "image_size": 64}).eval()
    decoder = tok.decoder
    assert decoder.grid == 2 * round(decoder.freqs_t_x.numel() ** 0.5)
    expected = rotation_angles(decoder.freqs, *grid_positions(decoder.grid, decoder.grid), decoder.num_heads)
    assert not any(k.endswith(("grid_x", "grid_y")) for k in tok.state_dict())
    tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)  # built on the meta device, then filled in
    z = torch.randn(2, 8, 4)
    with torch.no_grad():
        reference = tok.decode(z)
        monkeypatch.setattr(vit, "grid_positions", None)  # a forward that rebuilt the grid would fail
        assert torch.equal(decoder._rope_angles(), expected)
        assert torch.equal(loaded.decode(z), reference)


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


@pytest.fixture
def tiny_training(tiny):
    """The tiny MAETok in train mode (no dropout or drop path configured), back in eval mode after."""
    tiny.train()
    yield tiny
    tiny.eval()


def test_without_a_mask_the_network_masks_nothing(tiny_training):
    """Regression: the network used to draw a published 40-60% mask itself when given none in train mode."""
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = tiny_training.training_forward(x)
        assert torch.equal(tiny_training.training_forward(x, None).z, out.z)
        tiny_training.eval()
        assert torch.equal(out.z, tiny_training.encode(x)) and torch.equal(out.rec, tiny_training(x))


def test_the_network_draws_no_random_numbers(tiny_training):
    """Masks are drawn by the trainer only: a training forward, masked or not, leaves every global
    random generator as it found it, so it cannot have drawn a mask or a mask ratio."""
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])

    def global_states():  # torch's, NumPy's (scipy.stats draws from it) and Python's
        numpy_state = np.random.get_state()
        return torch.get_rng_state(), numpy_state[1].tobytes(), numpy_state[2:], random.getstate()

    for given in (None, mask):
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(5)
        before = global_states()
        with torch.no_grad():
            first = tiny_training.training_forward(x, given)
        after = global_states()
        assert torch.equal(after[0], before[0]) and after[1:] == before[1:]
        torch.manual_seed(6)
        with torch.no_grad():
            assert torch.equal(tiny_training.training_forward(x, given).rec, first.rec)


def test_a_given_mask_replaces_exactly_its_patches_by_the_mask_token(tiny_training):
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    # 16-px patches in row-major order: 0 top left, 1 top right, 2 bottom left, 3 bottom right.
    mask = torch.tensor([[True, False, False, True], [False] * 4, [True] * 4])
    token = tiny_training.encoder.mask_token
    with torch.no_grad():
        masked = tiny_training.training_forward(x, mask)
        # The same pass unmasked, with the masked patch embeddings replaced by the mask token by hand.
        hook = tiny_training.encoder.model.patch_embed.register_forward_hook(
            lambda module, inputs, out: torch.where(mask[..., None], token, out))
        try:
            by_hand = tiny_training.training_forward(x)
        finally:
            hook.remove()
        assert torch.equal(masked.z, by_hand.z) and torch.equal(masked.rec, by_hand.rec)
        # Masked pixels are not seen at all, an unmasked patch is.
        hidden = x.clone()
        hidden[0, :, :16, :16], hidden[0, :, 16:, 16:], hidden[2] = 0.3, -0.7, 0.9
        assert torch.equal(tiny_training.training_forward(hidden, mask).z, masked.z)
        seen = x.clone()
        seen[0, :, :16, 16:] = 0.3
        changed = tiny_training.training_forward(seen, mask).z != masked.z
        assert changed[0].any() and not changed[1:].any()


def test_a_mask_must_be_bool_per_patch(tiny):
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4\), got \(2, 5\)"):
        tiny.training_forward(x, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        tiny.training_forward(x, torch.zeros(2, 4))


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
