"""Sparse attention backends for the patterns of sparse_patterns.py; all take (B, H, T, hd).

- `dense`: SDPA-free masked softmax over the pattern's full boolean mask (the reference; O(T^2)).
- `gather` (CPU and GPU, trains): query blocks gather only the key blocks their layout allows and
  run SDPA on them under the token-level mask, so cost follows the number of allowed blocks. Query
  blocks with many more key blocks than the rest (global rows: BigBird, Longformer, Variable with
  horizontal globals) are not padded into the gather; they run as one separate masked SDPA over all
  keys (padding every query block to the largest block count is what makes a naive block-sparse
  kernel quadratic again).
- `flex` (GPU): compiled FlexAttention with a BlockMask from the same mask_mod. On CPU it runs
  forward-only (PyTorch has no CPU backward for it).
Fully masked query rows give zeros in every backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blt.errors import ConfigError
from blt.model.alibi import alibi_bias, with_bias
from blt.model.attention import causal_self_attention
from blt.model.sparse_patterns import Pattern

BACKENDS = ("auto", "gather", "flex", "dense")


class SparseBackendError(ConfigError):
    """A pattern/backend pair this device cannot run; one-line message."""


def check_trainable(model_cfg, device: torch.device) -> None:
    """Refuse, before anything is built, a sparse backend that cannot train on `device`: flex has
    no CPU backward. The message names the config key and the backend to use instead."""
    if device.type == "cuda":
        return
    for name in ("lm",) if model_cfg.arch == "byte_lm" else ("encoder", "global_model", "decoder"):
        sp = getattr(model_cfg, name).sparse
        if sp.pattern != "none" and sp.backend == "flex":
            raise SparseBackendError(
                f"model.{name}.sparse.backend=flex cannot train on CPU (PyTorch has no CPU "
                f"backward for FlexAttention); set model.{name}.sparse.backend=gather (or auto)"
            )


def dense_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, slopes: torch.Tensor | None = None
) -> torch.Tensor:
    T = q.shape[-2]
    mask = pattern.dense_mask(T, q.device)[None]  # (1, Hl, T, T)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, H, T, T)
    if slopes is not None:
        pos = torch.arange(T, device=q.device)
        scores = scores + alibi_bias(slopes, pos, pos)
    has = mask.any(-1, keepdim=True)
    scores = torch.where(mask, scores, float("-inf"))
    scores = torch.where(has, scores, 0.0)  # fully masked rows: finite, zeroed below
    w = torch.softmax(scores, dim=-1) * has
    return w.to(v.dtype) @ v


def _split_rows(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gathered rows, dense rows): query blocks whose key-block count (max over heads) is far above
    the typical row's go to the dense path."""
    counts = layout.sum(-1).amax(0)  # (nb,)
    typical = counts.float().median()
    limit = max(8.0, 2.0 * float(typical) + 2.0)
    dense = counts > limit
    return torch.nonzero(~dense).flatten(), torch.nonzero(dense).flatten()


@torch.no_grad()
def _gather_plan(pattern: Pattern, T: int, H: int, dev: torch.device, slopes=None, dtype=None) -> dict:
    """Index and mask tensors for one sequence length (cached on the pattern: layers and steps reuse
    it); with ALiBi `slopes` (H,) the masks are float, each allowed key carrying its head's penalty."""
    key = (T, H, str(dev), slopes is not None, dtype)
    plans = pattern._gather_plans
    if key in plans:
        return plans[key]
    bs = pattern.block
    nb = -(-T // bs)
    layout = pattern.layout(nb).to(dev)  # (Hl, nb, nb)
    layout = layout.expand(H, nb, nb) if layout.shape[0] == 1 else layout
    rows, dense_rows = _split_rows(layout)
    offs = torch.arange(bs, device=dev)
    groups = []
    # rows grouped by key-block count (next power of two), so a few long rows do not pad all the others
    counts = layout[:, rows].sum(-1).amax(0).clamp(min=1)  # (nr,)
    caps = 2 ** torch.ceil(torch.log2(counts.float())).long()
    for cap in caps.unique().tolist():
        sel = rows[caps == cap]
        lay = layout[:, sel]  # (H, nr, nb)
        maxk = max(1, int(lay.sum(-1).max()))
        # the allowed key blocks of each row first (stable order), then padding slots marked invalid
        order = torch.sort(lay.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :maxk]
        valid = torch.gather(lay, -1, order)  # (H, nr, maxk)
        nr = len(sel)
        q_pos = sel[:, None] * bs + offs  # (nr, bs)
        k_pos = (order[..., None] * bs + offs).reshape(H, nr, maxk * bs)  # (H, nr, maxk*bs)
        k_ok = valid[..., None].expand(H, nr, maxk, bs).reshape(H, nr, maxk * bs) & (k_pos < T)
        mask = k_ok[:, :, None, :] & pattern.token_rule(q_pos[None, :, :, None], k_pos[:, :, None, :])
        live = mask.any(-1, keepdim=True)  # (H, nr, bs, 1)
        if slopes is not None:  # (H, nr, bs, maxk*bs): each head's penalty of every gathered key
            dist = (q_pos[None, :, :, None] - k_pos[:, :, None, :]).abs().float()
            mask = with_bias(mask, -slopes[:, None, None, None] * dist, live).to(dtype)
        mask, live = mask.reshape(1, H * nr, bs, maxk * bs), live.reshape(1, H * nr, bs, 1)
        groups.append({"sel": sel, "order": order, "mask": mask, "live": live})
    dense = None
    if len(dense_rows):
        nd = len(dense_rows)
        q_pos = (dense_rows[:, None] * bs + offs).reshape(-1)  # (nd*bs,)
        k_pos = torch.arange(nb * bs, device=dev)
        blk_ok = layout[:, dense_rows][:, :, None, :].expand(H, nd, bs, nb)  # (H, nd, bs, nb)
        blk_ok = blk_ok.reshape(H, nd * bs, nb).repeat_interleave(bs, dim=-1)  # (H, nd*bs, nb*bs)
        mask = (blk_ok & pattern.token_rule(q_pos[:, None], k_pos[None, :])[None] & (k_pos < T))[None]
        live = mask.any(-1, keepdim=True)  # (1, H, nd*bs, 1)
        if slopes is not None:
            mask = with_bias(mask, alibi_bias(slopes, q_pos, k_pos)[None], live).to(dtype)
        dense = {"rows": dense_rows, "mask": mask, "live": live}
    plans[key] = {"groups": groups, "dense": dense}
    return plans[key]


def gather_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, slopes: torch.Tensor | None = None
) -> torch.Tensor:
    if pattern.cfg.pattern == "local" and pattern.causal:  # a causal token window: the banded kernel
        return causal_self_attention(q, k, v, pattern.cfg.window, slopes)
    B, H, T, hd = q.shape
    bs = pattern.block
    nb = -(-T // bs)
    pad = nb * bs - T
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    plan = _gather_plan(pattern, T, H, q.device, slopes, q.dtype if slopes is not None else None)
    out = torch.zeros_like(q).view(B, H, nb, bs, hd)
    qb, kb, vb = (x.view(B, H, nb, bs, hd) for x in (q, k, v))
    heads = torch.arange(H, device=q.device)[:, None, None]
    for g in plan["groups"]:
        sel, order = g["sel"], g["order"]
        nr, maxk = order.shape[1], order.shape[2]
        kg = kb[:, heads, order].reshape(B, H * nr, maxk * bs, hd)  # (B, H*nr, maxk*bs, hd) gathered key blocks
        vg = vb[:, heads, order].reshape(B, H * nr, maxk * bs, hd)
        y = F.scaled_dot_product_attention(
            qb[:, :, sel].reshape(B, H * nr, bs, hd), kg, vg, attn_mask=g["mask"]
        )  # (B, H*nr, bs, hd)
        y = y * g["live"]  # fully masked rows: 0
        out = out.index_copy(2, sel, y.view(B, H, nr, bs, hd))
    d = plan["dense"]
    if d is not None:  # global rows: one masked SDPA over all keys
        nd = len(d["rows"])
        y = F.scaled_dot_product_attention(
            qb[:, :, d["rows"]].reshape(B, H, nd * bs, hd), k, v, attn_mask=d["mask"]
        )  # (B, H, nd*bs, hd)
        out = out.index_copy(2, d["rows"], (y * d["live"]).view(B, H, nd, bs, hd))
    return out.view(B, H, nb * bs, hd)[:, :, :T]


def flex_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, slopes: torch.Tensor | None = None
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, hd = q.shape
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise SparseBackendError(
            "sparse attention backend 'flex' cannot train on CPU (PyTorch has no CPU "
            "backward for FlexAttention); use backend gather (or auto)"
        )
    masks = pattern._flex_masks  # one BlockMask per length and device
    key = (T, str(q.device))
    if key not in masks:
        hl = pattern.layout(-(-T // pattern.block)).shape[0]
        masks[key] = create_block_mask(
            pattern.mask_mod(T, q.device), B=None, H=hl if hl > 1 else None, Q_LEN=T, KV_LEN=T, device=q.device
        )
    score_mod = None
    if slopes is not None:  # ALiBi as a score_mod: each head's penalty of the query-key distance

        def score_mod(score, b, h, qi, ki):
            return score - slopes[h] * (qi - ki).abs()

    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=masks[key])
    import warnings

    with warnings.catch_warnings():  # eager on CPU is exact, just slow: fine for inference and tests
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=masks[key])


_COMPILED = None


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    backend: str = "auto",
    slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of (B, H, T, hd) under `pattern` with `backend` (auto: flex on GPU, gather on CPU);
    `slopes` (H,): ALiBi's per-head distance penalty (alibi.py)."""
    if backend == "auto":
        backend = "flex" if q.device.type == "cuda" else "gather"
    if backend == "gather":
        return gather_sparse_attention(q, k, v, pattern, slopes)
    if backend == "flex":
        return flex_sparse_attention(q, k, v, pattern, slopes)
    if backend == "dense":
        return dense_sparse_attention(q, k, v, pattern, slopes)
    raise SparseBackendError(f"unknown sparse attention backend '{backend}' (use {', '.join(BACKENDS)})")
