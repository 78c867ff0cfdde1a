"""AdamW with weight-decay groups, and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from blt.config import OptimizerConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of Linear layers; never norms, biases or embedding tables."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embed_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
    )


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
