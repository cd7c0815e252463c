"""Activation checkpointing: transformer blocks recomputed in the backward pass instead of kept.

A training step's memory is mostly what each block keeps for its backward pass (attention inputs,
MLP hidden states, norms), and it grows with the tokens: a 512-px tokenizer has four times the
image tokens of a 256-px one. With checkpointing on, a block keeps only its inputs and runs its
forward again when the backward pass reaches it: the memory of the activations falls to about one
block's worth plus the blocks' inputs, for about one more forward pass of time.

A module whose forward loops over blocks derives from :class:`BlockStack` and calls each block
through :meth:`BlockStack.run_block`; :func:`set_activation_checkpointing` switches every stack
inside a module (the tokenizer's encoder and decoder, MAETok's auxiliary decoders, a SiT or DiT,
the frozen ViT of the DINO discriminator). The switch is a training setting, not part of the
model: it is in neither the config nor the state dict, and it acts only while autograd records a
graph, so evaluation and sampling (under ``torch.no_grad``) run the blocks as they always do. It
does not ask for train mode: the generator trainer trains its SiT or DiT in eval mode (label
dropout, its only train-time behaviour, is drawn by the task), and that is where it must act.

The recomputation is exact: ``torch.utils.checkpoint`` restores the random generators before it
replays a block, so drop path draws the same samples twice. The non-reentrant variant is used: it
works under DistributedDataParallel and torch.compile, and with inputs that need no gradient (a
frozen encoder).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class BlockStack:
    """Mixin for an ``nn.Module`` that runs a stack of blocks: call each one with :meth:`run_block`."""

    activation_checkpointing: bool = False  # set by set_activation_checkpointing, per instance

    def run_block(self, block: nn.Module, *args):
        """``block(*args)``, recomputed in the backward pass when checkpointing is on and a graph is built."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def block_stacks(module: nn.Module) -> list[BlockStack]:
    """Every :class:`BlockStack` in ``module`` (itself included)."""
    return [m for m in module.modules() if isinstance(m, BlockStack)]


def set_activation_checkpointing(module: nn.Module, enabled: bool = True) -> int:
    """Switch the recomputation of every block stack in ``module``; returns how many stacks it switched.

    A module without blocks (a linear layer, the PatchGAN discriminator) is refused with a
    ValueError: there would be nothing to recompute, and a silent no-op would hide that.
    """
    stacks = block_stacks(module)
    if not stacks:
        raise ValueError(f"{type(module).__name__} has no transformer blocks: activation checkpointing "
                         "recomputes blocks, and there are none to recompute")
    for stack in stacks:
        stack.activation_checkpointing = enabled
    return len(stacks)
