"""The incremental (KV-cached) forward of the model's building blocks, for generation: the same
values the training forward in blt/model/layers.py gives, for n new positions against a cache.
Run under torch.no_grad() or torch.inference_mode() (IncrementalBLT and IncrementalByteLM do).

    y = transformer_step(model.transformer, x, cache, valid)   # (B, n, D) new positions -> (B, n, D)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blt.generation.kv_cache import KVCache
from blt.model.hash_embed import PRIMES, HashNgramEmbedding
from blt.model.layers import Block, SelfAttention, Transformer, rope_tables


def attention_step(
    attn: SelfAttention,
    x: torch.Tensor,
    rope: tuple,
    cache: KVCache,
    layer: int,
    mask: torch.Tensor | None,
    w_qkv: torch.Tensor,
) -> torch.Tensor:
    """n new positions per row (B, n, D) against the cache; rope = (cos, sin, half-swap index)
    with cos/sin (B, 1, n, hd); mask (B, *, n, L) or None; w_qkv: the q, k and v projections
    stacked (one matmul instead of three)."""
    B, n, D = x.shape
    H = attn.heads
    qkv = F.linear(x, w_qkv).view(B, n, 3 * H, attn.head_dim).transpose(1, 2)  # (B, 3H, n, hd): q, k, v heads
    cos, sin, swap = rope
    qk = qkv[:, : 2 * H]  # rotate q and k together: x * cos + (second half, first half) * sin
    if qk.dtype == torch.float32:  # = apply_rope, bit for bit
        qk = qk * cos + qk[..., swap] * sin
    else:  # RoPE in fp32, as apply_rope does
        qk = (qk.float() * cos + qk[..., swap].float() * sin).to(x.dtype)
    q, k = qk.chunk(2, dim=1)  # (B, H, n, hd) each
    keys, values = cache.write(layer, k, qkv[:, 2 * H :])  # (B, H, L, hd) every visible position
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return attn.o_proj(y.transpose(1, 2).reshape(B, n, D))


def block_step(
    block: Block, x: torch.Tensor, rope: tuple, cache: KVCache, layer: int, mask, fused: tuple
) -> torch.Tensor:
    """Block.forward for new positions; `fused` = (stacked q/k/v, stacked gate/up) weights."""
    w_qkv, w_gate_up = fused
    x = x + attention_step(block.self_attn, block.input_layernorm(x), rope, cache, layer, mask, w_qkv)
    gate, up = F.linear(block.post_attention_layernorm(x), w_gate_up).chunk(2, dim=-1)
    return x + block.mlp.down_proj(F.silu(gate) * up)


def step_tables(tf: Transformer, cache: KVCache) -> tuple:
    """The cache's per-Transformer constants, made on first use: RoPE cos and sin of every position
    (C, 1, hd), the index that exchanges a head's halves, and every block's stacked projections."""
    if cache.tables is None:
        dev = cache.k.device
        cos_t, sin_t = rope_tables(
            torch.arange(cache.capacity, device=dev), tf.cfg.dim // tf.cfg.heads, tf.rope_theta
        )  # (C, hd/2)
        cos_t, sin_t = torch.cat([cos_t, cos_t], -1)[:, None], torch.cat([-sin_t, sin_t], -1)[:, None]  # (C, 1, hd)
        hd = cos_t.shape[-1]
        swap = torch.cat([torch.arange(hd // 2, hd), torch.arange(hd // 2)]).to(dev)  # halves exchanged
        fused = [
            (
                torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight]),
                torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]),
            )
            for b in tf.layers
        ]
        cache.tables = (cos_t, sin_t, swap, fused)
    return cache.tables


def transformer_step(
    tf: Transformer, x: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None, before=None
) -> torch.Tensor:
    """Incremental Transformer.forward: (B, n, D) new positions of each row -> (B, n, D), the same
    values the full forward gives at those positions; the first valid[b] (default n) are kept in
    the cache. `before(i, x)`, if given, transforms x before block i (the decoder's cross-attention)."""
    B, n, _ = x.shape
    pattern = tf.layers[0].self_attn.pattern if len(tf.layers) else None
    mask = cache.begin(n, tf.cfg.window if pattern is None else None, pattern)
    cos_t, sin_t, swap, fused = step_tables(tf, cache)
    rope = (cos_t[cache.pos].transpose(1, 2), sin_t[cache.pos].transpose(1, 2), swap)  # (B, 1, n, hd)
    for i, layer in enumerate(tf.layers):
        x = x if before is None else before(i, x)
        x = block_step(layer, x, rope, cache, i, mask, fused[i])
    cache.advance(n if valid is None else valid)
    return x


def hash_rows_at_end(emb: HashNgramEmbedding, history: list[int]) -> list[int]:
    """Table rows of the n-grams ending at the last of `history` (byte ids, oldest first), in plain
    Python: the same values as HashNgramEmbedding.forward's hashes, for one new byte at a time."""
    rows = []
    for f in range(emb.functions):
        prime = PRIMES[f % len(PRIMES)]
        for n in emb.sizes:
            gram = ([0] * n + history)[-n:]  # zeros pad the left, as in ngram_hash
            h = sum(t * prime**i for i, t in enumerate(gram))
            h = (h + 2**63) % 2**64 - 2**63  # int64 wrap-around
            rows.append(h % emb.buckets + len(rows) * emb.buckets)
    return rows
