"""Transformer building blocks shared by the local encoder/decoder, the global model and the
byte LM: RMSNorm, RoPE, SwiGLU, causal (sliding-window) self-attention, and a block stack."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from blt.config import SparseAttentionConfig, TransformerConfig
from blt.model.attention import causal_self_attention
from blt.model.kv_cache import KVCache
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

    def step(self, x: torch.Tensor, rope: tuple, cache: KVCache, layer: int, mask: torch.Tensor | None,
             w_qkv: torch.Tensor) -> torch.Tensor:
        """n new positions per row (B, n, D) against the cache; rope = (cos, sin, half-swap index)
        with cos/sin (B, 1, n, hd); mask (B, *, n, L) or None; w_qkv: the q, k and v projections
        stacked (one matmul instead of three)."""
        B, n, D = x.shape
        H = self.heads
        qkv = F.linear(x, w_qkv).view(B, n, 3 * H, self.head_dim).transpose(1, 2)  # (B, 3H, n, hd): q, k, v heads
        cos, sin, swap = rope
        qk = qkv[:, : 2 * H]  # rotate q and k together: x * cos + (second half, first half) * sin
        if qk.dtype == torch.float32:  # = apply_rope, bit for bit
            qk = qk * cos + qk[..., swap] * sin
        else:  # RoPE in fp32, as apply_rope does
            qk = (qk.float() * cos + qk[..., swap].float() * sin).to(x.dtype)
        q, k = qk.chunk(2, dim=1)  # (B, H, n, hd) each
        keys, values = cache.write(layer, k, qkv[:, 2 * H :])  # (B, H, L, hd) every visible position
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, n, D))


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

    def step(self, x, rope: tuple, cache: KVCache, layer: int, mask, fused: tuple) -> torch.Tensor:
        w_qkv, w_gate_up = fused
        x = x + self.self_attn.step(self.input_layernorm(x), rope, cache, layer, mask, w_qkv)
        gate, up = F.linear(self.post_attention_layernorm(x), w_gate_up).chunk(2, dim=-1)
        return x + self.mlp.down_proj(F.silu(gate) * up)


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

    def step(self, x: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None, before=None) -> torch.Tensor:
        """Incremental forward: (B, n, D) new positions of each row -> (B, n, D), the same values the
        full forward gives at those positions; the first valid[b] (default n) are kept in the cache.
        For inference: call it under torch.no_grad() or torch.inference_mode() (blt/model/incremental.py does)."""
        B, n, _ = x.shape
        pattern = self.layers[0].self_attn.pattern if len(self.layers) else None
        mask = cache.begin(n, self.cfg.window if pattern is None else None, pattern)
        if cache.tables is None:  # once per cache: RoPE tables of every position, stacked projections
            cos_t, sin_t = rope_tables(torch.arange(cache.capacity, device=x.device),
                                       self.cfg.dim // self.cfg.heads, self.rope_theta)  # (C, hd/2)
            cos_t, sin_t = torch.cat([cos_t, cos_t], -1)[:, None], torch.cat([-sin_t, sin_t], -1)[:, None]  # (C, 1, hd)
            hd = cos_t.shape[-1]
            swap = torch.cat([torch.arange(hd // 2, hd), torch.arange(hd // 2)]).to(x.device)  # halves exchanged
            fused = [(torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight]),
                      torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight])) for b in self.layers]
            cache.tables = (cos_t, sin_t, swap, fused)
        cos_t, sin_t, swap, fused = cache.tables
        rope = (cos_t[cache.pos].transpose(1, 2), sin_t[cache.pos].transpose(1, 2), swap)  # (B, 1, n, hd)
        for i, layer in enumerate(self.layers):
            x = x if before is None else before(i, x)
            x = layer.step(x, rope, cache, i, mask, fused[i])
        cache.advance(n if valid is None else valid)
        return x
