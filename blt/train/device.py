"""Where a process trains and in what precision: its device, the training dtype (training.dtype
resolved for that device) and its CPU threads. The one place `training.dtype=auto` is decided, for
the trainer, the DeepSpeed config and `blt plan` alike (facts about any device: blt/device.py).

    device, amp_dtype = resolve_device(cfg, world.local_rank)   # cuda:local_rank or cpu; bf16 / None
    resolved_dtype(cfg, gpu=True)                                # "bf16" (auto on a GPU), "fp16" or "fp32"
"""

from __future__ import annotations

import os

import torch

from blt.config import Config, ConfigError
from blt.model.sparse_attention import check_trainable
from blt.train.distributed import Dist

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32 trains without autocast


def resolved_dtype(cfg: Config, gpu: bool) -> str:
    """training.dtype for this device kind: auto is bf16 on a GPU, fp32 on a CPU."""
    return cfg.training.dtype if cfg.training.dtype != "auto" else ("bf16" if gpu else "fp32")


def resolve_device(cfg: Config, local_rank: int = 0) -> tuple[torch.device, torch.dtype | None]:
    """The device of this process (GPU number local_rank) and the autocast dtype (None = fp32)."""
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda but no CUDA device is visible (use training.device=cpu)")
    dev = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    check_trainable(cfg.model, dev)  # a sparse backend this device cannot train with: one line, now
    return dev, AMP_DTYPES.get(resolved_dtype(cfg, dev.type == "cuda"))


def cpu_threads(cfg: Config, world: Dist) -> int:
    """training.threads, else OMP_NUM_THREADS, else this machine's cores shared by its processes."""
    if cfg.training.threads:
        return cfg.training.threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, world.local_world_size))
