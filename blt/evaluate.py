"""Bits per byte on held-out bytes.

    blt eval runs/tiny --data held_out.txt      # prints {"bpb": ..., "bytes": ..., ...}

BPB = total next-byte loss (nats) on real byte targets / (ln 2 * number of those bytes); the
BOS/EOS markers and right padding are not counted. EvalOptions are `blt eval`'s flags; evaluate()
checks its sizes against the same fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from blt.config import SeqLen
from blt.data import OFFSET, PAD_ID, DataError, eval_windows
from blt.device import autocast_ctx, check_device
from blt.patching import Patcher
from blt.typed import PosInt, check_field, check_fields


@dataclass(frozen=True)
class EvalOptions:
    """`blt eval`'s flags (the same names)."""

    checkpoint: str  # run dir, checkpoint dir or export dir
    data: list[str] | None = None  # text/jsonl/parquet files or globs; None: the run's validation split
    batch_size: PosInt = 8  # windows per forward
    max_bytes: PosInt | None = None  # bytes scored at most; None: all
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    seq_len: SeqLen | None = None  # bytes per scored window; None: the model's data.seq_len (longer: extrapolation)

    def checked(self) -> EvalOptions:
        """Each flag checked (a one-line error naming it) before the (slow) load; device resolved."""
        opts = check_fields(self, flag=True)
        return replace(opts, device=check_device(opts.device, "--device"))


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
    for name, value in (("batch_size", batch_size), ("max_bytes", max_bytes)):
        check_field(EvalOptions, name, value)  # named as Python spells them
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
