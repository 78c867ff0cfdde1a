"""Activation checkpointing applied from outside the model: every Transformer block's forward
is recomputed in backward instead of keeping its activations (training.activation_checkpointing).

The model code stays plain; parameter names (and so checkpoints) do not change.
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from blt.model.layers import Block


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap each Block's forward in non-reentrant checkpointing (RNG replayed, so dropout is
    identical); returns the number of blocks wrapped."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not _inner.__self__.training:
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)
