"""Transformer building blocks shared by the local encoder/decoder, the global model and the
byte LM: RMSNorm, RoPE, SwiGLU, causal (sliding-window) self-attention, and a block stack.

Each module defines its math once, with two entry points side by side: `forward` (training and
full recomputation: a whole sequence) and `step` (generation: n new positions of every row against
a KV cache). The cache decides which slots a step writes and sees (blt/generation/kv_cache.py:
`KVCache` grows with the sequence, `FixedSlots` keeps every shape fixed for torch.compile); it
implements `begin(n, window, pattern, valid) -> mask`, `pos` (B, n) the new positions, `key_pos` ((L,) or
(B, L)) the positions of the slots `write` returns, `write(layer, k, v) -> (keys, values)`,
`advance(valid)`, `lens` (B,), `capacity`, and holds the Transformer's `step_constants` in `tables`.

    y = transformer(x)                      # (B, L, D), L bytes or patches
    y = transformer.step(x, cache, valid)   # (B, n, D) new positions of each row -> (B, n, D)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from blt.config import SparseAttentionConfig, TransformerConfig
from blt.model.alibi import alibi_bias, alibi_slopes, with_bias
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


def rope_frequencies(head_dim: int, theta: float, scaling=None, device=None) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies theta^(-2i/hd); with Llama 3's scaling (a RopeScalingConfig
    whose factor is set) long wavelengths are divided by the factor, short ones kept, and the band
    between smoothed, as Meta's Llama 3.1 code and HF's rope_type llama3 do."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None or scaling.factor is None:
        return inv
    old = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / scaling.low_freq_factor, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old / scaling.high_freq_factor) & (wavelen <= old / scaling.low_freq_factor)
    return torch.where(medium, smoothed, scaled)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, scaling=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables (..., head_dim) for integer `positions` (T,) or (B, n), float32:
    cos of each angle twice, sin as (-sin, sin), one per half of a head (what apply_rope reads)."""
    inv = rope_frequencies(head_dim, theta, scaling, positions.device)
    ang = positions.float()[..., None] * inv  # (..., hd/2)
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by position, in float32: pairs are (first half, second half) as in HF
    Llama (HF's BLT rotates interleaved pairs: blt/hf.py permutes q/k rows when converting), so
    x * cos + (second half, first half) * (-sin, sin)."""
    if x.dtype == torch.float32:
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


def ffn_hidden(dim: int, mult: float) -> int:
    return int(math.ceil(dim * mult / 16) * 16)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, w_gate_up: torch.Tensor | None = None) -> torch.Tensor:
        """`w_gate_up`: the gate and up projections stacked (`stacked`), one matmul instead of two
        (generation's steps; training keeps two, whose gradients land in each weight directly)."""
        if w_gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def stacked(self) -> torch.Tensor:
        return torch.cat([self.gate_proj.weight, self.up_proj.weight])


class SelfAttention(nn.Module):
    """Causal self-attention with `heads` query heads sharing `kv_heads` key/value heads (grouped-query
    attention, as in Llama: query head j reads key/value head j // (heads / kv_heads); kv_heads =
    heads is multi-head attention, 1 multi-query). A KV cache holds kv_heads heads."""

    def __init__(
        self,
        dim: int,
        heads: int,
        window: int | None,
        sparse: SparseAttentionConfig | None = None,
        kv_heads: int | None = None,
        qkv_bias: bool = False,
        qk_norm_eps: float | None = None,
        position: str = "rope",
    ):
        """qkv_bias: biases on q/k/v (Qwen2); qk_norm_eps: RMSNorm every q and k head first (Qwen3);
        position: rope (q and k rotated), alibi (a per-head distance penalty on the scores) or none."""
        super().__init__()
        self.heads, self.head_dim, self.window, self.position = heads, dim // heads, window, position
        self.kv_heads = kv_heads or heads
        self.pattern = Pattern(sparse, heads) if sparse is not None and sparse.pattern != "none" else None
        self.backend = sparse.backend if sparse is not None else "auto"
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        if qk_norm_eps is not None:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, qk_norm_eps), RMSNorm(self.head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, stacked: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) -> q (B, H, T, hd), k and v (B, Hkv, T, hd), q and k normed (qk_norm) and rotated
        by RoPE (cos/sin broadcast to (B, *, T, hd); None: not rotated, position alibi or none).
        `stacked`: the three projections' weights and biases stacked (`stacked()`), one matmul
        (generation)."""
        B, T, _ = x.shape
        H, Hkv, hd = self.heads, self.kv_heads, self.head_dim
        rope = apply_rope if cos is not None else (lambda t, c, s: t)
        if stacked is None:
            q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
            k, v = (p(x).view(B, T, Hkv, hd).transpose(1, 2) for p in (self.k_proj, self.v_proj))  # (B, Hkv, T, hd)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            return rope(q, cos, sin), rope(k, cos, sin), v
        qkv = F.linear(x, *stacked).view(B, T, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H + 2Hkv, T, hd): q, k, v heads
        if cos is None and self.q_norm is None:
            return qkv[:, :H], qkv[:, H : H + Hkv], qkv[:, H + Hkv :]
        if self.q_norm is not None:
            q, k = rope(self.q_norm(qkv[:, :H]), cos, sin), rope(self.k_norm(qkv[:, H : H + Hkv]), cos, sin)
            return q, k, qkv[:, H + Hkv :]
        qk = apply_rope(qkv[:, : H + Hkv], cos, sin)  # q and k rotated together
        return qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]

    def grouped(self, kv: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, L, hd) keys or values -> (B, H, L, hd), each repeated for its group of query heads."""
        return kv if self.kv_heads == self.heads else kv.repeat_interleave(self.heads // self.kv_heads, dim=1)

    def stacked(self) -> tuple:
        """(weight, bias or None) of the q, k and v projections stacked."""
        ps = (self.q_proj, self.k_proj, self.v_proj)
        bias = torch.cat([p.bias for p in ps]) if self.q_proj.bias is not None else None
        return torch.cat([p.weight for p in ps]), bias

    def out(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, hd) attention output -> (B, T, D)."""
        B, H, T, hd = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))

    def slopes(self, device) -> torch.Tensor | None:
        """ALiBi's per-head slopes (H,), None unless position is alibi."""
        return alibi_slopes(self.heads, device) if self.position == "alibi" else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin)
        k, v = self.grouped(k), self.grouped(v)  # (B, H, T, hd)
        if self.pattern is not None:
            return self.out(sparse_attention(q, k, v, self.pattern, self.backend, self.slopes(x.device)))
        return self.out(causal_self_attention(q, k, v, self.window, self.slopes(x.device)))

    def step(self, x: torch.Tensor, rope: tuple, cache, layer: int, mask, stacked: tuple) -> torch.Tensor:
        """n new positions per row (B, n, D) against the cache's layer `layer`; rope = (cos, sin)
        (B, 1, n, hd) at the new positions ((None, None) without RoPE); mask from cache.begin (None:
        every slot seen; float with ALiBi's bias, Transformer.step); `stacked`: the q/k/v weights
        and biases stacked."""
        q, k, v = self.qkv(x, *rope, stacked)
        keys, values = cache.write(layer, k, v)  # (B, Hkv, L, hd) every slot these positions may see
        return self.out(F.scaled_dot_product_attention(q, self.grouped(keys), self.grouped(values), attn_mask=mask))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + swiglu(norm(x))."""

    def __init__(self, cfg: TransformerConfig, eps: float, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.input_layernorm = RMSNorm(cfg.dim, eps)
        self.self_attn = SelfAttention(
            cfg.dim,
            cfg.heads,
            cfg.window,
            cfg.sparse,
            cfg.kv_heads,
            cfg.qkv_bias,
            eps if cfg.qk_norm else None,
            cfg.position,
        )
        self.post_attention_layernorm = RMSNorm(cfg.dim, eps)
        self.mlp = SwiGLU(cfg.dim, ffn_hidden(cfg.dim, cfg.ffn_mult))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))

    def step(self, x: torch.Tensor, rope: tuple, cache, layer: int, mask, stacked: tuple) -> torch.Tensor:
        """forward for n new positions per row against the cache; `stacked` = (q/k/v, gate/up) weights."""
        w_qkv, w_gate_up = stacked
        x = x + self.self_attn.step(self.input_layernorm(x), rope, cache, layer, mask, w_qkv)
        return x + self.mlp.forward(self.post_attention_layernorm(x), w_gate_up)  # (a step runs no module hooks)


class Transformer(nn.Module):
    """A stack of causal blocks over one sequence axis (bytes or patches), positions 0..T-1 given by
    RoPE, ALiBi or nothing (cfg.position)."""

    def __init__(self, cfg: TransformerConfig, eps: float, rope_theta: float, dropout: float = 0.0):
        super().__init__()
        self.cfg, self.rope_theta = cfg, rope_theta
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList([Block(cfg, eps, dropout) for _ in range(cfg.layers)])

    def forward(self, x: torch.Tensor, before=None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); L is bytes or patches. Dropout on the input, then the blocks;
        `before(i, x)`, if given, transforms x before block i (the decoder's cross-attention)."""
        x = self.dropout(x)
        cos, sin = self._rope(torch.arange(x.shape[1], device=x.device))  # (T, hd) each, or None
        for i, layer in enumerate(self.layers):
            x = x if before is None else before(i, x)
            x = layer(x, cos, sin)
        return x

    @property
    def head_dim(self) -> int:
        return self.cfg.dim // self.cfg.heads

    def _rope(self, positions: torch.Tensor) -> tuple:
        """RoPE's (cos, sin) tables at `positions`, (None, None) for position alibi or none."""
        if self.cfg.position != "rope":
            return None, None
        return rope_tables(positions, self.head_dim, self.rope_theta, self.cfg.rope_scaling)

    @property
    def pattern(self):
        """The sparse attention pattern of its blocks (None: dense or windowed)."""
        return self.layers[0].self_attn.pattern if len(self.layers) else None

    def step_constants(self, capacity: int, device) -> tuple:
        """What every step of one cache reads: RoPE cos/sin of positions 0..capacity-1 (C, 1, hd;
        None without RoPE), ALiBi's slopes (H,; None without), and every block's stacked weights
        (made once per cache: the weights do not change while generating)."""
        cos, sin = self._rope(torch.arange(capacity, device=device))  # (C, hd)
        slopes = self.layers[0].self_attn.slopes(device) if len(self.layers) else None
        stacked = [(b.self_attn.stacked(), b.mlp.stacked()) for b in self.layers]
        return (cos if cos is None else cos[:, None]), (sin if sin is None else sin[:, None]), slopes, stacked

    def tables_of(self, cache) -> tuple:
        """The cache's step_constants, made on its first step."""
        if cache.tables is None:
            cache.tables = self.step_constants(cache.capacity, cache.lens.device)
        return cache.tables

    def step(self, x: torch.Tensor, cache, valid: torch.Tensor | None = None, before=None) -> torch.Tensor:
        """forward for new positions: (B, n, D) -> (B, n, D), the values the full forward gives at
        those positions; the first valid[b] (default n) of row b are kept in the cache. Run under
        torch.no_grad() or torch.inference_mode()."""
        n = x.shape[1]
        mask = cache.begin(n, self.cfg.window if self.pattern is None else None, self.pattern, valid)
        cos_t, sin_t, slopes, stacked = self.tables_of(cache)
        rope = (None, None)
        if cos_t is not None:
            rope = (cos_t[cache.pos].transpose(1, 2), sin_t[cache.pos].transpose(1, 2))  # (B, 1, n, hd)
        if slopes is not None:  # ALiBi: the penalty of every new position against every slot it reads
            mask = with_bias(mask, alibi_bias(slopes, cache.pos, cache.key_pos)).to(x.dtype)  # (B, H, n, L)
        for i, layer in enumerate(self.layers):
            x = x if before is None else before(i, x)
            x = layer.step(x, rope, cache, i, mask, stacked[i])
        cache.advance(n if valid is None else valid)
        return x
