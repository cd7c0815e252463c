"""SoftVQ: a differentiable soft vector quantizer over grouped codebooks.

The N latent tokens are split into ``num_codebooks`` contiguous groups; group g is quantized
with codebook C_g. With tokens and codewords L2-normalised,

    p = softmax(z . C_g^T / tau),    z_q = p . C_g

The codebook is detached inside the logits, so it learns only through z_q. Training adds an
entropy loss that asks each token to be confident (low per-sample entropy) while the batch uses
many codes (high entropy of the average assignment).

Under torchrun the average assignment, and the code-usage history, span every process's share of
the batch (:mod:`ctok.models.collectives`), so N processes train like one with the whole batch.
With gradient accumulation the average spans one forward pass, i.e. one micro-batch of every
process (global batch / grad_accum images), as the original computes it per forward: the
average over all micro-batches of a step would need every micro-batch's assignments before the
first backward, hence all their graphs held at once, which accumulation is there to avoid. So
1 process x batch b x 2 accumulation steps trains slightly differently from batch 2b at once.

Precision: the logits, the assignment and z_q are computed in float32 even under bf16 autocast.
The logits are cosines in [-1, 1] that are then divided by tau (0.07) and, in the entropy loss,
by 0.01: a bf16 cosine is off by a few thousandths (8 significant bits), which those divisions
turn into errors of hundredths to tenths in the softmax's input (tests/test_quantizers.py shows
z_q off by 0.02 and its gradient by 0.26 on a small case).

Usage tracking stays on the device: the history is updated and the usage figure computed there
every training forward, and only the runner reads it back, when it writes the log, so one
process never waits for the GPU here. (Under torchrun the gather of every process's codes still
reads their counts back, since the shares may differ when files are unreadable.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctok.models.collectives import gather_over_processes, sum_over_processes
from ctok.numerics import without_autocast

USAGE_HISTORY = 65536  # argmax codes remembered per codebook for the usage statistic


def entropy_loss(logits: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean per-row entropy minus the entropy of the mean distribution, at ``temperature``.

    ``logits`` (..., K), every leading position a row. Minimising it makes each assignment sharp
    and the average one flat. The average is taken over the rows of every process (see the module
    docstring); the per-row mean stays local, as every other loss term of a process does, and
    DistributedDataParallel's gradient average makes it the global one.
    """
    scaled = logits.reshape(-1, logits.shape[-1]) / temperature
    probs = F.softmax(scaled, dim=-1)
    sample_entropy = -(probs * F.log_softmax(scaled, dim=-1)).sum(-1).mean()
    rows = probs.new_full((1,), probs.shape[0])  # filled on the device: no host-to-device copy
    totals = sum_over_processes(torch.cat([probs.sum(0), rows]))
    avg = totals[:-1] / totals[-1]
    avg_entropy = -(avg * torch.log(avg + 1e-6)).sum()
    return sample_entropy - avg_entropy


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor
    entropy_loss: torch.Tensor
    codebook_usage: torch.Tensor  # 0-d float32 on the device; 0 outside training


class SoftVectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, num_codebooks: int = 1, tau: float = 0.07,
                 l2_norm: bool = True, entropy_loss_ratio: float = 0.0):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.num_codebooks = num_codebooks
        self.tau = tau
        self.l2_norm = l2_norm
        self.entropy_loss_ratio = entropy_loss_ratio
        embedding = torch.empty(num_codebooks, codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        self.embedding = nn.Parameter(F.normalize(embedding, dim=-1) if l2_norm else embedding)
        # Recent argmax codes per codebook; saved in the released checkpoints, so kept as a buffer.
        self.register_buffer("codebook_used", torch.zeros(num_codebooks, USAGE_HISTORY))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, n, d = z.shape
        if n % self.num_codebooks:
            raise ValueError(f"{n} latent tokens cannot be split into {self.num_codebooks} codebook groups")
        # float32 island (see the module docstring); z_q leaves in the precision of z and the
        # codebook together, so a bf16 model without autocast still gets bf16 out.
        out_dtype = torch.promote_types(z.dtype, self.embedding.dtype)
        with without_autocast(z.device):
            groups = z.float().view(b, self.num_codebooks, n // self.num_codebooks, d).transpose(0, 1)  # (G, B, n/G, d)
            codebook = self.embedding.float()
            if self.l2_norm:
                codebook, groups = F.normalize(codebook, dim=-1), F.normalize(groups, dim=-1)
            logits = torch.einsum("gbnd,gkd->gbnk", groups, codebook.detach())
            probs = F.softmax(logits / self.tau, dim=-1)
            z_q = torch.einsum("gbnk,gkd->gbnd", probs, codebook).transpose(0, 1).reshape(b, n, d)
            loss = z.new_zeros((), dtype=torch.float32)
            usage = z.new_zeros((), dtype=torch.float32)
            if self.training:
                if self.entropy_loss_ratio > 0:
                    loss = self.entropy_loss_ratio * entropy_loss(logits)
                usage = self._track_usage(probs.argmax(-1).flatten(1))
        return QuantizerOutput(z_q.to(out_dtype), loss, usage)

    @torch.no_grad()
    def _track_usage(self, codes: torch.Tensor) -> torch.Tensor:
        """Append this batch's codes (G, M), of every process in rank order, to the history; return
        the share of codes seen in it (:meth:`codebook_usage`). Every replica keeps the history one
        process would."""
        codes = gather_over_processes(codes, dim=1)
        keep = min(codes.shape[1], USAGE_HISTORY)
        history = self.codebook_used
        history.copy_(torch.cat([history[:, keep:], codes[:, -keep:].to(history.dtype)], dim=1))
        return self.codebook_usage()

    @torch.no_grad()
    def codebook_usage(self) -> torch.Tensor:
        """The share of each codebook's codes that occur in the history, averaged over codebooks:
        a 0-d float32 tensor on the buffer's device, computed without reading anything back.

        A code "occurs" when any of the history's USAGE_HISTORY entries holds it (the zeros the
        history starts with count as code 0, as they always have).
        """
        history = self.codebook_used
        seen = torch.zeros(self.num_codebooks, self.codebook_size, dtype=torch.bool, device=history.device)
        seen.scatter_(1, history.long(), True)
        # Each codebook's share in float64 before the mean, the order the figure was defined in.
        return (seen.sum(1).double() / self.codebook_size).mean().float()
