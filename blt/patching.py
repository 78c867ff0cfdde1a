"""Patchers: pure functions that cut byte sequences into patches.

Every patcher returns `starts`, a (B, T) bool tensor that is True where a new patch begins
(position 0 always begins one). A start at byte t depends only on bytes <= t (static, space)
or on bytes < t (entropy: H_t is the entropy of p(x_t | x_<t)), so patching never looks ahead.

    starts = patch_starts(tokens, cfg.patching, entropies=H)   # (B, T) bool, byte-level
    ids = patch_ids_from_starts(starts)                         # (B, T) patch index of every byte
"""

from __future__ import annotations

import math

import numpy as np
import torch

from blt.config import PatchingConfig
from blt.data.tokens import BOS_ID, OFFSET


def static_starts(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A patch every `patch_size` bytes."""
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device)
    return (pos % patch_size == 0).expand(B, T).clone()  # (B, T)


def spacelike(tokens: torch.Tensor) -> torch.Tensor:
    """SpaceByte's rule: a byte is spacelike unless it is an ASCII letter or digit or a UTF-8
    non-ASCII byte (lead or continuation). Special ids (BOS/EOS/PAD) count as spacelike."""
    b = tokens - OFFSET
    letter = ((b >= ord("a")) & (b <= ord("z"))) | ((b >= ord("A")) & (b <= ord("Z")))
    digit = (b >= ord("0")) & (b <= ord("9"))
    non_ascii = b >= 0x80
    return ~(letter | digit | non_ascii)


def space_starts(tokens: torch.Tensor) -> torch.Tensor:
    """SpaceByte boundaries: a patch starts at a non-spacelike byte that follows a spacelike one
    (so "hello world" -> "hello ", "world"); runs of spaces/punctuation stay in one patch."""
    sp = spacelike(tokens)  # (B, T)
    starts = torch.zeros_like(sp)
    starts[:, 1:] = sp[:, :-1] & ~sp[:, 1:]
    starts[:, 0] = True
    return starts


def entropy_starts(entropies: torch.Tensor, threshold: float, mode: str = "global") -> torch.Tensor:
    """Entropy boundaries: H_t > threshold (global) or H_t - H_{t-1} > threshold (monotonic).
    `entropies[:, t]` is the entropy (nats) of the entropy model's prediction of byte t."""
    H = entropies.float()
    if mode == "global":
        starts = H > threshold
    elif mode == "monotonic":
        starts = torch.zeros_like(H, dtype=torch.bool)
        starts[:, 1:] = (H[:, 1:] - H[:, :-1]) > threshold
    else:
        raise ValueError(f"unknown entropy threshold mode '{mode}' (use global or monotonic)")
    starts[:, 0] = True
    return starts


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


def patch_starts(
    tokens: torch.Tensor,
    cfg: PatchingConfig,
    entropies: torch.Tensor | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """Patch starts for `tokens` (B, T) under `cfg`; a BOS always starts a patch."""
    if cfg.mode == "static":
        starts = static_starts(tokens, cfg.patch_size)
    elif cfg.mode == "space":
        starts = space_starts(tokens)
    elif cfg.mode == "entropy":
        if entropies is None:
            raise ValueError("entropy patching needs entropies")
        th = cfg.threshold if threshold is None else threshold
        if th is None:
            raise ValueError("entropy patching needs a threshold (patching.threshold or a derived one)")
        starts = entropy_starts(entropies, th, cfg.threshold_mode)
    else:
        raise ValueError(f"unknown patching mode '{cfg.mode}'")
    starts = starts | (tokens == BOS_ID)
    if cfg.split_first_byte and starts.shape[1] > 1:
        starts[:, 1] = True
    return limit_patch_length(starts, cfg.max_patch_length)


def patch_ids_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) bool starts -> (B, T) long patch index of each byte (0-based)."""
    return starts.long().cumsum(1) - 1


def patch_lengths(starts: torch.Tensor) -> list[list[int]]:
    """Lengths in bytes of each patch, per sequence."""
    out = []
    for row in starts:
        idx = torch.nonzero(row).flatten().tolist() + [row.numel()]
        out.append([b - a for a, b in zip(idx[:-1], idx[1:])])
    return out


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Next-byte logits (B, T, V) -> entropies aligned to the byte they predict: (B, T) with
    H[:, t] = entropy of p(x_t | x_<t) = entropy(logits[:, t-1]); H[:, 0] = +inf (always a start)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)  # (B, T) entropy of the prediction made at t
    out = torch.full_like(ent, math.inf)
    out[:, 1:] = ent[:, :-1]
    return out


def threshold_for_patch_size(
    entropies: torch.Tensor,
    target: float,
    mode: str = "global",
    max_len: int | None = None,
    tokens: torch.Tensor | None = None,
    iters: int = 40,
) -> float:
    """The threshold whose mean patch size on `entropies` (B, T) is closest to `target` bytes.
    Mean patch size grows with the threshold, so a bisection finds it."""
    finite = entropies[torch.isfinite(entropies)].float()
    if finite.numel() == 0:
        raise ValueError("no finite entropies to choose a threshold from")
    span = float(finite.max() - finite.min()) + 1.0
    lo, hi = float(finite.min()) - span, float(finite.max()) + span
    if mode == "monotonic":
        lo, hi = -span, span

    def mean_size(th: float) -> float:
        starts = entropy_starts(entropies, th, mode)
        if tokens is not None:
            starts = starts | (tokens == BOS_ID)
        starts = limit_patch_length(starts, max_len)
        return starts.numel() / float(starts.sum())

    for _ in range(iters):
        mid = (lo + hi) / 2
        if mean_size(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda th: abs(mean_size(th) - target))
    return float(best)


class StreamingStarts:
    """`patch_starts` one byte at a time, for generation: decides whether each arriving byte begins
    a patch from what came before (and, for space patching, the byte itself), with the same rules
    and the same result as `patch_starts` on the whole sequence. One state per row.

        ss = StreamingStarts(cfg.patching, threshold)
        start = ss.push(byte_id, entropy)   # entropy: H of predicting this byte (entropy mode only)
    """

    def __init__(self, cfg: PatchingConfig, threshold: float | None = None):
        self.cfg = cfg
        th = cfg.threshold if threshold is None else threshold
        self.threshold = None if th is None else np.float32(th)  # compared in float32, as patch_starts does
        self.t = 0  # position of the next byte in the window
        self.seg_start = 0  # last start before max_patch_length cuts
        self.prev_space = False
        self.prev_entropy = np.float32(math.inf)

    @staticmethod
    def _spacelike(token: int) -> bool:
        b = token - OFFSET  # `spacelike` for one id
        return not (ord("a") <= b <= ord("z") or ord("A") <= b <= ord("Z") or ord("0") <= b <= ord("9") or b >= 0x80)

    def push(self, token: int, entropy: float | None = None) -> bool:
        c, t = self.cfg, self.t
        space = self._spacelike(token)
        h = np.float32(math.inf if entropy is None else entropy)
        if t == 0:
            start = True
        elif c.mode == "static":
            start = t % c.patch_size == 0
        elif c.mode == "space":
            start = self.prev_space and not space
        elif c.mode == "entropy":
            if entropy is None or self.threshold is None:
                raise ValueError("entropy patching needs the byte's entropy and a threshold")
            with np.errstate(invalid="ignore"):  # inf - inf at the start, as in entropy_starts
                start = h > self.threshold if c.threshold_mode == "global" else h - self.prev_entropy > self.threshold
        else:
            raise ValueError(f"unknown patching mode '{c.mode}'")
        start = bool(start) or token == BOS_ID or (c.split_first_byte and t == 1)
        if start:
            self.seg_start = t
        elif c.max_patch_length is not None and (t - self.seg_start) % c.max_patch_length == 0:
            start = True
        self.prev_space, self.prev_entropy = space, h
        self.t += 1
        return start
