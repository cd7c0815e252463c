"""The 1-D tokenizers: SoftVQ-VAE and MAETok, one model with two settings.

    encode:  image -> ViT encoder -> latent tokens -> Linear (width -> D) [-> SoftVQ] -> z (B, N, D)
    decode:  z -> Linear (D -> width) -> ViT decoder (mask tokens read the latents) -> image

SoftVQ-VAE soft-quantizes z over grouped codebooks; MAETok uses no quantizer and trains its
encoder with mask modelling (a share of patches replaced by a mask token) and a MoVQ decoder.
The network only applies a mask it is given; which patches to mask is the trainer's choice.

The configuration is the flat field list the released ``config.json`` files carry (see
:class:`TokenizerConfig`); keys that only mattered to the original training script are kept for
the round trip but change nothing here (the policy of :mod:`ctok.models.base`). Which of the two
models a config describes is its ``variant``: "softvq" or "maetok". :func:`build_tokenizer` builds a
released family by its preset name (random weights, :mod:`ctok.models.presets`);
``Tokenizer.from_pretrained`` loads a checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ctok.models.base import PretrainedModel
from ctok.models.presets import TOKENIZER_FAMILIES, TOKENIZER_PRESET_NAMES
from ctok.models.quantizers import SoftVectorQuantizer
from ctok.models.vit import ViTDecoder, ViTEncoder, parse_vit_name
from ctok.numerics import without_autocast
from ctok.validation import check_image_range, check_model_input, check_tensor

VARIANTS = ("softvq", "maetok")


@dataclass
class TokenizerConfig:
    """Fields of the released tokenizer config.json that define the computation.

    ``variant`` ("softvq" or "maetok") has no default: the other defaults are SoftVQ's, and a
    MAETok config that lost its variant would otherwise build a SoftVQ without a word.
    ``TokenizerConfig(**preset_config(name))`` builds the config of a preset.
    """

    variant: str
    image_size: int = 256
    base_image_size: int = 256
    encoder_model: str = "vit_base_patch14_dinov2.lvd142m"
    decoder_model: str = "vit_base_patch14_dinov2.lvd142m"
    enc_patch_size: int = 16
    dec_patch_size: int = 16
    num_latent_tokens: int = 64
    codebook_embed_dim: int = 32  # latent width D
    codebook_size: int = 8192
    num_codebooks: int = 4
    codebook_l2_norm: bool = True
    tau: float = 0.07
    entropy_loss_ratio: float = 0.01
    enc_token_drop: float = 0.0  # MAETok: lowest mask ratio (0 disables mask modelling)
    enc_token_drop_max: float = 0.6  # MAETok: highest mask ratio (and the mode of its distribution)
    enc_drop_path_rate: float = 0.0
    dec_drop_path_rate: float = 0.0
    dec_cls_token: bool = True
    use_ape: bool = True
    use_rope: bool = False
    rope_mixed: bool = False
    rope_theta: float = 10.0
    vq_mean: float = 0.0
    vq_std: float = 1.0
    # ctok's own: [width, depth, heads] overriding what encoder_model / decoder_model imply,
    # for models smaller than the DINOv2 family (tests, the CPU demo).
    encoder_size: list | None = None
    decoder_size: list | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")


# Keys whose value must be the one ctok implements; anything else would compute another function.
_REQUIRED = {"enc_type": "vit", "dec_type": "vit", "to_pixel": "linear",
             "enc_tuning_method": "full", "dec_tuning_method": "full"}


@dataclass
class TrainingOutput:
    """What one training forward pass gives the losses, for either kind."""

    rec: torch.Tensor  # reconstruction (B, 3, H, W)
    z: torch.Tensor  # latents the decoder saw (B, N, D)
    entropy_loss: torch.Tensor  # SoftVQ's weighted entropy loss (0 for MAETok)
    codebook_usage: torch.Tensor  # SoftVQ: share of codes used recently, 0-d on the device (0 for MAETok)


class Tokenizer(PretrainedModel):
    """``tok.encode(x) -> z`` for images in [-1, 1], ``tok.decode(z) -> images``.

    Build one with :func:`build_tokenizer` (a preset, random weights), :meth:`from_config` (a
    config.json dict) or ``Tokenizer(TokenizerConfig(...))``; load one with :meth:`from_pretrained`
    (or ``ctok.load_tokenizer``), which returns it in eval mode. Its repr says which mode it is in.
    Its ``kind`` is "tokenizer"; its ``variant`` says whether it is a SoftVQ-VAE or a MAETok.
    """

    kind = "tokenizer"
    config_class = TokenizerConfig
    handled_keys = frozenset(_REQUIRED)

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        c = config
        for name, size, patch in (("image_size", c.image_size, c.enc_patch_size),
                                  ("image_size", c.image_size, c.dec_patch_size)):
            if size % patch:
                raise ValueError(f"{name} {size} is not divisible by the patch size {patch}")
        enc_size, enc_movq = parse_vit_name(c.encoder_model, c.encoder_size)
        dec_size, dec_movq = parse_vit_name(c.decoder_model, c.decoder_size)
        if enc_movq:
            raise ValueError(f"encoder_model {c.encoder_model!r}: MoVQ blocks exist only in decoders")
        rope_theta = c.rope_theta if c.use_rope else None
        self.encoder = ViTEncoder(
            image_size=c.image_size, patch_size=c.enc_patch_size, size=enc_size,
            num_latent_tokens=c.num_latent_tokens, rope_theta=rope_theta, base_image_size=c.base_image_size,
            mask_token=c.enc_token_drop > 0, drop_path_rate=c.enc_drop_path_rate,
        )
        self.quant_conv = nn.Linear(enc_size.width, c.codebook_embed_dim)
        self.quantize = (
            SoftVectorQuantizer(c.codebook_size, c.codebook_embed_dim, c.num_codebooks, c.tau,
                                c.codebook_l2_norm, c.entropy_loss_ratio)
            if self.variant == "softvq" else None
        )
        self.post_quant_conv = nn.Linear(c.codebook_embed_dim, dec_size.width)
        # RoPE replaces the decoder's absolute positions; the encoder keeps both (see ViTEncoder).
        self.decoder = ViTDecoder(
            image_size=c.image_size, patch_size=c.dec_patch_size, size=dec_size,
            num_latent_tokens=c.num_latent_tokens, latent_dim=c.codebook_embed_dim, movq=dec_movq,
            class_token=c.dec_cls_token, use_ape=not c.use_rope, rope_theta=rope_theta,
            base_image_size=c.base_image_size, drop_path_rate=c.dec_drop_path_rate,
        )

    # -- shapes --------------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        """``"softvq"`` or ``"maetok"`` (the config's ``variant``)."""
        return self.config.variant

    @property
    def num_tokens(self) -> int:
        """N, the number of latent tokens per image."""
        return self.config.num_latent_tokens

    @property
    def latent_dim(self) -> int:
        """D, the width of each latent token."""
        return self.config.codebook_embed_dim

    @property
    def image_size(self) -> int:
        """The side of the square images it encodes and decodes, in pixels."""
        return self.config.image_size

    @property
    def num_patches(self) -> int:
        """Image patches the encoder sees (the length of a training mask)."""
        return (self.config.image_size // self.config.enc_patch_size) ** 2

    def extra_repr(self) -> str:
        """The first line of the repr: variant, shapes, and whether it is in train or eval mode."""
        mode = "train" if self.training else "eval"
        return (f"{self.variant}, {self.image_size} px images <-> {self.num_tokens} x {self.latent_dim} latents, "
                f"{mode} mode")

    # -- inference API -------------------------------------------------------------------------
    # True inside images_checked(); a class attribute, so that a model outside it needs no state.
    _images_checked_by_caller = False

    @contextmanager
    def images_checked(self) -> Iterator[None]:
        """Within the block, :meth:`encode` skips its range check of the images, which reads two values
        back from the device: a host-device sync per batch, which stalls a GPU encoding a whole
        dataset (a latent cache, on-the-fly generator training). For a loop whose images come from
        one dataset whose first batch was checked (or from ctok's datasets, [-1, 1] by construction)."""
        before = self._images_checked_by_caller
        self._images_checked_by_caller = True
        try:
            yield
        finally:
            self._images_checked_by_caller = before

    # encode, decode and forward run without autograd: nothing differentiates through them (training
    # uses training_forward), and recording the graph of a ViT pair costs gigabytes for a batch.
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, N, D); for SoftVQ the soft-quantized ones.

        Runs without autograd. Float images of any precision are cast to the model's dtype; uint8
        images, values outside [-1, 1] (beyond a small overshoot) and NaN are refused with a
        ValueError, and a batch lying wholly in [0, 1] gets a warning (see
        :func:`ctok.validation.check_image_range`).
        """
        s = self.config.image_size
        weight = self.quant_conv.weight
        check_tensor("images", x, (None, 3, s, s), finite=False)  # the range check below sees NaN too
        x = check_model_input("images", x, weight.dtype, weight.device)
        if not self._images_checked_by_caller:
            check_image_range("images", x)
        with torch.no_grad():
            return self._encode(x, mask=None)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, N, D), as ``encode`` returns them (not normalised) -> images (B, 3, H, W).

        Runs without autograd, in the model's own dtype even inside an autocast region: float
        latents of any precision are cast to it. Decoded pixels become uint8 images, and a bf16 output
        (8 significant bits) is off by up to a quarter of a uint8 level near +-1, which moves about 8%
        of pixels by one level; so ``ctok generate`` samples under bf16 autocast but decodes in float32.
        """
        check_tensor("latents", z, (None, self.num_tokens, self.latent_dim))
        weight = self.post_quant_conv.weight
        z = check_model_input("latents", z, weight.dtype, weight.device)
        with torch.no_grad(), without_autocast(weight.device):
            return self.decoder(self.post_quant_conv(z), z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``decode(encode(x))``, without autograd (see :meth:`training_forward`)."""
        return self.decode(self.encode(x))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> the unit-scale space the diffusion models work in: (z - vq_mean) / vq_std."""
        return (z - self.config.vq_mean) / self.config.vq_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents of the unit-scale space -> the tokenizer's: z * vq_std + vq_mean."""
        return z * self.config.vq_std + self.config.vq_mean

    def _encode(self, x: torch.Tensor, mask: torch.Tensor | None):
        z = self.quant_conv(self.encoder(x, mask))
        if self.quantize is None:
            return z, z.new_zeros(()), z.new_zeros((), dtype=torch.float32)
        out = self.quantize(z)
        return out.z_q, out.entropy_loss, out.codebook_usage

    # -- training API --------------------------------------------------------------------------
    @property
    def masks_tokens(self) -> bool:
        """Whether the encoder has a mask token (MAETok: ``enc_token_drop > 0``)."""
        return self.encoder.mask_token is not None

    def training_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> TrainingOutput:
        """Encode with ``mask`` applied, then decode: the pass the training losses are taken on, and
        the only one that records gradients.

        ``mask`` (B, num_patches) bool, True = that patch is replaced by the mask token; None masks
        nothing, in train mode as in eval mode. The network never draws a mask: the trainer
        (:mod:`ctok.training.masking`) does, from its own per-step and per-sample generators, so
        that masking resumes exactly and does not depend on how the batch is split over processes.
        """
        if mask is not None:
            check_tensor("mask", mask, (x.shape[0], self.num_patches))
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor (True = masked patch), got dtype {mask.dtype}")
        z, ent, usage = self._encode(x, mask)
        rec = self.decoder(self.post_quant_conv(z), z)
        return TrainingOutput(rec, z, ent, usage)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final weight, whose gradients set the adaptive GAN weight."""
        return self.decoder.to_pixel.model.weight

    # -- configuration ---------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: dict) -> dict:
        """Refuse settings ctok does not implement; returns the config with its ``variant`` set.

        A config without ``variant`` is a released one: MAETok's config dataclass has the
        auxiliary-decoder fields (``aux_*``) and SoftVQ's has not.
        """
        for key, value in _REQUIRED.items():
            if key in config and config[key] != value:
                raise ValueError(f"tokenizer config has {key}={config[key]!r}; ctok implements {key}={value!r} only")
        if config.get("use_rope") and not config.get("rope_mixed"):
            raise ValueError("use_rope without rope_mixed (axial RoPE) is not supported: "
                             "the released models use RoPE-Mixed")
        config = dict(config)
        # ctok 0.1 wrote the variant as ``tokenizer_kind``; its checkpoints read as if they said ``variant``.
        legacy = config.pop("tokenizer_kind", None)
        if legacy is not None and config.setdefault("variant", legacy) != legacy:
            raise ValueError(f"tokenizer config has variant={config['variant']!r} and tokenizer_kind={legacy!r} "
                             "(the old name of variant): keep one")
        if config.get("variant") is None:
            config["variant"] = "maetok" if any(k.startswith("aux_") for k in config) else "softvq"
        return config

    def config_entries(self) -> dict:
        """Every field (the ViT size overrides only when set) and the settings ctok requires."""
        fields = {k: v for k, v in dataclasses.asdict(self.config).items()
                  if v is not None or k not in ("encoder_size", "decoder_size")}
        return {**fields, **_REQUIRED}

    def identity(self) -> str:
        """A short fingerprint of config and weights, stored with everything made from this tokenizer."""
        # Generators record the identity of the tokenizer they learned, so it must not move: the
        # hash covers the config with the variant under the key ctok 0.1 wrote it as.
        config = {("tokenizer_kind" if k == "variant" else k): v for k, v in self.to_config().items()}
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            if name.endswith("codebook_used"):  # a training statistic, not part of the function
                continue
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        return f"{self.variant}-{self.num_tokens}x{self.latent_dim}-{h.hexdigest()[:16]}"


def preset_config(name: str, **overrides) -> dict:
    """Config dict of a released tokenizer family (``maetok-b-128``, ``softvq-l-64-512`` ...).

    Its keys are fields of :class:`TokenizerConfig`, ``variant`` included, so
    ``TokenizerConfig(**preset_config(name))`` and ``Tokenizer.from_config(preset_config(name))``
    both build the preset.
    """
    base, size = (name[:-4], 512) if name.endswith("-512") else (name, 256)
    if base not in TOKENIZER_FAMILIES:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {list(TOKENIZER_PRESET_NAMES)}")
    config = {"image_size": size, "base_image_size": 256, "variant": "softvq"}
    config.update(TOKENIZER_FAMILIES[base])
    config.update(overrides)
    return config


def build_tokenizer(name: str, **overrides) -> Tokenizer:
    """A tokenizer of a released family by preset name (``TOKENIZER_PRESET_NAMES`` in
    :mod:`ctok.models.presets`), with random weights, in train mode:
    ``build_tokenizer("maetok-b-128", image_size=512)``.

    ``overrides`` are config fields set over the preset's. For the trained weights load the hub id
    instead (``RELEASED_TOKENIZERS``), e.g. ``ctok.load_tokenizer("MAETok/maetok-b-128")``.
    """
    return Tokenizer.from_config(preset_config(name, **overrides))


