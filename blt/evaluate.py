"""Bits per byte on held-out bytes.

    blt eval runs/tiny --data held_out.txt      # prints {"bpb": ..., "bytes": ..., ...}

BPB = total next-byte loss (nats) on real byte targets / (ln 2 * number of those bytes); the
BOS/EOS markers and right padding are not counted. `check_device` is the --device check of every
inference verb (eval, generate).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from blt.data import OFFSET, PAD_ID, DataError, eval_windows
from blt.patching import Patcher
from blt.typed import OptionError, PosInt, check_option


def check_device(device: str, name: str = "device") -> str:
    """`device` (cpu, cuda, cuda:N, mps, or auto = cuda when visible) checked against this machine
    and this torch build; returns the device to use. `name` is how the caller spells the option
    (device, --device); an OptionError names the fix."""
    fix = f"{name} cpu" if name.startswith("-") else f"{name}='cpu'"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"{name} {device!r} is not a device: use cpu, cuda, cuda:N, mps or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA device is visible"
        )
        raise OptionError(f"{name} {device}: {why}; use {fix}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError(
            f"{name} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"{name} {device}: no MPS device is visible; use {fix}")
    return device


def check_eval_options(batch_size: int, max_bytes: int | None, flag: bool = False) -> None:
    """batch_size >= 1 and max_bytes >= 1 or None, named as Python (or, flag=True, the CLI) spells them."""
    check_option("batch_size", batch_size, PosInt, flag=flag)
    check_option("max_bytes", max_bytes, PosInt, optional=True, flag=flag)


def autocast_ctx(device: torch.device | str, dtype: torch.dtype | None):
    dev = torch.device(device)
    if dtype is None or dtype == torch.float32:
        return torch.autocast(dev.type, enabled=False)
    return torch.autocast(dev.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model,
    patcher: Patcher,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_bytes: int | None = None,
    device="cpu",
    amp_dtype=None,
    rank: int = 0,
    world_size: int = 1,
    reduce=None,
) -> dict:
    """BPB over every byte of `tokens` (up to max_bytes). In a job of world_size processes, rank r
    scores batches r, r + world_size, ... and `reduce` (a sum over ranks) combines the counts; every
    rank runs the same number of forwards (padding batches score nothing), as ZeRO-3 needs."""
    check_eval_options(batch_size, max_bytes)
    was_training = model.training
    model.eval()
    num_targets = max(0, min(len(tokens) - 1, max_bytes if max_bytes is not None else len(tokens)))
    num_windows = math.ceil(num_targets / seq_len)
    num_batches = math.ceil(num_windows / batch_size)  # what eval_windows yields
    rounds = math.ceil(num_batches / world_size)
    mine = (b for i, b in enumerate(eval_windows(tokens, seq_len, batch_size, max_bytes)) if i % world_size == rank)
    sums = [0.0, 0, 0, 0]  # nats, bytes scored, patches, bytes patched
    for _ in range(rounds):
        batch = next(mine, None)
        if batch is None:  # this rank's share ran out: a forward that scores nothing keeps ranks in step
            batch = torch.full((1, seq_len + 1), PAD_ID, dtype=torch.long)
        batch = batch.to(device)  # (b, L + 1)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast_ctx(device, amp_dtype):
            logits, patch_ids, _ = patcher.forward(model, inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        is_byte = targets >= OFFSET
        real = inputs != PAD_ID
        sums[0] += float(loss[is_byte].sum())
        sums[1] += int(is_byte.sum())
        sums[2] += int(((patch_ids.diff(dim=1, prepend=patch_ids[:, :1] - 1) > 0) & real).sum())
        sums[3] += int(real.sum())
    if reduce is not None:
        sums = reduce(sums)
    if was_training:
        model.train()
    nats, nbytes, patches, patched_bytes = sums
    if nbytes == 0:
        raise DataError("no bytes to evaluate: the data holds no text (pass a file with some text)")
    return {
        "bpb": nats / nbytes / math.log(2),
        "loss": nats / nbytes,
        "bytes": int(nbytes),
        "avg_patch_size": patched_bytes / max(1, patches),
    }
