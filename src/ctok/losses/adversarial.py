"""GAN losses for tokenizer training: hinge and non-saturating objectives, LeCAM regularisation,
the adaptive generator weight and the discriminator start step.

Logits may have any shape (the DINO discriminator gives one per token and feature level); every
loss averages over all of them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``(mean(relu(1 - D(x))) + mean(relu(1 + D(x̂)))) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``-mean(D(x̂))``."""
    return -logits_fake.mean()


def non_saturating_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``(mean(softplus(-D(x))) + mean(softplus(D(x̂)))) / 2``: binary cross-entropy, real = 1, fake = 0."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``mean(softplus(-D(x̂)))`` = ``-mean(log sigmoid(D(x̂)))``."""
    return F.softplus(-logits_fake).mean()


DISCRIMINATOR_LOSSES = {"hinge": hinge_discriminator_loss, "non_saturating": non_saturating_discriminator_loss}
GENERATOR_LOSSES = {"hinge": hinge_generator_loss, "non_saturating": non_saturating_generator_loss}


def gan_losses(kind: str):
    """(discriminator loss, generator loss) for ``kind`` in {'hinge', 'non_saturating'}."""
    if kind not in DISCRIMINATOR_LOSSES:
        raise ValueError(f"GAN loss must be one of {sorted(DISCRIMINATOR_LOSSES)}, got {kind!r}")
    return DISCRIMINATOR_LOSSES[kind], GENERATOR_LOSSES[kind]


class LeCAM(nn.Module):
    """LeCAM regularisation (Tseng et al., 2021) with exponential moving anchors.

    ``R = mean(relu(D(x) - a_fake)^2) + mean(relu(a_real - D(x̂))^2)``, where ``a_real`` and
    ``a_fake`` are moving averages of the mean real and fake logits (decay 0.999, starting at 0).
    The anchors are buffers, so a checkpoint resumes them; under torch.distributed the batch means
    are averaged over processes first, so every replica keeps the same anchors as a single process
    that saw the whole batch.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("anchor_real", torch.zeros(()))
        self.register_buffer("anchor_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        self.anchor_real.mul_(self.decay).add_((1 - self.decay) * means[0])
        self.anchor_fake.mul_(self.decay).add_((1 - self.decay) * means[1])

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return (
            F.relu(logits_real - self.anchor_fake).square().mean()
            + F.relu(self.anchor_real - logits_fake).square().mean()
        )


def adaptive_generator_weight(
    reconstruction_loss: torch.Tensor,
    generator_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """Taming-transformers' balance: ``||∇_w L_rec|| / (||∇_w L_gan|| + 1e-4)``, clamped to [0, max_weight].

    ``w`` is the decoder's last layer. The gradients are taken without touching ``.grad``; under
    torch.distributed they are averaged over processes first, which makes the weight that of the
    whole global batch (the local one would differ from rank to rank).
    """
    grad_rec = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    grad_gan = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    if dist.is_available() and dist.is_initialized():
        both = torch.stack([grad_rec, grad_gan])
        dist.all_reduce(both)
        grad_rec, grad_gan = both / dist.get_world_size()
    weight = grad_rec.norm() / (grad_gan.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def gan_weight_at(step: int, weight: float, start: int) -> float:
    """The adversarial weight at ``step``: 0 before the discriminator starts, ``weight`` from ``start`` on."""
    return weight if step >= start else 0.0
