"""training.compile: torch.compile applied from outside the model, one Transformer block at a time
(as torchtitan does). Each block's forward and backward become inductor graphs, whose elementwise
ops (norms, RoPE, SwiGLU, residuals) are fused into a few generated kernels (C++/OpenMP on CPU,
Triton on GPU); the model code stays plain, and parameter names, so checkpoints, do not change.

    n = apply_compile(model)    # after activation checkpointing (recompute.py), before the engine

Compiling happens at the first forward of each block shape (tens of seconds on a CPU, paid once
per process). The number of patches changes from batch to batch, so after the first batch the
global model's blocks are compiled with a symbolic sequence length instead of once per length.
"""

from __future__ import annotations

import torch.nn as nn

from blt.model.layers import Block

# compiled graphs per block code: training and evaluation, three model widths, static then
# symbolic lengths; past dynamo's default of 8 it would fall back to eager without an error
RECOMPILE_LIMIT = 64


def apply_compile(model: nn.Module) -> int:
    """torch.compile every Block of `model` in place; returns how many."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)
