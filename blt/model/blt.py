"""The Byte Latent Transformer: bytes -> local encoder -> patches -> global model -> local decoder.

    model = BLT(cfg.model, cfg.patching)
    logits = model(tokens, patch_ids)   # tokens (B, T) byte ids, patch_ids (B, T) -> (B, T, 260)
    logits, routing = model(tokens, None, routing=True)   # patching.mode=learned: the model cuts its patches

Each module has its training `forward` and its generation `step` side by side (blt/model/layers.py
says how a step meets its KV cache; blt/generation drives the steps).

Logits at byte t predict byte t+1 and depend only on bytes <= t: the encoder is causal, a patch
summary pools only its own bytes, and a byte reads only the global state of the patch before its
own (which has seen nothing past that patch's end). Module names follow HF transformers'
BltModel (local_encoder / global_transformer / local_decoder, q/k/v/o_proj, patch_embedding_projection,
token_embedding_projection), so an HF export is a key rename (blt/hf.py); HF's residual and
decoder-patch conventions differ unless `model.hf_compat` is set (see the README). With learned
patching a router reads the encoder's byte states and decides the patches (router.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from blt.config import ModelConfig, PatchingConfig
from blt.model.attention import (
    decoder_source_patches,
    masked_pool_attention,
    patch_pooling_attention,
    patch_state_attention,
)
from blt.model.hash_embed import HashNgramEmbedding
from blt.model.layers import RMSNorm, Transformer
from blt.model.router import (
    BoundaryRouter,
    Routing,
    confidence,
    patch_confidence,
    smooth_patches,
    smooth_step,
    straight_through,
)
from blt.patching.learned import BOUNDARY, router_starts
from blt.patching.registry import mode_of, patch_starts
from blt.patching.rules import patch_ids_from_starts
from blt.tokens import VOCAB_SIZE


class CrossAttention(nn.Module):
    """Queries from one sequence, keys/values from another (bytes <-> patches), pre-normed,
    with a residual (HF adds the input twice: `double_residual`); the kernel decides who sees whom."""

    def __init__(self, dim: int, heads: int, eps: float, double_residual: bool = False):
        super().__init__()
        self.double_residual = double_residual
        self.heads, self.head_dim = heads, dim // heads
        self.q_norm, self.k_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        ctx: torch.Tensor,
        kernel,
        patch_ids: torch.Tensor,
        cross_k: int,
        gate: torch.Tensor | None = None,
    ):
        return self.attend(x, *self.keys_values(ctx), kernel, patch_ids, cross_k, gate)

    def keys_values(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, D) context -> its keys and values (B, K, D); generation computes them once per patch."""
        c = self.k_norm(ctx)
        return self.k_proj(c), self.v_proj(c)

    def attend(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel,
        patch_ids: torch.Tensor,
        cross_k: int,
        gate: torch.Tensor | None = None,
    ):
        """`gate` (B, Q, 1), if given, multiplies the attention's output (learned patching's
        straight-through gate, router.py)."""
        B, Q, D = x.shape
        K = k.shape[1]
        q = self.q_proj(self.q_norm(x)).view(B, Q, self.heads, self.head_dim).transpose(1, 2)  # (B, H, Q, hd)
        k = k.view(B, K, self.heads, self.head_dim).transpose(1, 2)  # (B, H, K, hd)
        v = v.view(B, K, self.heads, self.head_dim).transpose(1, 2)
        y = kernel(q, k, v, patch_ids, cross_k)  # (B, H, Q, hd)
        out = self.o_proj(y.transpose(1, 2).reshape(B, Q, D))
        if gate is not None:
            out = out * gate
        return x + (out + x) if self.double_residual else x + out


class LocalEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, k = cfg.encoder.dim, cfg.cross_attn_k
        self.k = k
        self.embed_tokens = nn.Embedding(VOCAB_SIZE, D)
        self.hash_embed = (
            HashNgramEmbedding(D, cfg.hash_ngram_sizes, cfg.hash_buckets, cfg.hash_functions, cfg.hash_sparse_grad)
            if cfg.hash_buckets > 0 and cfg.hash_functions > 0 and cfg.hash_ngram_sizes
            else None
        )
        self.transformer = Transformer(cfg.encoder, cfg.norm_eps, cfg.rope_theta, cfg.dropout)
        self.patch_embedding_projection = nn.Linear(D, D * k, bias=False)
        self.cross_attn = CrossAttention(D, cfg.cross_attn_heads, cfg.norm_eps, cfg.hf_compat)

    def byte_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) byte ids -> (B, T, D) the causal encoder's byte states."""
        h = self.embed_tokens(tokens)  # (B, T, D) byte-level
        if self.hash_embed is not None:
            h = h + self.hash_embed(tokens)
        return self.transformer(h)  # (B, T, D) byte-level

    @property
    def reach(self) -> int:
        """How many bytes before the new ones a step reads (its hash n-grams reach back)."""
        return self.hash_embed.width - 1 if self.hash_embed is not None else 0

    def step(self, tokens: torch.Tensor, context: torch.Tensor, cache, valid=None) -> torch.Tensor:
        """byte_states for n new bytes per row: tokens (B, n), context (B, reach + n) the ids ending
        with them (zeros before a row's first byte) -> (B, n, D) byte-level."""
        h = self.embed_tokens(tokens)  # (B, n, D) byte-level
        if self.hash_embed is not None:
            h = h + self.hash_embed.step(context, tokens.shape[1])
        return self.transformer.step(h, cache, valid)  # (B, n, D) byte-level

    def pool(self, h: torch.Tensor, patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
        """(B, T, D) byte states -> (B, P, k*D) patch summaries, each pooled from its own bytes."""
        B, T, D = h.shape
        # initial patch queries: max-pool each patch's bytes, then project to k queries per patch
        pooled = torch.full((B, num_patches, D), float("-inf"), device=h.device, dtype=h.dtype)
        pooled = pooled.scatter_reduce(1, patch_ids[..., None].expand(B, T, D), h, reduce="amax", include_self=True)
        pooled = torch.where(torch.isinf(pooled), torch.zeros_like(pooled), pooled)  # empty (padding) patches
        queries = self.patch_embedding_projection(pooled).view(B, num_patches * self.k, D)  # (B, P*k, D)
        patches = self.cross_attn(queries, h, patch_pooling_attention, patch_ids, self.k)  # (B, P*k, D)
        return patches.view(B, num_patches, self.k * D)  # (B, P, k*D) patch-level

    def pool_step(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pool for N complete patches gathered one per row: h (N, L, D) their byte states, mask
        (N, L) which are theirs (the rest is padding) -> (N, k*D) patch summaries."""
        N, _, D = h.shape
        pooled = h.masked_fill(~mask[..., None], float("-inf")).amax(1)  # (N, D)
        queries = self.patch_embedding_projection(pooled).view(N, self.k, D)  # (N, k, D)
        return self.cross_attn(queries, h, masked_pool_attention, mask, self.k).view(N, self.k * D)


class LocalDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, k = cfg.decoder.dim, cfg.cross_attn_k
        self.k = k
        self.hf_compat = cfg.hf_compat
        self.patch_embedding_projection = nn.Linear(cfg.global_model.dim, D * k, bias=False)
        self.cross_attn = CrossAttention(D, cfg.cross_attn_heads, cfg.norm_eps, cfg.hf_compat)  # before layer 0
        more = cfg.decoder.layers - 1 if cfg.cross_attn_all_layers_decoder else 0
        self.layer_cross_attn = nn.ModuleList(  # before layers 1.. (cross_attn_all_layers_decoder)
            [CrossAttention(D, cfg.cross_attn_heads, cfg.norm_eps, cfg.hf_compat) for _ in range(more)]
        )
        self.transformer = Transformer(cfg.decoder, cfg.norm_eps, cfg.rope_theta, cfg.dropout)
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.lm_head = nn.Linear(D, VOCAB_SIZE, bias=False)

    def forward(
        self, h: torch.Tensor, g: torch.Tensor, patch_ids: torch.Tensor, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h (B, T, D) byte states, g (B, P, Dg) global patch states -> (B, T, V) logits; `gate`
        (B, T, 1) multiplies every cross-attention's output (learned patching)."""
        B, P, _ = g.shape
        D = h.shape[-1]
        kv = self.patch_embedding_projection(g).view(B, P * self.k, D)  # (B, P*k, D) patch-level
        src = decoder_source_patches(patch_ids, self.hf_compat)  # (B, T) the patch each byte reads
        h = self.cross_attn(h, kv, patch_state_attention, src, self.k, gate)  # (B, T, D) byte-level
        h = self.transformer(h, self.before_layer(kv, patch_state_attention, src, gate))
        return self.logits(h)  # (B, T, V)

    def before_layer(self, kv: torch.Tensor, kernel, src: torch.Tensor, gate: torch.Tensor | None = None):
        """The cross-attention before decoder layers 1.. (None without cross_attn_all_layers_decoder)."""
        if len(self.layer_cross_attn) == 0:
            return None
        return lambda i, h: h if i == 0 else self.layer_cross_attn[i - 1](h, kv, kernel, src, self.k, gate)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) decoder states -> (..., V) next-byte logits."""
        return self.lm_head(self.norm(h))

    def patch_context(self, g: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(N, Dg) global states of N patches -> for every cross-attention (the first, then one per
        later layer) its keys and values of them (N, k, D): generation computes them once per patch."""
        kv = self.patch_embedding_projection(g).view(len(g), self.k, -1)  # (N, k, D) patch-level
        return [cross.keys_values(kv) for cross in self.cross_attns]

    @property
    def cross_attns(self) -> tuple:
        """Every cross-attention: before layer 0, then before each later layer (if any)."""
        return (self.cross_attn, *self.layer_cross_attn)

    def step(self, h: torch.Tensor, kv: list, kernel, ids, cache, count=None) -> torch.Tensor:
        """forward's states for n new bytes per row: h (B, n, D) encoder states, `kv` per
        cross-attention the (keys, values) of the patches the bytes read, gathered for them, read by
        `kernel` with `ids` -> (B, n, D) decoder states (`logits` makes logits of them); the first
        count[b] bytes of row b stay in the cache."""
        x = self.cross_attn.attend(h, *kv[0], kernel, ids, self.k)  # (B, n, D) byte-level
        more = None
        if len(kv) > 1:

            def more(i, y):
                return y if i == 0 else self.layer_cross_attn[i - 1].attend(y, *kv[i], kernel, ids, self.k)

        return self.transformer.step(x, cache, count, more)


class GlobalTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.token_embedding_projection = nn.Linear(
            cfg.encoder.dim * cfg.cross_attn_k, cfg.global_model.dim, bias=False
        )
        self.transformer = Transformer(cfg.global_model, cfg.norm_eps, cfg.rope_theta, cfg.dropout)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.token_embedding_projection(patches))  # (B, P, Dg) patch-level

    def step(self, patches: torch.Tensor, cache, valid=None) -> torch.Tensor:
        """forward for m new patches per row (B, m, k*D) -> (B, m, Dg) patch-level."""
        return self.transformer.step(self.token_embedding_projection(patches), cache, valid)


class BLT(nn.Module):
    def __init__(self, cfg: ModelConfig, patching: PatchingConfig | None = None):
        """`patching` (the config's patching section) matters only for learned patching, whose
        router is part of the model; other modes cut patches outside it."""
        super().__init__()
        self.cfg = cfg
        self.local_encoder = LocalEncoder(cfg)
        self.global_transformer = GlobalTransformer(cfg)
        self.local_decoder = LocalDecoder(cfg)
        learned = patching is not None and mode_of(patching).needs_router
        self.patching = patching if learned else None
        self.router = BoundaryRouter(cfg.encoder.dim) if learned else None
        init_weights(self, cfg.init_std)
        if self.router is not None:
            self.router.reset_parameters()

    def forward(self, tokens: torch.Tensor, patch_ids: torch.Tensor | None = None, routing: bool = False):
        """tokens (B, T), patch_ids (B, T) non-decreasing from 0 -> logits (B, T, V). With a router
        (learned patching) patch_ids=None lets the model cut its own patches; routing=True also
        returns the Routing (None without a router)."""
        h = self.local_encoder.byte_states(tokens)  # (B, T, D) byte-level
        route, gate = None, None
        if self.router is not None:
            if patch_ids is not None:
                raise ValueError("this model cuts its own patches (patching.mode=learned): pass patch_ids=None")
            route = self.route(tokens, h)
            patch_ids = route.patch_ids
        elif patch_ids is None:
            raise ValueError("patch_ids are needed: only a model with patching.mode=learned cuts its own patches")
        num_patches = int(patch_ids.max()) + 1
        patches = self.local_encoder.pool(h, patch_ids, num_patches)  # (B, P, k*D) patch-level
        g = self.global_transformer(patches)  # (B, P, Dg)
        if route is not None:
            conf = confidence(route.probs, route.starts, route.router_starts)  # (B, T)
            g = smooth_patches(g, patch_confidence(conf, patch_ids, num_patches))  # (B, P, Dg)
            gate = straight_through(conf) if torch.is_grad_enabled() else None  # (B, T, 1), exactly 1
        logits = self.local_decoder(h, g, patch_ids, gate)
        return (logits, route) if routing else logits

    def route_step(self, h: torch.Tensor, before: torch.Tensor, first: torch.Tensor) -> torch.Tensor | None:
        """route's probabilities for new bytes (B, n, D), the states one byte before (B, n, D) and
        which are a row's byte 0 (B, n) -> (B, n); None for a model without a router."""
        return None if self.router is None else self.router.step(h, before, first)

    def confidence_step(self, probs: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """forward's confidence of the router's decisions for new bytes: (B, n) probabilities and
        the starts used (the shared rules included) -> (B, n)."""
        return confidence(probs, starts, probs >= BOUNDARY)

    def smooth_step(self, g: torch.Tensor, P: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """forward's smoothing for one new patch per row: (B, Dg) its global state, (B,) the
        confidence of its first byte, (B, Dg) the smoothed state of the patch before -> (B, Dg)
        (g itself for a model without a router)."""
        return g if self.router is None else smooth_step(g, P, before)

    def route(self, tokens: torch.Tensor, h: torch.Tensor) -> Routing:
        """The router's probabilities on byte states h (B, T, D) and the patches they cut, with the
        shared rules (BOS, max_patch_length, split_first_byte) applied."""
        probs = self.router(h)  # (B, T)
        starts = patch_starts(tokens, self.patching, probs.detach())
        return Routing(probs, starts, router_starts(probs.detach()), patch_ids_from_starts(starts))


def init_weights(model: nn.Module, std: float) -> None:
    """Normal(0, std) for Linear and Embedding weights, zeros for biases; residual output projections (o_proj,
    down_proj) get std / sqrt(2 * number of blocks), as in GPT-2."""
    names = [n for n, _ in model.named_parameters()]
    depth = max(1, sum(n.endswith("down_proj.weight") for n in names))
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, mean=0.0, std=std)
        if isinstance(mod, nn.Linear) and mod.bias is not None:  # q/k/v biases (model.*.qkv_bias) start at 0
            nn.init.zeros_(mod.bias)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, mean=0.0, std=std / (2 * depth) ** 0.5)
