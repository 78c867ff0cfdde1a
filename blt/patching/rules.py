"""The pure rules every patching mode shares: a cap on patch length, patch ids from patch starts,
patch lengths, and next-byte entropies from logits. A start at byte t never depends on a byte
after t, so patching never looks ahead.

    ids = patch_ids_from_starts(starts)      # (B, T) bool -> (B, T) patch index of every byte
"""

from __future__ import annotations

import math

import torch


def limit_patch_length(starts: torch.Tensor, max_len: int | None) -> torch.Tensor:
    """Insert starts so that no patch is longer than `max_len` bytes (greedy, left to right):
    a patch that began at s is cut at s + max_len, s + 2 * max_len, ..."""
    if max_len is None:
        return starts
    starts = starts.clone()
    starts[:, 0] = True
    T = starts.shape[1]
    pos = torch.arange(T, device=starts.device).expand_as(starts)  # (B, T)
    seg_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values  # start of each byte's patch
    return starts | ((pos - seg_start) % max_len == 0)


def patch_ids_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) bool starts -> (B, T) long patch index of each byte (0-based)."""
    return starts.long().cumsum(1) - 1


def patch_sizes(patch_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) patch ids -> (N,) the length in bytes of every patch of the batch, row after row (a
    row's last patch may be cut by the window)."""
    B, T = patch_ids.shape
    flat = (patch_ids + torch.arange(B, device=patch_ids.device)[:, None] * (T + 1)).flatten()
    counts = torch.bincount(flat)
    return counts[counts > 0]


def patch_lengths(starts: torch.Tensor) -> list[list[int]]:
    """(B, T) bool starts (position 0 a start) -> the lengths in bytes of each row's patches."""
    sizes = patch_sizes(patch_ids_from_starts(starts))
    return [chunk.tolist() for chunk in sizes.split(starts.sum(1).tolist())]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy in nats of the predicted distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Next-byte logits (B, T, V) -> entropies aligned to the byte they predict: (B, T) with
    H[:, t] = entropy of p(x_t | x_<t) = entropy(logits[:, t-1]); H[:, 0] = +inf (always a start)."""
    ent = entropy(logits)  # (B, T) entropy of the prediction made at t
    out = torch.full_like(ent, math.inf)
    out[:, 1:] = ent[:, :-1]
    return out
