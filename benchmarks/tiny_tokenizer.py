"""The tiny random-initialised tokenizer that the CPU benchmarks and the tests build: SoftVQ with
2-layer, 64-wide ViTs at 32 px, 8 latent tokens of 4 channels.

Its one home is here rather than in tests/ because ``python -m benchmarks`` runs without tests/ on
its path, while the tests find this package through pytest's ``pythonpath``; and not in ctok, which
ships no test scaffolding. A test that needs another value derives it: ``{**TINY_TOKENIZER, "key": value}``.
"""
from __future__ import annotations

TINY_TOKENIZER = dict(image_size=32, base_image_size=32, encoder_model="vit_tiny_patch14_dinov2",
                      decoder_model="vit_tiny_patch14_dinov2", enc_patch_size=8, dec_patch_size=8,
                      num_latent_tokens=8, codebook_embed_dim=4, codebook_size=64, num_codebooks=1,
                      encoder_size=[64, 2, 2], decoder_size=[64, 2, 2])
