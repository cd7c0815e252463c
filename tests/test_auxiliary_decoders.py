"""MAETok's auxiliary decoders encode positions as the tokenizer's decoder does."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ctok.models.tokenizer import Tokenizer, TokenizerConfig, preset_config
from ctok.training.config import load_config
from ctok.training.tokenizer_config import TokenizerTrainConfig
from ctok.training.tokenizer_setup import build_heads

# Stand-ins for the DINOv2 / SigLIP teachers: build_heads reads only their feature width.
TEACHERS = {"dinov2": SimpleNamespace(feature_dim=6), "siglip": SimpleNamespace(feature_dim=5)}
# maetok-b-128 with its encoder and decoder shrunk; the position settings stay the preset's.
SMALL = dict(encoder_size=[32, 1, 2], decoder_size=[32, 1, 2])


def _auxiliary(**overrides):
    """The maetok-b-128 recipe's auxiliary decoders (3 blocks of width 192) and its tokenizer's decoder."""
    torch.manual_seed(0)
    cfg = load_config(TokenizerTrainConfig, "maetok-b-128", [])
    c = TokenizerConfig(**preset_config("maetok-b-128", **SMALL, **overrides))
    _, auxiliary = build_heads(cfg, c, TEACHERS)
    assert sorted(auxiliary.decoders) == ["dinov2", "hog", "siglip"]
    return auxiliary, Tokenizer(c).decoder


def _predictions(decoder, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return decoder(z)


def test_under_the_released_settings_they_use_rope_and_no_absolute_table():
    auxiliary, pixel_decoder = _auxiliary()
    assert pixel_decoder.use_rope and not pixel_decoder.use_ape and pixel_decoder.model.cls_token is None
    z = torch.randn(2, 128, 32)
    for name, aux in auxiliary.decoders.items():
        vit = aux.decoder
        assert (vit.use_rope, vit.use_ape, vit.model.cls_token is None) == (True, False, True), name
        assert vit.freqs.shape == (2, 3, 192 // 2) and vit.freqs.requires_grad
        # No absolute position table takes part: none is trained, and a changed one changes nothing.
        trained = [n for n, p in aux.named_parameters() if p.requires_grad and n.endswith(".pos_embed")]
        assert trained == []
        # The modulations start at zero, which would hide the latents; give them a say.
        for p in aux.parameters():
            if p.requires_grad and p.dim() == 2:
                torch.nn.init.normal_(p, std=0.2)
        before = _predictions(aux, z)
        with torch.no_grad():
            vit.model.pos_embed.normal_()
        torch.testing.assert_close(_predictions(aux, z), before, rtol=0, atol=0)
        # RoPE is what tells the image positions apart: every image token starts as the same mask
        # token, so without rotations (zero frequencies) all positions predict the same features.
        assert not torch.allclose(before[:, 0], before[:, 1], atol=1e-4)
        with torch.no_grad():
            vit.freqs.zero_()
        flat = _predictions(aux, z)
        torch.testing.assert_close(flat, flat[:, :1].expand_as(flat), rtol=1e-5, atol=1e-5)


def test_with_absolute_positions_they_use_the_table():
    auxiliary, pixel_decoder = _auxiliary(use_ape=True, use_rope=False, rope_mixed=False, dec_cls_token=True)
    assert not pixel_decoder.use_rope and pixel_decoder.use_ape
    z = torch.randn(2, 128, 32)
    for name, aux in auxiliary.decoders.items():
        vit = aux.decoder
        assert (vit.use_rope, vit.use_ape, vit.model.cls_token is not None) == (False, True, True), name
        assert not hasattr(vit, "freqs") and vit.model.pos_embed.requires_grad
        before = _predictions(aux, z)
        with torch.no_grad():
            vit.model.pos_embed.normal_()
        assert not torch.allclose(_predictions(aux, z), before)


@pytest.mark.parametrize("image_size", [256, 512])
def test_their_rope_follows_the_tokenizer_base_grid(image_size):
    """At 512 px the released frequencies were laid out for 256 px; the auxiliary decoders' too."""
    auxiliary, pixel_decoder = _auxiliary(image_size=image_size)
    for aux in auxiliary.decoders.values():
        assert torch.equal(aux.decoder.freqs_t_x, pixel_decoder.freqs_t_x)
        assert aux.decoder.grid == pixel_decoder.grid == image_size // 16
