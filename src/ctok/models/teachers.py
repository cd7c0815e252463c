"""Frozen pretrained networks for tokenizer training, by their timm / torchvision names.

* feature teachers (DINOv2-L, SigLIP-so400m): patch features that MAETok's auxiliary decoders
  and SoftVQ's alignment head regress, run at the training resolution with patch 16 (timm
  resamples the patch embedding and position table of the released weights);
* DINO ViT-S/16: the backbone of the feature discriminator;
* VGG16 and AlexNet: the trunks of LPIPS (VGG for the training loss, either for the metric);
* DINOv2 encoders: the initialisation of SoftVQ-VAE's encoder.

Weights are found before anything is built: a local file named in the config wins; otherwise the
Hugging Face hub (its cache when offline, ``HF_HUB_OFFLINE=1``) for timm models and torch.hub's
checkpoint folder for torchvision's VGG16 and AlexNet. When any is missing, :func:`locate_all` raises one
error that names every missing file, where to get it and which config key points to a local copy.
``random_init=True`` builds the same networks with random weights, for tests and smoke runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn

from ctok.downloads import offline, torch_cache_file, torch_cache_path

# The networks the published recipes use.
DINOV2_TEACHER = "vit_large_patch14_dinov2.lvd142m"
SIGLIP_TEACHER = "vit_so400m_patch14_siglip_224.webli"
DINO_DISCRIMINATOR = "vit_small_patch16_224.dino"
VGG16 = "vgg16"
ALEXNET = "alexnet"
# torchvision's ImageNet weight files of the LPIPS trunks.
_TORCHVISION_URLS = {VGG16: "https://download.pytorch.org/models/vgg16-397923af.pth",
                     ALEXNET: "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"}
_TORCHVISION_NAMES = {VGG16: "VGG16", ALEXNET: "AlexNet"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Input statistics a feature teacher can be fed with, by name. MAETok's training code feeds its
# SigLIP teacher ImageNet-normalised images, not SigLIP's own 0.5 / 0.5, so the released weights
# learned to predict the features of that input; "siglip" feeds SigLIP what it was trained on.
INPUT_STATISTICS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "siglip": ((0.5,) * 3, (0.5,) * 3)}


@dataclass(frozen=True)
class WeightsRequest:
    """One network whose pretrained weights a run needs.

    ``model`` is a timm name (``vit_large_patch14_dinov2.lvd142m``), ``vgg16`` or ``alexnet``
    (torchvision's ImageNet weights); ``file`` a local override; ``config_key`` the key that sets ``file``.
    """

    role: str
    model: str
    file: str | None = None
    config_key: str = ""


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that are neither local nor downloadable; the message lists each one."""


def _override_hint(request: WeightsRequest) -> str:
    return f", or set {request.config_key}=/path/to/the/file" if request.config_key else ""


def locate(request: WeightsRequest) -> Path:
    """The local path of ``request``'s weights, downloading them if the hub is reachable.

    Raises MissingWeightsError with a message naming the file and how to provide it.
    """
    if request.file:
        path = Path(request.file).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"{request.role}: {request.config_key or 'file'}={path} does not exist")
        return path
    if request.model in _TORCHVISION_URLS:
        return _locate_torchvision(request)
    return _locate_timm(request)


def _locate_timm(request: WeightsRequest) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_CACHE

    cfg = timm.models.get_pretrained_cfg(request.model)
    if cfg is None or not cfg.hf_hub_id:
        raise MissingWeightsError(
            f"{request.role}: timm has no hub weights for {request.model!r}{_override_hint(request)}"
        )
    repo = cfg.hf_hub_id.split("@")[0]
    candidates = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in candidates:
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=offline()))
        except Exception:  # noqa: BLE001 - offline, not cached, absent from the repo: try the next name
            continue
    raise MissingWeightsError(
        f"{request.role}: weights of timm model {request.model!r} are not in the Hugging Face cache "
        f"({HF_HUB_CACHE}) and could not be downloaded; fetch them with "
        f"`huggingface-cli download {repo} {candidates[0]}`{_override_hint(request)}",
    )


def _locate_torchvision(request: WeightsRequest) -> Path:
    url = _TORCHVISION_URLS[request.model]
    filename = url.rsplit("/", 1)[1]
    try:
        return torch_cache_file(filename, url, progress=False)
    except FileNotFoundError:  # offline or no network: reported below with the file to fetch
        raise MissingWeightsError(
            f"{request.role}: torchvision's {_TORCHVISION_NAMES[request.model]} ImageNet weights are missing; "
            f"download {url} to {torch_cache_path(filename)}{_override_hint(request)}",
        ) from None


def locate_all(requests: list[WeightsRequest]) -> dict[str, Path]:
    """Paths of every request's weights, by role; one error listing every missing file otherwise."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for request in requests:
        try:
            found[request.role] = locate(request)
        except MissingWeightsError as err:
            missing.append(str(err))
    if missing:
        raise MissingWeightsError(
            f"{len(missing)} pretrained network(s) unavailable:\n  - " + "\n  - ".join(missing)
            + "\n(for a test or smoke run without them, set the config's random_init_pretrained: true)"
        )
    return found


def create_vit(model: str, *, image_size: int, patch_size: int, weights: Path | None) -> nn.Module:
    """A timm ViT at ``image_size`` with ``patch_size``; pretrained from ``weights`` (resampled) or random."""
    kwargs = dict(img_size=image_size, patch_size=patch_size, num_classes=0)
    if weights is None:
        return timm.create_model(model, pretrained=False, **kwargs)
    return timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class FrozenViTFeatures(nn.Module):
    """Patch features (B, P, D) of a frozen timm ViT, for images in [-1, 1].

    Images are mapped to [0, 1] and normalised with the statistics named by ``normalization``
    (a key of :data:`INPUT_STATISTICS`), or with the network's own (timm's pretrained config)
    when it is None. Prefix tokens (class, registers) are dropped. It stays in eval mode.
    """

    def __init__(self, vit: nn.Module, normalization: str | None = None):
        super().__init__()
        if normalization is None:
            mean, std = vit.pretrained_cfg.get("mean", (0.5,) * 3), vit.pretrained_cfg.get("std", (0.5,) * 3)
        elif normalization in INPUT_STATISTICS:
            mean, std = INPUT_STATISTICS[normalization]
        else:
            raise ValueError(f"teacher input normalization must be one of {sorted(INPUT_STATISTICS)}, "
                             f"got {normalization!r}")
        self.vit = freeze(vit)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.vit.num_features

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    def train(self, mode: bool = True) -> "FrozenViTFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images + 1) / 2 - self.mean) / self.std
        return self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]


def feature_teacher(model: str, *, image_size: int, patch_size: int = 16, weights: Path | None,
                    normalization: str | None = None) -> FrozenViTFeatures:
    """A frozen feature teacher (``weights`` None: random, for tests); ``normalization`` as in
    :class:`FrozenViTFeatures`."""
    return FrozenViTFeatures(create_vit(model, image_size=image_size, patch_size=patch_size, weights=weights),
                             normalization)


def torchvision_trunk(model: str, weights: Path | None) -> nn.Sequential:
    """torchvision's VGG16 or AlexNet convolutional trunk (its ``features``), ImageNet weights from
    ``weights`` or random.

    Only the trunk is built: the classifier's parameters (120M for VGG16) would never be used.
    """
    from torchvision.models import AlexNet, vgg

    if model not in _TORCHVISION_URLS:
        raise ValueError(f"no torchvision trunk {model!r}; choose one of {sorted(_TORCHVISION_URLS)}")
    features = vgg.make_layers(vgg.cfgs["D"]) if model == VGG16 else AlexNet().features
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                  if k.startswith("features.")})
    return freeze(features)


def load_pretrained_encoder(backbone: nn.Module, model: str, *, image_size: int, patch_size: int,
                            weights: Path) -> None:
    """Initialise a tokenizer encoder's timm-style ``model`` from pretrained ViT weights (e.g. DINOv2).

    timm resamples the patch embedding and position table to ``patch_size`` and ``image_size``;
    every tensor of ``backbone`` must then be found with the same shape, or this raises.
    """
    source = create_vit(model, image_size=image_size, patch_size=patch_size, weights=weights).state_dict()
    target = backbone.state_dict()
    missing = [k for k in target if k not in source]
    wrong = [f"{k}: {tuple(source[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
             if k in source and source[k].shape != v.shape]
    if missing or wrong:
        raise ValueError(
            f"pretrained {model!r} does not fit the encoder: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f"; shape mismatches {wrong[:5]}"
        )
    backbone.load_state_dict({k: source[k] for k in target})
