"""SiT and DiT on 1-D latents: a transformer over (tokens x channels) with adaLN-Zero blocks.

Both models are the same network. They differ in what they predict and how time is given:

* SiT predicts the velocity of a flow-matching path; ``t`` is a float in [0, 1] (1 is noise).
* DiT predicts the noise and, with learned sigma, the interpolation between the two posterior
  variance bounds (output has twice the channels); ``t`` is an integer step in [0, 1000).

Parameter names follow the released checkpoints so that their state dicts load unchanged.
Class ``num_classes`` is the null class used for classifier-free guidance; it exists only when
the model was trained with label dropout (``class_dropout_prob > 0``).

A generator trained by ctok also carries, in its config, what sampling must know about the latents
it learned: their normalisation (``latent_stats``), the tokenizer they came from (``tokenizer``)
and, for a DiT, its noise schedule. Released checkpoints carry none of them; the fields are then
None and are left out of the config.json that ``save_pretrained`` writes. Other keys of a config.json
are kept and written back (the policy of :mod:`ctok.models.base`), except values that would change
the computation: ``vae_1d=false``, a ``patch_size`` other than 1, a ``decoder_hidden_size`` other than
``hidden_size``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ctok.models.base import PretrainedModel
from ctok.models.checkpointing import BlockStack
from ctok.models.presets import GENERATOR_PRESET_NAMES, GENERATOR_SIZES
from ctok.validation import check_batch, check_labels, check_tensor

# The flow paths a SiT can be trained on and the noise schedules of a DiT. The samplers and the
# trainers read these names from here: a config records one of them, so the model defines them.
PATH_TYPES = ("linear", "cosine")
NOISE_SCHEDULES = ("linear", "cosine")

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with one (shift, scale) per sample, broadcast over the tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_table_1d(length: int, dim: int) -> torch.Tensor:
    """Fixed position table: sin at even channels, cos at odd, frequencies 10000^(-2i/dim).

    This interleaved layout (not sin and cos halves) is what the released 1-D models use.
    """
    if dim % 2:
        raise ValueError(f"the sin-cos position table needs an even width, got {dim}")
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a (possibly fractional) time, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        half = frequency_size // 2
        # Not saved: the released checkpoints do not carry it and it is a pure function of the size.
        # Computed on the CPU even when the model is built on the meta device, as from_pretrained
        # builds it: no checkpoint can fill it in afterwards.
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device="cpu") / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Times (B,) -> embeddings (B, hidden_size)."""
        args = t.float()[:, None] * self.freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table; row ``num_classes`` is the null class when dropout is trained."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Class ids (B,) -> embeddings; in train mode a share ``dropout_prob`` become the null class."""
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens, with optional LayerNorm on queries and keys."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block whose norms are shifted, scaled and gated by the condition."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) under the condition c (B, C) -> (B, N, C)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """The conditioned norm and the linear map from the hidden width to the output channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) under the condition c (B, C) -> (B, N, out_channels)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass(frozen=True)
class LatentStats:
    """The normalisation ``(z - mean) / std`` a generator's latents went through, and where its numbers came from."""

    mean: float
    std: float
    source: str = ""

    def __post_init__(self):
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError("latent_stats needs a finite mean and a positive std, "
                             f"got mean {self.mean}, std {self.std}")

    @classmethod
    def from_dict(cls, record: dict) -> "LatentStats":
        """From the ``latent_stats`` entry of a config.json: ``{"mean", "std", "source"}``."""
        if not isinstance(record, dict) or not {"mean", "std"} <= record.keys() <= {"mean", "std", "source"}:
            raise ValueError("latent_stats must be a mapping with keys mean, std and (optionally) source, "
                             f"got {record!r}")
        return cls(float(record["mean"]), float(record["std"]), str(record.get("source", "")))

    @classmethod
    def of_tokenizer(cls, tokenizer) -> "LatentStats":
        """The tokenizer config's vq_mean / vq_std: what released generators were trained with."""
        return cls(float(tokenizer.config.vq_mean), float(tokenizer.config.vq_std),
                   "tokenizer config (vq_mean, vq_std)")

    def to_dict(self) -> dict:
        """The ``latent_stats`` entry of a config.json."""
        return {"mean": self.mean, "std": self.std, "source": self.source}

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Tokenizer latents -> the space the generator works in."""
        return (z - self.mean) / self.std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Generator latents -> the tokenizer's scale."""
        return z * self.std + self.mean


@dataclass(frozen=True)
class TokenizerRecord:
    """The tokenizer whose latents a generator learned: its :meth:`Tokenizer.identity` and where it was loaded from."""

    identity: str
    source: str = ""

    @classmethod
    def from_dict(cls, record: dict) -> "TokenizerRecord":
        """From the ``tokenizer`` entry of a config.json: ``{"identity", "source"}``."""
        if not isinstance(record, dict) or not {"identity"} <= record.keys() <= {"identity", "source"}:
            raise ValueError(f"tokenizer must be a mapping with keys identity and (optionally) source, got {record!r}")
        return cls(str(record["identity"]), str(record.get("source", "")))


@dataclass
class TransformerConfig:
    """Constructor arguments shared by SiT and DiT, named as in the released config.json files,
    and what ctok's trainer records about the latents (None for released checkpoints)."""

    input_size: int = 128  # number of latent tokens
    in_channels: int = 32  # latent width
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    qk_norm: bool = False
    latent_stats: LatentStats | None = None  # None: the tokenizer's vq_mean / vq_std apply
    tokenizer: TokenizerRecord | None = None  # None: trained elsewhere, on a tokenizer ctok cannot check

    def __post_init__(self):
        # config.json holds the two records as plain mappings; from_dict refuses anything else.
        if self.latent_stats is not None and not isinstance(self.latent_stats, LatentStats):
            self.latent_stats = LatentStats.from_dict(self.latent_stats)
        if self.tokenizer is not None and not isinstance(self.tokenizer, TokenizerRecord):
            self.tokenizer = TokenizerRecord.from_dict(self.tokenizer)


# Config fields that a config.json holds only when they are set.
_RECORDED_KEYS = ("latent_stats", "tokenizer", "noise_schedule")


class DiffusionTransformer(BlockStack, PretrainedModel):
    """The shared network; see :class:`SiT` and :class:`DiT` for the two parameterisations.

    Its blocks are recomputed in the backward pass under activation checkpointing
    (:mod:`ctok.models.checkpointing`).
    """

    # Keys that are not config fields but that the released configs carry and ctok reads or writes:
    # hub metadata, the attention kernel choice, and flags fixed for 1-D latents (checked on reading).
    handled_keys = frozenset({"license", "repo_url", "tags", "fused_attn", "flash_attn", "use_cfg", "vae_1d",
                              "patch_size", "decoder_hidden_size"})

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.num_tokens = config.input_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels  # SiTConfig and DiTConfig each say what their model predicts
        self.num_classes = config.num_classes
        self.x_embedder = nn.Linear(config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        self.register_buffer("pos_embed", sincos_table_1d(config.input_size, config.hidden_size).unsqueeze(0))
        self.blocks = nn.ModuleList(
            Block(config.hidden_size, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(config.hidden_size, config.out_channels)
        self.initialize_weights()

    @property
    def has_null_class(self) -> bool:
        """Whether class ``num_classes`` exists: the null class that classifier-free guidance uses."""
        return self.config.class_dropout_prob > 0

    def extra_repr(self) -> str:
        """The first line of the repr: shapes, classes, and whether it is in train or eval mode."""
        mode = "train" if self.training else "eval"
        null = " + the null class" if self.has_null_class else ""
        return f"{self.num_tokens} tokens x {self.in_channels} channels, {self.num_classes} classes{null}, {mode} mode"

    def initialize_weights(self) -> None:
        """adaLN-Zero: every block starts as the identity and the output starts at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    # True inside inputs_checked(); a class attribute, so that a model outside it needs no state.
    _inputs_checked_by_caller = False

    @contextmanager
    def inputs_checked(self) -> Iterator[None]:
        """Within the block, forward skips :meth:`check_inputs`: for a sampler, which checks its noise
        and labels once per call and then feeds the model inputs built from them at every step.
        The finite test and the label range read values back from the device, a host-device sync
        per model evaluation that would stall the GPU at every solver step."""
        before = self._inputs_checked_by_caller
        self._inputs_checked_by_caller = True
        try:
            yield
        finally:
            self._inputs_checked_by_caller = before

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """Raise ValueError unless x (B, N, D), t (B,) and the labels y (B,) fit this model."""
        # Compiled: checked once outside the graph, inside it they only break it.
        if self._inputs_checked_by_caller or torch.compiler.is_compiling():
            return
        # The finite check costs a device sync: inference gets it, training steps (which watch
        # their loss) do not.
        check_tensor("x", x, (None, self.num_tokens, self.in_channels), finite=not torch.is_grad_enabled())
        check_tensor("t", t, (x.shape[0],))
        check_batch("t", t, x.shape[0])
        check_labels("y", y, x.shape[0], self.y_embedder.embedding_table.num_embeddings)

    def backbone(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The network's output for checked inputs: (B, N, out_channels)."""
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = self.run_block(block, h, c)
        return self.final_layer(h, c)

    # -- configuration ---------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: dict) -> dict:
        """Refuse the flags of the original code that ctok does not implement for 1-D latents."""
        if config.get("vae_1d") is False:
            raise ValueError(f"{cls.kind} config has vae_1d=false: ctok only runs models on 1-D latent tokens")
        if config.get("patch_size", 1) != 1:
            raise ValueError(f"{cls.kind} on 1-D latents uses patch_size 1, got {config['patch_size']}")
        dec = config.get("decoder_hidden_size")
        if dec is not None and dec != config.get("hidden_size", TransformerConfig.hidden_size):
            raise ValueError(f"decoder_hidden_size {dec} must equal hidden_size {config.get('hidden_size')}")
        return config

    def config_entries(self) -> dict:
        """The original constructor's arguments (records only when set) and the 1-D flags its loader reads."""
        entries = {k: v for k, v in super().config_entries().items() if not (k in _RECORDED_KEYS and v is None)}
        return {**entries, "vae_1d": True, "patch_size": 1, "license": self.extra_config.get("license", "apache-2.0")}

    def num_parameters(self) -> int:
        """How many numbers the parameters hold (buffers not counted)."""
        return sum(p.numel() for p in self.parameters())


@dataclass
class SiTConfig(TransformerConfig):
    """A SiT's config: the shared fields and the flow path it was trained on."""

    path_type: str = "linear"

    def __post_init__(self):
        super().__post_init__()
        if self.path_type not in PATH_TYPES:
            raise ValueError(f"path_type must be one of {PATH_TYPES}, got {self.path_type!r}")

    @property
    def out_channels(self) -> int:
        """The velocity has the latents' channels."""
        return self.in_channels


class SiT(DiffusionTransformer):
    """Velocity model for flow matching: ``sit(x, t, y) -> v`` with x (B, N, D), t in [0, 1].

    Build one with :func:`build_sit` (a preset, random weights) or :meth:`from_config`; load one with
    :meth:`from_pretrained` (or ``ctok.load_sit``); sample with :func:`ctok.sampling.sample_sit`.
    """

    kind = "sit"
    config_class = SiTConfig

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The velocity (B, N, D) at latents x (B, N, D), times t (B,) in [0, 1] and labels y (B,)."""
        self.check_inputs(x, t, y)
        return self.backbone(x, t, y)

    def config_entries(self) -> dict:
        """The config.json entries of a released SiT, with the flags its original loader reads."""
        return {**super().config_entries(), "decoder_hidden_size": self.config.hidden_size,
                "use_cfg": self.has_null_class, "fused_attn": False}


@dataclass
class DiTConfig(TransformerConfig):
    """A DiT's config: the shared fields, whether it learns its variance, and its noise schedule."""

    learn_sigma: bool = True
    noise_schedule: str | None = None  # the schedule it was trained on; None: cosine, as every released DiT

    def __post_init__(self):
        super().__post_init__()
        if self.noise_schedule not in (None, *NOISE_SCHEDULES):
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")

    @property
    def out_channels(self) -> int:
        """Noise channels, and as many variance channels with learned sigma."""
        return self.in_channels * (2 if self.learn_sigma else 1)


class DiT(DiffusionTransformer):
    """Noise model for Gaussian diffusion: ``dit(x, t, y) -> (eps, var)`` concatenated on channels.

    With ``learn_sigma`` the last D channels are in [-1, 1] after training and select the
    log-variance between the posterior variance (-1) and beta_t (+1).

    Build one with :func:`build_dit` (a preset, random weights) or :meth:`from_config`; load one with
    :meth:`from_pretrained` (or ``ctok.load_dit``); sample with :func:`ctok.sampling.sample_dit`.
    """

    kind = "dit"
    config_class = DiTConfig

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Noise and variance channels (B, N, D or 2D) at latents x (B, N, D), integer steps t (B,), labels y (B,)."""
        self.check_inputs(x, t, y)
        if t.is_floating_point():
            raise ValueError(f"DiT takes integer timesteps in [0, 1000), got dtype {t.dtype}")
        return self.backbone(x, t, y)


_FAMILIES = {"SiT": SiT, "DiT": DiT}


def build_preset(name: str, *, input_size: int, in_channels: int, num_classes: int = 1000, **overrides):
    """Build ``SiT-XL/1``, ``DiT-B/1`` ... (``GENERATOR_PRESET_NAMES`` in :mod:`ctok.models.presets`) for
    latents of ``input_size`` tokens x ``in_channels``, with random weights, in train mode; ``overrides`` are
    further config fields."""
    family, _, size = name.partition("-")
    if name not in GENERATOR_PRESET_NAMES:
        raise ValueError(f"unknown generator preset {name!r}; choose one of {list(GENERATOR_PRESET_NAMES)}")
    depth, hidden, heads = GENERATOR_SIZES[size.partition("/")[0]]
    cfg = dict(input_size=input_size, in_channels=in_channels, hidden_size=hidden, depth=depth,
               num_heads=heads, num_classes=num_classes)
    cfg.update(overrides)
    return _FAMILIES[family].from_config(cfg)


def _build_family(cls, name: str, input_size: int, in_channels: int, num_classes: int, overrides: dict):
    """:func:`build_preset`, refusing a preset of the other family."""
    if name in GENERATOR_PRESET_NAMES and not name.startswith(cls.__name__):
        other = name.partition("-")[0]
        raise ValueError(f"{name!r} is a {other} preset; build_{cls.kind} builds {cls.__name__}s: "
                         f"use build_{other.lower()}({name!r}, ...)")
    return build_preset(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes, **overrides)


def build_sit(name: str, *, input_size: int, in_channels: int, num_classes: int = 1000,
              **overrides) -> SiT:
    """A SiT preset (``SiT-XL/1``, ``SiT-L/1``, ``SiT-B/1``, ``SiT-S/1``) with random weights, in train mode,
    for latents of ``input_size`` tokens x ``in_channels`` (a tokenizer's ``num_tokens`` x ``latent_dim``).

    For released weights load a hub id instead, e.g. ``ctok.load_sit("MAETok/sit-xl_maetok-b-128")``.
    """
    return _build_family(SiT, name, input_size, in_channels, num_classes, overrides)


def build_dit(name: str, *, input_size: int, in_channels: int, num_classes: int = 1000,
              **overrides) -> DiT:
    """A DiT preset (``DiT-XL/1``, ``DiT-L/1``, ``DiT-B/1``, ``DiT-S/1``) with random weights, in train mode,
    for latents of ``input_size`` tokens x ``in_channels`` (a tokenizer's ``num_tokens`` x ``latent_dim``).

    For released weights load a hub id instead, e.g. ``ctok.load_dit("SoftVQVAE/dit-xl_softvq-l-64")``.
    """
    return _build_family(DiT, name, input_size, in_channels, num_classes, overrides)
