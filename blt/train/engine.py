"""The engine interface the training loop talks to, and its single-process implementation.

The loop only calls `forward`, `backward`, `step`, `save` and `load`; a distributed engine
(DeepSpeed) implements the same five methods, so the loop never changes. What an engine asks of
the code around it is said by the engine, never tested for by that code:

    Engine.prepare(cfg, world, device, kind)  # before the model is built: config changes, process group
    Engine.supports_sparse_grads              # may the hash tables get sparse gradients?
    engine.partitioned                        # weights sharded across ranks: generate uncached
    engine.forwards_on_every_rank             # every rank must run the same forwards (pictures too)
    engine.label                              # how the start-up line names it ("local", "deepspeed ZeRO-2")
    engine.layout                             # engine, ZeRO stage, processes: a checkpoint of another resumes
                                              # through its universal form (reshard.py)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from blt.artifacts.checkpoints import load_weights, read_state_json
from blt.artifacts.files import load_pt
from blt.config import Config, ConfigError
from blt.device import autocast_ctx
from blt.errors import UserError
from blt.proc import log
from blt.train.checkpoint import load_training_state, save_checkpoint, set_rng_state
from blt.train.distributed import Dist
from blt.train.optim import build_optimizer, clip_grad_norm
from blt.train.reshard import Layout, describe_change, load_universal, rng_file, universal_checkpoint


class DivergedError(UserError):
    """A non-finite loss or gradient norm, found before the update it would have made: the weights
    are still those of the last completed step."""


class LocalEngine:
    """Plain PyTorch on one device: AdamW, gradient clipping, autocast when asked."""

    supports_sparse_grads = True  # sparse hash-table gradients go to a lazy SparseAdam (optim.py)
    partitioned = False  # the one process holds every weight
    forwards_on_every_rank = False  # no other process waits on this one's forwards
    label = "local"
    layout = Layout("local", None, 1)

    @classmethod
    def prepare(cls, cfg: Config, world: Dist, device: torch.device, kind: str = "local") -> None:
        """Before the model is built: one process changes nothing and joins no process group."""

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device, amp_dtype: torch.dtype | None):
        if cfg.training.dtype == "fp16":
            raise ConfigError(
                "training.dtype=fp16 needs loss scaling, which the DeepSpeed engine provides: "
                "use distributed.engine=deepspeed, or training.dtype=bf16"
            )
        self.model, self.cfg, self.device, self.amp_dtype = model, cfg, device, amp_dtype
        self.optimizer = build_optimizer(model, cfg.optimizer)

    def forward(self, inputs: torch.Tensor, patch_ids: torch.Tensor | None, routing: bool = False):
        """The model's forward (logits, or with routing=True (logits, Routing | None))."""
        with autocast_ctx(self.device, self.amp_dtype):
            return self.model(inputs, patch_ids, routing=routing)

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's mean loss; scaled so the accumulated gradient is the step's mean."""
        (loss / self.cfg.training.grad_accum).backward()

    def step(self, lr: float) -> float:
        """Clip, update with learning rate `lr`, zero the gradients; returns the grad norm. A
        non-finite norm raises DivergedError before anything is updated."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = clip_grad_norm(params, self.cfg.optimizer.grad_clip)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise DivergedError(f"the gradient norm became {norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, run_dir: Path, step: int, state: dict, prune: bool = True) -> Path:
        return save_checkpoint(run_dir, step, self.model, self.optimizer, state, self.cfg, prune)

    def load(self, step_dir: Path) -> dict:
        """Resume: this engine's own files, or a checkpoint of any other layout through its
        universal form (the same weights, Adam moments, step and data position)."""
        state = read_state_json(step_dir)
        saved = Layout.of_state(state)
        if saved == self.layout:
            state = load_training_state(step_dir, self.optimizer)
            load_weights(self.model, step_dir)
            return state
        log(describe_change(step_dir, saved, self.layout, self.cfg))
        load_universal(self.model, self.optimizer, universal_checkpoint(step_dir, log))
        rng = rng_file(step_dir, saved, 0)
        if rng is not None:
            set_rng_state(load_pt(rng))
        return state
