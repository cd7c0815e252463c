"""SoftVQ's entropy loss and code-usage history: one process, and two that must act like it."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ctok.models.quantizers import SoftVectorQuantizer, entropy_loss

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
        assert out[rank][2] == pytest.approx(whole.codebook_usage) and out[rank][3] == pytest.approx(usage)
        assert torch.equal(out[rank][4], quantizer.codebook_used)
