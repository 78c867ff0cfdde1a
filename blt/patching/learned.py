"""Learned patching (H-Net's dynamic chunking, Hwang, Wang and Gu 2025): the model's own router
(blt/model/router.py) reads the local encoder's byte states and gives every byte t a probability
p_t that it begins a patch, from the cosine similarity of the states at t and t-1; a patch begins
where p_t >= 0.5. The encoder is causal, so a start at t depends on bytes <= t (as in space
patching; the decoder's previous-patch rule keeps the model causal). No second model is trained.

The ratio loss holds the mean patch size near `target_patch_size` = N: with F the fraction of
bytes that start a patch and G the mean p over those bytes,

    ratio_loss = N / (N - 1) * ((N - 1) * F * G + (1 - F) * (1 - G))

is smallest (1) at F = G = 1/N. F carries no gradient; G does. The other gradient paths to the
router (the confidence gate and the smoothing of patch states) are in the model. Training adds
`ratio_loss_weight` times it to the LM loss and logs ratio_loss, boundary_rate (the fraction of
real bytes where p_t >= 0.5) and router_prob (G).
"""

from __future__ import annotations

import torch

from blt.patching.base import Mode, Signal, StreamRule
from blt.tokens import PAD_ID

BOUNDARY = 0.5  # p_t >= BOUNDARY starts a patch


def router_starts(probs: torch.Tensor) -> torch.Tensor:
    """(B, T) boundary probabilities -> (B, T) bool router starts (position 0 always starts)."""
    starts = probs >= BOUNDARY
    starts[:, 0] = True
    return starts


def ratio_loss(
    probs: torch.Tensor, starts: torch.Tensor, real: torch.Tensor, target: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ratio loss, F, G) over the real bytes (`real` (B, T) bool) of a batch: `starts` (B, T) are
    the patch starts used, `probs` (B, T) the router's probabilities (G carries the gradient)."""
    n = real.sum().clamp(min=1)
    F = (starts & real).sum() / n
    G = (probs * real).sum() / n
    N = float(target)
    return N / (N - 1) * ((N - 1) * F * G + (1 - F) * (1 - G)), F, G


class Learned(Mode):
    name = "learned"
    needs_router = True
    start_reads_its_byte = True

    def check(self, cfg, arch: str) -> str | None:
        if cfg.target_patch_size <= 1:
            return (
                f"patching.target_patch_size must be > 1 with patching.mode=learned (got {cfg.target_patch_size}): "
                "it is the mean patch size the ratio loss aims at"
            )
        if cfg.max_patch_length is not None and cfg.target_patch_size > cfg.max_patch_length:
            return (
                f"patching.target_patch_size ({cfg.target_patch_size:g}) must be <= patching.max_patch_length "
                f"({cfg.max_patch_length}) with patching.mode=learned: no patch is longer, so the ratio loss "
                "could never reach it (lower the target or raise max_patch_length)"
            )
        if cfg.threshold is not None:
            return (
                "patching.threshold is for entropy patching; learned patching starts a patch where the router's "
                "probability is >= 0.5 (set patching.threshold=null and tune patching.target_patch_size)"
            )
        return None

    def starts(self, tokens, cfg, probs, threshold) -> torch.Tensor:
        if probs is None:
            raise ValueError("learned patching needs the router's boundary probabilities (run the model)")
        return router_starts(probs)

    def stream(self, cfg, threshold) -> StreamRule:
        return _RouterRule()

    def assumed_patch_size(self, cfg) -> float:
        return cfg.target_patch_size

    def describe(self, cfg) -> str:
        return f"learned (a router in the model, ratio loss towards {cfg.target_patch_size:g} bytes per patch)"

    def hf_refusal(self, cfg):
        return "patching.mode", (
            "HF transformers' BLT has no learned patcher (its patcher reads entropies); "
            "use the default export format (safetensors, with the router)"
        )

    def signal(self, cfg, threshold) -> Signal:
        rule = f"a patch starts where the router's probability is >= {BOUNDARY}"
        return Signal("probabilities", "boundary probability (router)", BOUNDARY, rule)

    def training_terms(self, cfg, routing, inputs):
        real = inputs != PAD_ID  # (B, T)
        loss, _, mean_prob = ratio_loss(routing.probs, routing.starts, real, cfg.target_patch_size)
        rate = (routing.router_starts & real).sum() / real.sum().clamp(min=1)
        metrics = {"ratio_loss": loss.detach(), "boundary_rate": rate, "router_prob": mean_prob.detach()}
        return cfg.ratio_loss_weight * loss, metrics


class _RouterRule(StreamRule):
    """`push(t, token, p)`: p is the router's probability for byte t, compared as router_starts does."""

    def push(self, t: int, token: int, prob) -> bool:
        if t == 0:
            return True
        if prob is None:
            raise ValueError("learned patching needs the router's probability of every byte")
        return bool(prob >= BOUNDARY)
