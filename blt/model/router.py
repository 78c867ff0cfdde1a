"""The boundary router of learned patching (`patching.mode: learned`; H-Net's dynamic chunking,
Hwang, Wang and Gu 2025) and the two paths by which the language-model loss reaches it.

- Router: p_t = (1 - cos(W_q h_t, W_k h_{t-1})) / 2 on the local encoder's byte states h, p_0 = 1;
  a patch starts where p_t >= 0.5 (blt/patching/learned.py). W_q and W_k start as the identity,
  so at first a patch starts where adjacent states point apart.
- Confidence: c_t = p_t at a byte the router starts a patch at, 1 - p_t elsewhere, and 1 at a
  start forced by the shared rules (BOS, max_patch_length, split_first_byte), which has no gradient.
- Smoothing: the global state a byte reads is an exponential moving average over patches,
  s_j = P_j g_j + (1 - P_j) s_{j-1}, with P_j the confidence of patch j's first byte: a boundary
  the router is unsure of blends its patch into the one before, so the loss can move it.
- Gate: the decoder's cross-attention output is multiplied by 1 + (c_t - stopgrad(c_t)), which is
  exactly 1 (the forward pass is unchanged) and passes the gradient of that output to c_t
  (H-Net's straight-through estimator).

    router = BoundaryRouter(dim)
    probs = router(h)                              # (B, T, D) byte-level -> (B, T)
    s = smooth_patches(g, patch_confidence(...))   # (B, P, Dg) patch-level -> (B, P, Dg)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

KEEP_MIN = 1e-6  # smallest 1 - P_j the smoothing keeps of the patch before (a start of confidence 1 resets it)


@dataclass
class Routing:
    """What learned patching decided for one batch (all byte-level, (B, T))."""

    probs: torch.Tensor  # the router's boundary probabilities (with gradient in training)
    starts: torch.Tensor  # bool: the patch starts used (router starts plus the shared rules)
    router_starts: torch.Tensor  # bool: where p_t >= 0.5
    patch_ids: torch.Tensor  # long: the patch of every byte


class BoundaryRouter(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.q_proj.weight.copy_(torch.eye(self.q_proj.in_features))
            self.k_proj.weight.copy_(torch.eye(self.k_proj.in_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) byte states -> (B, T) probability that each byte starts a patch (byte 0: 1)."""
        ones = torch.ones_like(h[:, :1, 0], dtype=torch.float32)  # (B, 1)
        return torch.cat([ones, self.pair(h[:, 1:], h[:, :-1])], 1)

    def step(self, h: torch.Tensor, before: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """forward for new bytes (B, n, D), the states one byte before each (B, n, D) and which are a
        row's byte 0 (B, n) -> (B, n) probabilities."""
        probs = self.pair(h, before)
        return torch.where(first, torch.ones_like(probs), probs)

    def pair(self, h: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """(..., D) states and the states one byte earlier -> (...) boundary probabilities (float32)."""
        q = F.normalize(self.q_proj(h).float(), dim=-1)
        k = F.normalize(self.k_proj(before).float(), dim=-1)
        return ((1 - (q * k).sum(-1)) / 2).clamp(0, 1)


def confidence(probs: torch.Tensor, starts: torch.Tensor, router_starts: torch.Tensor) -> torch.Tensor:
    """(B, T) the router's confidence in each byte's decision: p at its own starts, 1 - p where it
    continues a patch, 1 (no gradient) where a shared rule forced a start it did not make."""
    c = torch.where(router_starts, probs, 1 - probs)
    return torch.where(starts & ~router_starts, torch.ones_like(c), c)


def patch_confidence(conf: torch.Tensor, patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, T) byte confidences -> (B, P) the confidence of each patch's first byte (1 for a patch
    past a row's end)."""
    B, T = patch_ids.shape
    pos = torch.arange(T, device=patch_ids.device).expand(B, T)
    first = torch.zeros(B, num_patches, dtype=torch.long, device=patch_ids.device)
    first = first.scatter_reduce(1, patch_ids, pos, reduce="amin", include_self=False)  # (B, P) first byte
    exists = torch.zeros(B, num_patches, dtype=torch.bool, device=patch_ids.device).scatter(1, patch_ids, True)
    return torch.where(exists, conf.gather(1, first), torch.ones_like(conf[:, :1]))


SMOOTH_BLOCK = 512  # patches per matmul of smooth_patches: memory O(P x SMOOTH_BLOCK), not O(P^2)


def smooth_patches(g: torch.Tensor, P: torch.Tensor, block: int = SMOOTH_BLOCK) -> torch.Tensor:
    """s_j = P_j g_j + max(1 - P_j, KEEP_MIN) s_{j-1} over patches, for g (B, P, Dg) and P (B, P):
    one matmul per block of `block` patches, each block starting from the last state of the one
    before (a row of up to `block` patches is one block, as one matmul)."""
    out, before = [], None
    for a in range(0, P.shape[1], block):
        out.append(_smooth_block(g[:, a : a + block], P[:, a : a + block], before))  # (B, n, Dg)
        before = out[-1][:, -1]  # (B, Dg)
    return torch.cat(out, 1) if len(out) != 1 else out[0]


def _smooth_block(g: torch.Tensor, P: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
    """smooth_patches over n patches g (B, n, Dg), P (B, n) that follow the smoothed state `before`
    (B, Dg) (None: nothing before), as s_j = sum_{i <= j} P_i prod_{i < l <= j} keep_l g_i
    + prod_{l <= j} keep_l before, the products in float64."""
    keep = torch.log((1 - P.double()).clamp(min=KEEP_MIN)).cumsum(1)  # (B, n) log of prod_{l <= j} keep_l
    n = P.shape[1]
    later = torch.ones(n, n, dtype=torch.bool, device=P.device).triu(1)  # i > j
    span = (keep[:, :, None] - keep[:, None, :]).masked_fill(later, float("-inf"))  # (B, j, i)
    w = P.double()[:, None, :] * span.exp()  # (B, n, n) weight of patch i in s_j
    s = torch.bmm(w.to(g.dtype), g)  # (B, n, Dg)
    if before is None:
        return s
    return s + keep.exp().to(g.dtype)[:, :, None] * before[:, None, :]


def smooth_step(g: torch.Tensor, P: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """One step of smooth_patches: (N, Dg) new patch states, (N,) their P, (N, Dg) the smoothed
    state of the patch before (zeros for the first) -> (N, Dg)."""
    P = P.to(g.dtype)[:, None]
    keep = (1 - P).clamp(min=KEEP_MIN)
    return P * g + keep * before


def straight_through(conf: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T, 1) exactly 1 in the forward pass, d/d conf = 1 in the backward pass."""
    return (1 + (conf - conf.detach()))[..., None]
