"""Bits per byte on held-out bytes.

    blt eval runs/tiny --data held_out.txt      # prints {"bpb": ..., "bytes": ..., ...}

BPB = total next-byte loss (nats) on real byte targets / (ln 2 * number of those bytes); the
BOS/EOS markers and right padding are not counted.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from blt.data import OFFSET, PAD_ID, eval_windows
from blt.entropy import Patcher


def autocast_ctx(device: torch.device | str, dtype: torch.dtype | None):
    dev = torch.device(device)
    if dtype is None or dtype == torch.float32:
        return torch.autocast(dev.type, enabled=False)
    return torch.autocast(dev.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, patcher: Patcher, tokens: np.ndarray, seq_len: int, batch_size: int,
             max_bytes: int | None = None, device="cpu", amp_dtype=None) -> dict:
    was_training = model.training
    model.eval()
    nats, nbytes, patches, patched_bytes = 0.0, 0, 0, 0
    for batch in eval_windows(tokens, seq_len, batch_size, max_bytes):
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        patch_ids = patcher(inputs)
        with autocast_ctx(device, amp_dtype):
            logits = model(inputs, patch_ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        is_byte = targets >= OFFSET
        nats += float(loss[is_byte].sum())
        nbytes += int(is_byte.sum())
        real = inputs != PAD_ID
        patches += int(((patch_ids.diff(dim=1, prepend=patch_ids[:, :1] - 1) > 0) & real).sum())
        patched_bytes += int(real.sum())
    if was_training:
        model.train()
    if nbytes == 0:
        raise ValueError("no bytes to evaluate")
    return {
        "bpb": nats / nbytes / math.log(2),
        "loss": nats / nbytes,
        "bytes": nbytes,
        "avg_patch_size": patched_bytes / max(1, patches),
    }
