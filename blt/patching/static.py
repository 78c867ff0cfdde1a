"""Static patching: a patch every `patch_size` bytes (MEGABYTE's fixed patches)."""

from __future__ import annotations

import torch

from blt.patching.base import Mode, StreamRule


def static_starts(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, T) ids -> (B, T) bool: a patch every `patch_size` bytes."""
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device)
    return (pos % patch_size == 0).expand(B, T).clone()  # (B, T)


class Static(Mode):
    name = "static"

    def starts(self, tokens, cfg, entropies, threshold) -> torch.Tensor:
        return static_starts(tokens, cfg.patch_size)

    def stream(self, cfg, threshold) -> StreamRule:
        return _Every(cfg.patch_size)

    def assumed_patch_size(self, cfg) -> float:
        return float(cfg.patch_size)

    def describe(self, cfg) -> str:
        return f"static ({cfg.patch_size} bytes)"


class _Every(StreamRule):
    def __init__(self, size: int):
        self.size = size

    def push(self, t: int, token: int, entropy) -> bool:
        return t % self.size == 0
