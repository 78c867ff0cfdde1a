"""Parameter counts and FLOPs per byte, by the BLT paper's accounting.

A Transformer position costs 2 * (non-embedding parameters it touches) + 2 * layers * ctx * dim
forward FLOPs (the Chinchilla convention the paper uses, ctx = attention span); a training step is
3x forward. Global-model FLOPs are per patch, so per byte they are divided by the mean patch size.
Embedding lookups (bytes and hash n-grams) cost nothing. The entropy model runs forward only.
"""

from __future__ import annotations

from dataclasses import dataclass

from blt.config import ModelConfig, PatchingConfig, TransformerConfig
from blt.model.layers import ffn_hidden
from blt.patching.registry import mode_of
from blt.tokens import VOCAB_SIZE


def block_params(t: TransformerConfig) -> int:
    """Matmul parameters of a block stack (attention: q and o of dim x dim, k and v of dim x kv_heads
    * head size; SwiGLU; norms are negligible)."""
    kv_dim = (t.kv_heads or t.heads) * (t.dim // t.heads)
    return t.layers * (2 * t.dim * t.dim + 2 * t.dim * kv_dim + 3 * t.dim * ffn_hidden(t.dim, t.ffn_mult))


def kv_bytes_per_position(t: TransformerConfig, elem: int) -> int:
    """Bytes a generation KV cache keeps per position of this stack: keys and values of kv_heads
    heads in every layer (a grouped-query stack keeps heads / kv_heads times less)."""
    return 2 * t.layers * (t.kv_heads or t.heads) * (t.dim // t.heads) * elem


def kv_cache_bytes(model: ModelConfig, patching: PatchingConfig, seq: int, elem: int) -> dict[str, float]:
    """Generation KV-cache bytes of one sequence of `seq` bytes, per stack: the byte-level stacks hold
    every byte (at most their window under a windowed paged cache), the global model every patch
    (seq / the assumed patch size); the entropy model's own cache is not counted."""
    if model.arch == "byte_lm":
        return {"lm": seq * kv_bytes_per_position(model.lm, elem)}
    patches = seq / assumed_patch_size(model, patching)
    return {
        "encoder": seq * kv_bytes_per_position(model.encoder, elem),
        "global_model": patches * kv_bytes_per_position(model.global_model, elem),
        "decoder": seq * kv_bytes_per_position(model.decoder, elem),
    }


def attention_span(t: TransformerConfig, seq: int) -> float:
    """Mean number of keys a query attends to: the causal window, or the sparse pattern's blocks."""
    if t.sparse.pattern != "none":
        from blt.model.sparse_patterns import Pattern

        nb = max(1, -(-int(seq) // t.sparse.block))
        layout = Pattern(t.sparse, t.heads).layout(nb)
        return min(float(seq), float(layout.sum()) / (layout.shape[0] * nb) * t.sparse.block)
    return min(t.window or seq, seq)


def stack_flops(t: TransformerConfig, seq: int) -> float:
    """Forward FLOPs per position of a causal stack over a sequence of `seq` positions."""
    ctx = attention_span(t, seq)
    return 2 * block_params(t) + 2 * t.layers * ctx * t.dim


@dataclass
class FlopsReport:
    params: int  # all trainable parameters (embeddings included)
    params_non_embedding: int
    flops_per_byte: float  # training (fwd + bwd) FLOPs per byte, entropy model excluded
    flops_per_byte_with_entropy: float  # plus the entropy model's forward pass
    global_share: float  # share of flops_per_byte spent in the global model
    local_share: float  # share spent in the local encoder/decoder (cross-attention and head included)


def assumed_patch_size(model: ModelConfig, patching: PatchingConfig) -> float:
    """The mean patch size FLOPs are reported for: 1 for a byte LM, else what the patching mode
    expects (the patch size for static patching, the target for entropy and learned patching,
    about one English word for space patching)."""
    if model.arch == "byte_lm":
        return 1.0
    return mode_of(patching).assumed_patch_size(patching)


def flops_report(
    cfg: ModelConfig,
    seq_len: int,
    patch_size: float,
    params: int,
    entropy_cfg: ModelConfig | None = None,
    patching: PatchingConfig | None = None,
) -> FlopsReport:
    """FLOPs per byte for `cfg` on sequences of `seq_len` bytes with mean patch size `patch_size`
    (`patching`: learned patching adds its router and the smoothing of patch states)."""
    if cfg.arch == "byte_lm":
        local = stack_flops(cfg.lm, seq_len) + 2 * cfg.lm.dim * VOCAB_SIZE
        glob = 0.0
    else:
        D, Dg, k = cfg.encoder.dim, cfg.global_model.dim, cfg.cross_attn_k
        patches = seq_len / patch_size
        cross = 4 * D * D  # q, k, v, o projections of one cross-attention
        enc = stack_flops(cfg.encoder, seq_len)
        enc += (2 * D * D * k + 2 * k * cross / 2) / patch_size  # patch projection, q/o for k queries per patch
        enc += 2 * cross / 2 + 4 * k * D  # k/v per byte, scores and values against k queries
        dec = stack_flops(cfg.decoder, seq_len) + 2 * D * VOCAB_SIZE + 2 * Dg * D * k / patch_size  # + patch projection
        crosses = max(1, cfg.decoder.layers) if cfg.cross_attn_all_layers_decoder else 1
        dec += crosses * (2 * cross / 2 + 4 * k * D)  # q/o per byte, scores and values against k keys
        dec += crosses * (2 * k * cross / 2) / patch_size  # k/v for k keys per patch
        glob = (stack_flops(cfg.global_model, int(patches)) + 2 * D * k * Dg) / patch_size
        if patching is not None and mode_of(patching).needs_router:
            enc += 2 * 2 * D * D  # the router's q and k projections per byte
            glob += 2 * patches * Dg / patch_size  # smoothing: each patch state mixes the ones before
        local = enc + dec
    fwd = local + glob
    ent = 0.0
    if entropy_cfg is not None:
        ent = stack_flops(entropy_cfg.lm, seq_len) + 2 * entropy_cfg.lm.dim * VOCAB_SIZE
    embedding_params = _embedding_params(cfg)
    return FlopsReport(
        params=params,
        params_non_embedding=params - embedding_params,
        flops_per_byte=3 * fwd,
        flops_per_byte_with_entropy=3 * fwd + ent,
        global_share=glob / fwd,
        local_share=local / fwd,
    )


def _embedding_params(cfg: ModelConfig) -> int:
    if cfg.arch == "byte_lm":
        return VOCAB_SIZE * cfg.lm.dim
    tables = cfg.hash_functions * len(cfg.hash_ngram_sizes) * cfg.hash_buckets if cfg.hash_buckets else 0
    return (VOCAB_SIZE + tables) * cfg.encoder.dim


def model_info(cfg, model, entropy_cfg: ModelConfig | None = None, measured_patch_size: float | None = None) -> dict:
    """What `blt info` prints and a run's model_info.json starts with: the architecture, the patch
    size assumed, parameter counts and FLOPs per byte of `model` built from the config `cfg`; with
    `measured_patch_size` (a run's), FLOPs are at that mean patch size instead."""
    params = sum(p.numel() for p in model.parameters())
    patch_size = assumed_patch_size(cfg.model, cfg.patching)
    rep = flops_report(
        cfg.model, cfg.data.seq_len, measured_patch_size or patch_size, params, entropy_cfg, cfg.patching
    )
    measured = {} if measured_patch_size is None else {"measured_patch_size": measured_patch_size}
    return {"arch": cfg.model.arch, "assumed_patch_size": patch_size, **measured, **rep.__dict__}
