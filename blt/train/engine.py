"""The engine interface the training loop talks to, and its single-process implementation.

The loop only calls `forward`, `backward`, `step`, `save` and `load`; a distributed engine
(DeepSpeed) implements the same five methods, so the loop never changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from blt.config import Config, ConfigError
from blt.evaluate import autocast_ctx
from blt.train.checkpoint import load_training_state, load_weights, save_checkpoint
from blt.train.optim import build_optimizer, clip_grad_norm


class LocalEngine:
    """Plain PyTorch on one device: AdamW, gradient clipping, autocast when asked."""

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device, amp_dtype: torch.dtype | None):
        if cfg.training.dtype == "fp16":
            raise ConfigError("training.dtype=fp16 needs loss scaling, which the DeepSpeed engine provides: "
                              "use distributed.engine=deepspeed, or training.dtype=bf16")
        self.model, self.cfg, self.device, self.amp_dtype = model, cfg, device, amp_dtype
        self.optimizer = build_optimizer(model, cfg.optimizer)

    def forward(self, inputs: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        with autocast_ctx(self.device, self.amp_dtype):
            return self.model(inputs, patch_ids)

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's mean loss; scaled so the accumulated gradient is the step's mean."""
        (loss / self.cfg.training.grad_accum).backward()

    def step(self, lr: float) -> float:
        """Clip, update with learning rate `lr`, zero the gradients; returns the grad norm."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = clip_grad_norm(params, self.cfg.optimizer.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, run_dir: Path, step: int, state: dict) -> Path:
        return save_checkpoint(run_dir, step, self.model, self.optimizer, state, self.cfg)

    def load(self, step_dir: Path) -> dict:
        state = load_training_state(step_dir, self.optimizer)  # refuses a distributed checkpoint first
        load_weights(self.model, step_dir)
        return state
