"""The released model families by preset name, and the hub ids of the weights that were released.

Plain data, importing nothing: the model modules build a preset from it (``build_tokenizer``,
``build_sit``, ``build_dit``) and :mod:`ctok.hub`, which sits below the models, refuses a preset name
given where a checkpoint is expected. Keeping the tables here is what lets the hub know every preset
without importing a model.
"""
from __future__ import annotations

# Tokenizer families, as config fields over TokenizerConfig's defaults (SoftVQ's unless ``variant``
# says otherwise). Values not given by REFERENCE.md (vq_mean / vq_std of most models) are left at
# 0 / 1: the hub config of a released checkpoint always overrides a preset.
TOKENIZER_FAMILIES: dict[str, dict] = {
    "softvq-b-64": dict(encoder_model="vit_base_patch14_dinov2.lvd142m",
                        decoder_model="vit_base_patch14_dinov2.lvd142m",
                        num_latent_tokens=64, codebook_embed_dim=32),
    "softvq-bl-64": dict(encoder_model="vit_base_patch14_dinov2.lvd142m",
                         decoder_model="vit_large_patch14_dinov2.lvd142m",
                         num_latent_tokens=64, codebook_embed_dim=32, vq_mean=-0.00077168207, vq_std=0.07157949),
    "softvq-l-64": dict(encoder_model="vit_large_patch14_dinov2.lvd142m",
                        decoder_model="vit_large_patch14_dinov2.lvd142m",
                        num_latent_tokens=64, codebook_embed_dim=32),
    "softvq-b-32": dict(encoder_model="vit_base_patch14_dinov2.lvd142m",
                        decoder_model="vit_base_patch14_dinov2.lvd142m",
                        num_latent_tokens=32, codebook_embed_dim=64),
    "softvq-bl-32": dict(encoder_model="vit_base_patch14_dinov2.lvd142m",
                         decoder_model="vit_large_patch14_dinov2.lvd142m",
                         num_latent_tokens=32, codebook_embed_dim=64),
    # The released softvq-l-32 config names a ViT-B encoder and a ViT-L decoder.
    "softvq-l-32": dict(encoder_model="vit_base_patch14_dinov2.lvd142m",
                        decoder_model="vit_large_patch14_dinov2.lvd142m",
                        num_latent_tokens=32, codebook_embed_dim=64, vq_mean=0.00060894643, vq_std=0.029030401),
    "maetok-b-128": dict(variant="maetok", encoder_model="vit_base_patch14_dinov2.lvd142m",
                         decoder_model="vit_base_patch14_dinov2_movqv2", num_latent_tokens=128, codebook_embed_dim=32,
                         use_ape=False, use_rope=True, rope_mixed=True, rope_theta=10.0, dec_cls_token=False,
                         enc_token_drop=0.4, enc_token_drop_max=0.6, entropy_loss_ratio=0.0),
}
# Every family at 256 px, and at 512 px under the name with "-512".
TOKENIZER_PRESET_NAMES = tuple(TOKENIZER_FAMILIES) + tuple(f"{name}-512" for name in TOKENIZER_FAMILIES)
# The tokenizer presets whose trained weights were released, by hub id (REFERENCE.md).
RELEASED_TOKENIZERS = {
    "maetok-b-128": "MAETok/maetok-b-128",
    "maetok-b-128-512": "MAETok/maetok-b-128-512",
    **{name: f"SoftVQVAE/{name}" for name in ("softvq-b-32", "softvq-bl-32", "softvq-l-32", "softvq-b-64",
                                                "softvq-bl-64", "softvq-l-64", "softvq-bl-64-512", "softvq-l-32-512")},
}

# Sizes of the original SiT / DiT families (depth, hidden size, heads); all use patch 1 on 1-D latents.
GENERATOR_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
GENERATOR_PRESET_NAMES = tuple(f"{family}-{size}/1" for family in ("SiT", "DiT") for size in GENERATOR_SIZES)
# Only XL models were released, one per tokenizer (REFERENCE.md); one hub id of each family for messages.
RELEASED_GENERATOR_EXAMPLES = {"SiT-XL/1": "MAETok/sit-xl_maetok-b-128", "DiT-XL/1": "SoftVQVAE/dit-xl_softvq-l-64"}
