"""ALiBi (Press et al. 2022, "Train Short, Test Long"): no position embedding; each head adds
-slope * distance to its attention scores, so a query prefers nearby keys at a rate fixed per head.

    slopes = alibi_slopes(heads)                          # (H,)
    bias = alibi_bias(slopes, q_pos, k_pos)               # (..., H, Q, K) float32, 0 on the diagonal
    mask = with_bias(allowed, bias)                       # the bias where allowed, -inf elsewhere

The slopes are the paper's: for H a power of two, 2^(-8/H), 2^(-16/H), ..., 2^(-8); otherwise those
of the power of two below H, then every other slope of twice that power (the same as BLOOM's and
MPT's). The bias is symmetric (-slope * |q - k|): a causal mask removes the future anyway.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(heads: int, device=None) -> torch.Tensor:
    """(heads,) float32 per-head slopes, steepest first."""

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    low = 2 ** int(math.floor(math.log2(heads)))
    slopes = geometric(low) + geometric(2 * low)[0::2][: heads - low]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """-slope * |q - k| for integer positions q_pos (..., Q) and k_pos (..., K) whose leading dims
    broadcast -> (..., H, Q, K) float32."""
    dist = (q_pos[..., None, :, None] - k_pos[..., None, None, :]).abs().float()  # (..., 1, Q, K)
    return -slopes[:, None, None] * dist


def with_bias(allowed: torch.Tensor | None, bias: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """An SDPA float mask: `bias` where `allowed` (bool, broadcasting; None: everywhere), -inf
    elsewhere; rows with nothing allowed (`live` False) get 0 everywhere, so SDPA stays finite
    (the caller zeroes those rows' outputs, as it does with a boolean mask)."""
    if allowed is None:
        return bias
    out = bias.masked_fill(~allowed, float("-inf"))
    return out if live is None else out.masked_fill(~live, 0.0)
