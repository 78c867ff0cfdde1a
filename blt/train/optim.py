"""AdamW with weight-decay groups, and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from blt.config import OptimizerConfig, ScheduleConfig


def param_groups(params: list[nn.Parameter], embed_ids: set[int], weight_decay: float) -> list[dict]:
    """Decay matrices of Linear layers; never norms, biases or embedding tables."""
    decay, no_decay = [], []
    for p in params:
        (decay if p.dim() >= 2 and id(p) not in embed_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Optimizers:
    """AdamW for the dense parameters plus a lazy SparseAdam for sparse-gradient embedding tables
    (only the rows a batch used are read and updated). Behaves as one optimizer: its param_groups
    are both optimizers' groups, so setting the learning rate reaches both."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer):
        self.parts = [dense, sparse]

    @property
    def param_groups(self) -> list[dict]:  # live: load_state_dict replaces the parts' group dicts
        return [g for opt in self.parts for g in opt.param_groups]

    def step(self, closure=None):
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": [opt.state_dict() for opt in self.parts]}

    def load_state_dict(self, state_dict):
        for opt, sd in zip(self.parts, state_dict["parts"]):
            opt.load_state_dict(sd)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer | Optimizers:
    embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    sparse_ids = {id(m.weight) for m in embeds if m.sparse}
    params = [p for p in model.parameters() if p.requires_grad]
    dense = torch.optim.AdamW(
        param_groups([p for p in params if id(p) not in sparse_ids], {id(m.weight) for m in embeds}, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )
    sparse = [p for p in params if id(p) in sparse_ids]
    if not sparse:
        return dense
    return Optimizers(dense, torch.optim.SparseAdam(sparse, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of all gradients (sparse ones included), scaled down to max_norm if above."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # once: repeated rows summed, so values() are the row grads
    total = torch.linalg.vector_norm(
        torch.stack(
            [torch.linalg.vector_norm((p.grad.values() if p.grad.is_sparse else p.grad).float()) for p in params]
        )
    )
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            if p.grad.is_sparse:
                p.grad = p.grad * coef
            else:
                p.grad.mul_(coef)
    return float(total)


def lr_at(step: int, total: int, base: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return base
    span = max(1, total - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.decay == "cosine" else 1 - frac
    return base * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)
