"""Entropy patching (BLT's rule): a patch starts where the entropy model is unsure of the next
byte: H_t > threshold (global) or H_t - H_{t-1} > threshold (monotonic), with H_t the entropy
(nats) of the entropy model's prediction of byte t, so a start at t depends on bytes < t only.
With `threshold: null` the threshold is calibrated on sample data for `target_patch_size`."""

from __future__ import annotations

import math

import numpy as np
import torch

from blt.patching.base import Mode, StreamRule
from blt.patching.rules import limit_patch_length
from blt.tokens import BOS_ID


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


class Entropy(Mode):
    name = "entropy"
    needs_entropies = True

    def check(self, cfg, arch: str) -> str | None:
        if arch == "blt" and not cfg.entropy_model:
            return (
                "patching.mode=entropy needs patching.entropy_model (train one with "
                "`blt train entropy_tiny`, then set patching.entropy_model=runs/entropy_tiny)"
            )
        return None

    def starts(self, tokens, cfg, entropies, threshold) -> torch.Tensor:
        if entropies is None:
            raise ValueError("entropy patching needs entropies")
        th = cfg.threshold if threshold is None else threshold
        if th is None:
            raise ValueError("entropy patching needs a threshold (patching.threshold or a derived one)")
        return entropy_starts(entropies, th, cfg.threshold_mode)

    def stream(self, cfg, threshold) -> StreamRule:
        th = cfg.threshold if threshold is None else threshold
        return _EntropyRule(None if th is None else np.float32(th), cfg.threshold_mode)

    def assumed_patch_size(self, cfg) -> float:
        return cfg.target_patch_size

    def calibrate(self, cfg, tokens, entropies) -> float:
        return threshold_for_patch_size(
            entropies, cfg.target_patch_size, cfg.threshold_mode, cfg.max_patch_length, tokens
        )

    def describe(self, cfg) -> str:
        if cfg.threshold is None:
            return "entropy"
        return f"entropy (threshold {cfg.threshold:.4f} nats, model in entropy_model/)"

    def hf_refusal(self, cfg):
        if cfg.threshold_mode != "global":
            return "patching.threshold_mode", "HF's patcher thresholds entropies (H_t > th); use global"
        return None


class _EntropyRule(StreamRule):
    """Compared in float32, as entropy_starts does on a float32 tensor."""

    def __init__(self, threshold, mode: str):
        self.threshold, self.global_mode = threshold, mode == "global"
        self.prev = np.float32(math.inf)

    def push(self, t: int, token: int, entropy) -> bool:
        h = np.float32(math.inf if entropy is None else entropy)
        if t == 0:
            start = True
        elif entropy is None or self.threshold is None:
            raise ValueError("entropy patching needs the byte's entropy and a threshold")
        else:
            with np.errstate(invalid="ignore"):  # inf - inf at the start, as in entropy_starts
                start = bool(h > self.threshold if self.global_mode else h - self.prev > self.threshold)
        self.prev = h
        return start
