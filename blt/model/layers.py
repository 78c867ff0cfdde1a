"""Transformer building blocks shared by the local encoder/decoder, the global model and the
byte LM: RMSNorm, RoPE, SwiGLU, causal (sliding-window) self-attention, and a block stack. Their
incremental (KV-cached) forward for generation is in blt/generation/steps.py."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from blt.config import SparseAttentionConfig, TransformerConfig
from blt.model.attention import causal_self_attention
from blt.model.sparse_attention import sparse_attention
from blt.model.sparse_patterns import Pattern


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op (the same arithmetic)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (..., head_dim/2) for integer `positions` (T,) or (B, n)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[..., None] * inv  # (..., hd/2)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by position; pairs are (first half, second half) as in HF Llama (HF's
    BLT rotates interleaved pairs: blt/hf.py permutes q/k rows when converting)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


def ffn_hidden(dim: int, mult: float) -> int:
    return int(math.ceil(dim * mult / 16) * 16)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int | None, sparse: SparseAttentionConfig | None = None):
        super().__init__()
        self.heads, self.head_dim, self.window = heads, dim // heads, window
        self.pattern = Pattern(sparse, heads) if sparse is not None and sparse.pattern != "none" else None
        self.backend = sparse.backend if sparse is not None else "auto"
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.pattern is not None:
            y = sparse_attention(q, k, v, self.pattern, self.backend)  # (B, H, T, hd)
        else:
            y = causal_self_attention(q, k, v, self.window)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + swiglu(norm(x))."""

    def __init__(self, cfg: TransformerConfig, eps: float, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.input_layernorm = RMSNorm(cfg.dim, eps)
        self.self_attn = SelfAttention(cfg.dim, cfg.heads, cfg.window, cfg.sparse)
        self.post_attention_layernorm = RMSNorm(cfg.dim, eps)
        self.mlp = SwiGLU(cfg.dim, ffn_hidden(cfg.dim, cfg.ffn_mult))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """A stack of causal blocks over one sequence axis (bytes or patches), RoPE on positions 0..T-1."""

    def __init__(self, cfg: TransformerConfig, eps: float, rope_theta: float, dropout: float = 0.0):
        super().__init__()
        self.cfg, self.rope_theta = cfg, rope_theta
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList([Block(cfg, eps, dropout) for _ in range(cfg.layers)])

    def forward(self, x: torch.Tensor, before=None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); L is bytes or patches. Dropout on the input, then the blocks;
        `before(i, x)`, if given, transforms x before block i (the decoder's cross-attention)."""
        x = self.dropout(x)
        T = x.shape[1]
        cos, sin = rope_tables(torch.arange(T, device=x.device), self.cfg.dim // self.cfg.heads, self.rope_theta)
        for i, layer in enumerate(self.layers):
            x = x if before is None else before(i, x)
            x = layer(x, cos, sin)
        return x
