"""Attention kernels for BLT on any device, with dense masked references for the tests.

Self-attention is causal SDPA (optionally a sliding window, optionally with ALiBi's bias). The two
cross-attentions of BLT are exact gather/segment kernels, linear in bytes (on a 2-core CPU with
torch 2.13 they measured 10-14x faster than SDPA with a boolean mask):
- encoder pooling: each patch query attends only to the bytes of its own patch (segment softmax);
- decoder: each byte attends only to the k states of one earlier patch (the one before its own).
All tensors are (B, H, L, hd); `patch_ids` (B, T) is the patch index of every byte.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blt.model.alibi import alibi_bias, with_bias


def sliding_window_mask(T: int, window: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where query i may see key j: i - window < j <= i."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (j > i - window)


def causal_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, slopes: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention over (B, H, T, hd), limited to the last `window` positions when window < T;
    `slopes` (H,): ALiBi's per-head distance penalty added to the scores (alibi.py)."""
    T = q.shape[-2]
    if window is None or window >= T:
        if slopes is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        window = T
    if T <= 2 * window:
        mask = sliding_window_mask(T, window, q.device)  # (T, T)
        if slopes is not None:
            pos = torch.arange(T, device=q.device)
            mask = with_bias(mask, alibi_bias(slopes, pos, pos)).to(q.dtype)  # (H, T, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return blocked_window_attention(q, k, v, window, slopes)


def blocked_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, slopes: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact sliding-window attention, linear in T: queries in blocks of `window` positions, each
    block attending to its own and the previous block's keys (2 * window keys) under a band mask;
    with ALiBi `slopes` the band carries each head's distance penalty (the same in every block)."""
    B, H, T, hd = q.shape
    W = window
    nb = -(-T // W)
    pad = nb * W - T
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))

    def blocks(x):  # (B, H, nb*W, hd) -> (B*nb, H, W, hd)
        return x.view(B, H, nb, W, hd).transpose(1, 2).reshape(B * nb, H, W, hd)

    def with_previous(x):  # (B, H, nb*W, hd) -> (B*nb, H, 2W, hd): previous block then own block
        xb = x.view(B, H, nb, W, hd)
        prev = torch.cat([torch.zeros_like(xb[:, :, :1]), xb[:, :, :-1]], dim=2)
        return torch.cat([prev, xb], dim=3).transpose(1, 2).reshape(B * nb, H, 2 * W, hd)

    i = torch.arange(W, device=q.device)[:, None]  # query offset in its block
    j = torch.arange(2 * W, device=q.device)[None, :]  # key offset from the previous block's start
    band = (j - W <= i) & (j - W > i - W)  # (W, 2W): key position within (query - W, query]
    first = band & (j >= W)  # block 0 has no previous block
    qb, kb, vb = blocks(q), with_previous(k), with_previous(v)
    if slopes is None:
        mask = torch.stack([first] + [band] * (nb - 1)).repeat(B, 1, 1)[:, None]  # (B*nb, 1, W, 2W)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    else:  # one (H, W, 2W) band for every block, then block 0 again under its own mask
        bias = alibi_bias(slopes, i[:, 0], j[0] - W)  # (H, W, 2W): key at block start - W + j
        band, first = with_bias(band, bias).to(q.dtype), with_bias(first, bias).to(q.dtype)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=band).view(B, nb, H, W, hd)
        at0 = torch.arange(B, device=q.device) * nb  # block 0 of every row
        out0 = F.scaled_dot_product_attention(qb[at0], kb[at0], vb[at0], attn_mask=first)  # (B, H, W, hd)
        out = torch.cat([out0[:, None], out[:, 1:]], dim=1)
    out = out.reshape(B, nb, H, W, hd).transpose(1, 2).reshape(B, H, nb * W, hd)
    return out[:, :, :T]


def patch_pooling_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patch_ids: torch.Tensor, cross_k: int
) -> torch.Tensor:
    """Patch queries attend to their own patch's bytes (segment softmax).

    q: (B, H, P*cross_k, hd) patch-level queries; k, v: (B, H, T, hd) byte-level.
    Returns (B, H, P*cross_k, hd); a patch with no bytes gets zeros.
    """
    B, H, PK, hd = q.shape
    T = k.shape[2]
    P = PK // cross_k
    qp = q.view(B, H, P, cross_k, hd)
    idx = patch_ids.view(B, 1, T, 1, 1).expand(B, H, T, cross_k, hd)
    q_of_byte = qp.gather(2, idx)  # (B, H, T, k, hd): each byte's patch queries
    scores = (q_of_byte * k.unsqueeze(3)).sum(-1) * hd**-0.5  # (B, H, T, k)
    sidx = patch_ids.view(B, 1, T, 1).expand(B, H, T, cross_k)
    seg_max = torch.full((B, H, P, cross_k), float("-inf"), device=q.device, dtype=scores.dtype)
    seg_max = seg_max.scatter_reduce(2, sidx, scores.detach(), reduce="amax", include_self=True)
    e = torch.exp(scores - seg_max.gather(2, sidx))  # (B, H, T, k)
    denom = torch.zeros_like(seg_max).scatter_add(2, sidx, e)
    w = e / denom.gather(2, sidx)
    out = torch.zeros(B, H, P, cross_k, hd, device=q.device, dtype=v.dtype)
    out = out.scatter_add(2, idx, w.unsqueeze(-1).to(v.dtype) * v.unsqueeze(3))  # (B, H, P, k, hd)
    return out.view(B, H, PK, hd)


def patch_state_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    src: torch.Tensor,
    cross_k: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Byte queries attend to the cross_k states of one patch each: byte t reads patch src[t].

    q: (B, H, T, hd) byte-level; k, v: (B, H, P*cross_k, hd) patch-level; src (B, T), -1 = no
    patch (zeros). `valid` (B, T), when given, says which bytes have a patch instead of src >= 0.
    Returns (B, H, T, hd).
    """
    B, H, T, hd = q.shape
    P = k.shape[2] // cross_k
    valid = src >= 0 if valid is None else valid
    idx = src.clamp(min=0).view(B, 1, T, 1, 1).expand(B, H, T, cross_k, hd)
    kg = k.view(B, H, P, cross_k, hd).gather(2, idx)  # (B, H, T, k, hd)
    vg = v.view(B, H, P, cross_k, hd).gather(2, idx)
    scores = (q.unsqueeze(3) * kg).sum(-1) * hd**-0.5  # (B, H, T, k)
    w = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    w = w * valid.view(B, 1, T, 1).to(w.dtype)
    return (w.unsqueeze(-1) * vg).sum(3)  # (B, H, T, hd)


def previous_patch_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patch_ids: torch.Tensor, cross_k: int
) -> torch.Tensor:
    """Byte queries attend to the cross_k states of the patch before their own (patch 0: zeros)."""
    return patch_state_attention(q, k, v, patch_ids - 1, cross_k)


def masked_pool_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, cross_k: int
) -> torch.Tensor:
    """patch_pooling_attention for patches gathered one per row (generation): queries (N, H, k, hd)
    over their patch's bytes (N, H, L, hd); mask (N, L) marks the bytes (the rest is padding)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


def one_patch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ids, cross_k: int) -> torch.Tensor:
    """patch_state_attention for one byte per row whose patch is gathered (generation): the byte
    (B, H, 1, hd) over its source patch's cross_k states (B, H, cross_k, hd)."""
    return F.scaled_dot_product_attention(q, k, v)


def decoder_source_patches(patch_ids: torch.Tensor, hf_compat: bool) -> torch.Tensor:
    """(B, T) patch index of every byte -> (B, T) index of the patch whose global state it reads.

    blt: the patch before its own (which ended before the byte's patch began).
    hf_compat: HF's rule, patch ids of `patch_lengths[:, 1:]`: patch_id[t + L0] - 1 with L0 the
    first patch's length, capped at the last byte, and at least 0 (HF's ids start from a 0); with
    L0 = 1 (patching.split_first_byte) that is the last patch ending at or before t, never counting
    the window's last byte as a patch end (so a 1-byte window reads patch 0).
    """
    if not hf_compat:
        return patch_ids - 1
    B, T = patch_ids.shape
    first_len = (patch_ids == 0).sum(1, keepdim=True)  # (B, 1) L0
    pos = (torch.arange(T, device=patch_ids.device)[None] + first_len).clamp(max=T - 1)  # (B, T)
    return (patch_ids.gather(1, pos) - 1).clamp(min=0)


def source_patches_at(
    patch_ids: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor, hf_compat: bool
) -> torch.Tensor:
    """decoder_source_patches for some bytes of rows being generated: patch_ids (B, C) of every
    byte so far, slots (B, n) the bytes asked for, lens (B,) each row's length -> (B, n); -1 = no
    patch. HF's rule with split_first_byte (the only HF-compatible patching generation meets):
    patch_id[min(t + 1, len - 1)] - 1, at least 0."""
    if not hf_compat:
        return patch_ids.gather(1, slots) - 1
    nxt = torch.minimum(slots + 1, (lens - 1).clamp(min=0)[:, None])
    return (patch_ids.gather(1, nxt) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- dense references


def pooling_mask(patch_ids: torch.Tensor, num_patches: int, cross_k: int) -> torch.Tensor:
    """(B, P*cross_k, T) bool: patch query j may see byte t iff t belongs to patch j // cross_k."""
    P = torch.arange(num_patches, device=patch_ids.device).repeat_interleave(cross_k)  # (P*k,)
    return P[None, :, None] == patch_ids[:, None, :]


def decoder_mask(patch_ids: torch.Tensor, num_patches: int, cross_k: int) -> torch.Tensor:
    """(B, T, P*cross_k) bool: byte t may see the keys of patch patch_ids[t] - 1 only."""
    P = torch.arange(num_patches, device=patch_ids.device).repeat_interleave(cross_k)
    return P[None, None, :] == (patch_ids - 1)[:, :, None]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention with a (B, Q, K) bool mask; fully masked rows give zeros."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Q, K)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return w @ v
