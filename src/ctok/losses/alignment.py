"""Representation alignment: pull latent tokens towards a frozen teacher's patch features.

SoftVQ-VAE projects each latent token with a small MLP (``d -> 1024 -> 1024 -> teacher width``,
SiLU between) and compares it with the teacher's patch features. N latent tokens face P teacher
patches (P a multiple of N): token i stands for patches ``i*P/N ... (i+1)*P/N - 1`` in raster
order, i.e. each projected token is repeated P/N times. The loss is the negative cosine
similarity averaged over patches and batch::

    L_align = -mean_{b,p} <ĥ_{b,p}, t_{b,p}> / (||ĥ_{b,p}|| ||t_{b,p}||)

MAETok's auxiliary decoders use the same negative cosine against their teachers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def alignment_projection(latent_dim: int, teacher_dim: int, hidden_dim: int = 1024) -> nn.Sequential:
    """The MLP ``Linear, SiLU, Linear, SiLU, Linear``; as a module named ``projection`` its weights
    are ``projection.0/2/4``, the names training checkpoints of the original carry."""
    return nn.Sequential(
        nn.Linear(latent_dim, hidden_dim),
        nn.SiLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.SiLU(),
        nn.Linear(hidden_dim, teacher_dim),
    )


def negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-mean(cos(prediction, target))`` along the last dimension; the target gets no gradient."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return -F.cosine_similarity(prediction, target.detach(), dim=-1).mean()


def repeat_tokens_to_patches(tokens: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, N, C) -> (B, num_patches, C), each token repeated num_patches / N times in a row."""
    b, n, c = tokens.shape
    if num_patches % n:
        raise ValueError(
            f"alignment repeats each of the {n} latent tokens over the teacher's patches, so the "
            f"teacher's patch count ({num_patches}) must be a multiple of {n}"
        )
    return tokens.unsqueeze(2).expand(b, n, num_patches // n, c).reshape(b, num_patches, c)


def alignment_loss(projected_tokens: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Negative cosine between projected tokens, repeated to the teacher's patches, and the features."""
    repeated = repeat_tokens_to_patches(projected_tokens, teacher_features.shape[1])
    return negative_cosine(repeated, teacher_features)
