"""SoftVQ's entropy loss and code-usage history: one process, and two that must act like it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ctok.models.quantizers import USAGE_HISTORY, SoftVectorQuantizer, entropy_loss

# (B, N, D) latents for 6 samples: 8 tokens of width 4 in 2 codebook groups of 16 codes.
SHAPE, CODES, GROUPS = (6, 8, 4), 16, 2


def _quantizer() -> SoftVectorQuantizer:
    torch.manual_seed(0)
    return SoftVectorQuantizer(CODES, SHAPE[2], GROUPS, tau=0.5, entropy_loss_ratio=0.01).train()


def test_entropy_loss_is_mean_row_entropy_minus_entropy_of_the_mean():
    logits = torch.randn(3, 5, 7)
    p = F.softmax(logits.reshape(-1, 7) / 0.01, dim=-1)
    rows = -(p * torch.log_softmax(logits.reshape(-1, 7) / 0.01, dim=-1)).sum(-1).mean()
    mean = p.mean(0)
    torch.testing.assert_close(entropy_loss(logits), rows + (mean * torch.log(mean + 1e-6)).sum())


def _quantize(quantizer: SoftVectorQuantizer, z: torch.Tensor):
    z = z.clone().requires_grad_(True)
    out = quantizer(z)
    return out, torch.autograd.grad(out.entropy_loss, z)[0]


def _two_process_quantizer(rank: int, store: str, z: torch.Tensor, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    quantizer = _quantizer()
    half = z[rank * 3:(rank + 1) * 3]
    result, grad = _quantize(quantizer, half)
    # Uneven shares (a micro-batch short of unreadable files): 1 sample here, 5 there.
    uneven = z[:1] if rank == 0 else z[1:]
    usage = quantizer(uneven).codebook_usage
    out[rank] = (result.entropy_loss.detach(), grad, result.codebook_usage, usage, quantizer.codebook_used.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_quantize_like_one(tmp_path):
    """The average code assignment spans both processes' samples, so gradients averaged over the
    two (as DistributedDataParallel does) are those of one process holding all six; every replica
    keeps the usage history of that one process, uneven shares included."""
    torch.manual_seed(1)
    z = torch.randn(*SHAPE)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_two_process_quantizer, args=(str(tmp_path / "store"), z, out), nprocs=2)

    quantizer = _quantizer()
    whole, grad = _quantize(quantizer, z)
    usage = quantizer(z).codebook_usage
    torch.testing.assert_close((out[0][0] + out[1][0]) / 2, whole.entropy_loss.detach())
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]) / 2, grad)
    for rank in range(2):
        assert torch.equal(out[rank][2], whole.codebook_usage) and torch.equal(out[rank][3], usage)
        assert torch.equal(out[rank][4], quantizer.codebook_used)


def _forward_and_grads(quantizer: SoftVectorQuantizer, z: torch.Tensor, autocast: bool):
    """The quantizer's output, and the gradient of a loss on it for z; the forward under CPU bf16
    autocast or not, the backward outside it (as the runner does)."""
    z = z.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = quantizer(z)
    (z_grad,) = torch.autograd.grad(out.z_q.square().sum() + out.entropy_loss, z)
    return out, z_grad


def test_under_bf16_autocast_the_quantizer_computes_in_float32():
    """The cosine logits are divided by tau and by the entropy loss's 0.01: from a bf16 einsum they
    would move the assignment. Under CPU bf16 autocast the output, the loss, the usage and the
    gradient are those of float32 (computed in bf16, z_q missed by 0.02 and the gradient by 0.26 here)."""
    torch.manual_seed(2)
    z = F.normalize(torch.randn(*SHAPE), dim=-1)
    codes = F.normalize(z[:2].reshape(-1, SHAPE[2]).repeat(4, 1)[:CODES], dim=-1)
    # A sharp softmax, as in the recipes (tau 0.07): codewords near the latents, the rest random.
    quantizer = SoftVectorQuantizer(CODES, SHAPE[2], GROUPS, tau=0.07, entropy_loss_ratio=0.01).train()
    with torch.no_grad():
        quantizer.embedding[0] = codes + 0.05 * torch.randn_like(codes)
    reference_q = copy.deepcopy(quantizer)
    reference, reference_grad = _forward_and_grads(reference_q, z, autocast=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.einsum("bd,kd->bk", z[0], codes).dtype == torch.bfloat16  # the autocast is in force
    out, grad = _forward_and_grads(quantizer, z, autocast=True)
    torch.testing.assert_close(out.z_q.float(), reference.z_q)
    torch.testing.assert_close(out.entropy_loss.float(), reference.entropy_loss)
    torch.testing.assert_close(grad, reference_grad)
    assert out.z_q.dtype == torch.float32
    assert torch.equal(out.codebook_usage, reference.codebook_usage)
    assert torch.equal(quantizer.codebook_used, reference_q.codebook_used)


def test_usage_figure_is_the_share_of_distinct_codes_in_the_history():
    """The device-side figure (no host read) equals its definition: per codebook, the distinct codes
    among the last USAGE_HISTORY argmax codes over codebook_size (the initial zeros count as code 0),
    averaged over codebooks; the history keeps the newest codes in arrival order."""
    codes = 64
    quantizer = SoftVectorQuantizer(codes, SHAPE[2], GROUPS).train()
    history = torch.zeros(GROUPS, USAGE_HISTORY)
    for seed in range(3):
        z = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))
        out = quantizer(z)
        groups = z.view(SHAPE[0], GROUPS, -1, SHAPE[2]).transpose(0, 1)
        logits = torch.einsum("gbnd,gkd->gbnk", F.normalize(groups, dim=-1), F.normalize(quantizer.embedding, dim=-1))
        history = torch.cat([history, logits.argmax(-1).flatten(1).float()], dim=1)[:, -USAGE_HISTORY:]
        expected = sum(torch.unique(row).numel() / codes for row in history) / GROUPS
        assert torch.equal(quantizer.codebook_used, history)
        assert out.codebook_usage.dtype == torch.float32 and out.codebook_usage.dim() == 0
        assert out.codebook_usage == torch.tensor(expected, dtype=torch.float32)
    assert 1 / codes < expected < 1  # the case is not trivial
    # More codes than the history holds: only the newest USAGE_HISTORY remain.
    quantizer._track_usage(torch.arange(USAGE_HISTORY + 5).remainder(codes).repeat(GROUPS, 1))
    assert torch.equal(quantizer.codebook_used[0, :3], torch.tensor([5.0, 6.0, 7.0]))
    assert quantizer.codebook_usage() == 1.0
    assert quantizer.eval()(z).codebook_usage == 0  # outside training nothing is tracked
