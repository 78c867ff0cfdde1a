"""Sparse attention patterns, DeepSpeed's SparsityConfig family on current PyTorch.

A pattern is defined once, as a block layout plus a token-level rule:
    allowed(h, q, k) = layout[h, q // block, k // block] and token_rule(q, k)
`layout(num_blocks)` -> (Hl, nb, nb) bool (Hl = heads with different_layout_per_head, else 1) and
`token_rule` (causal for unidirectional patterns; a token window for `local`). From it come the
dense boolean mask (the test oracle, `dense_mask`), the block layout the gather kernel reads, and
the FlexAttention mask_mod (`mask_mod`). Parameter names follow DeepSpeed's sparsity configs, so
settings port over:

    pattern       DeepSpeed class               parameters used
    dense         DenseSparsityConfig           block
    local         (Longformer's token window)   window (tokens)
    strided       (Sparse Transformer atrous)   num_sliding_window_blocks, dilation
    fixed         FixedSparsityConfig           num_local_blocks, num_global_blocks,
                                                num_different_global_patterns, horizontal_global_attention
    bigbird       BigBirdSparsityConfig         num_random_blocks, num_sliding_window_blocks, num_global_blocks
    longformer    BSLongformerSparsityConfig    num_sliding_window_blocks, global_block_indices,
                                                global_block_end_indices
    variable      VariableSparsityConfig        num_random_blocks, local_window_blocks, global_block_indices,
                                                global_block_end_indices, horizontal_global_attention
    block_causal  (block-level causal)          block (bidirectional inside a block: not for causal LMs)

Every pattern also takes block, different_layout_per_head, attention (unidirectional or
bidirectional) and seed (random blocks). All layouts are plain torch; nothing here imports a kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from blt.config import SparseAttentionConfig as SparsityConfig

PATTERNS = ("dense", "local", "strided", "fixed", "bigbird", "longformer", "variable", "block_causal")


class Pattern:
    """A sparsity pattern for `heads` attention heads; see the module docstring."""

    def __init__(self, cfg: SparsityConfig, heads: int):
        if cfg.pattern not in PATTERNS:
            raise ValueError(f"unknown sparse attention pattern '{cfg.pattern}' (known: {', '.join(PATTERNS)})")
        if cfg.attention not in ("unidirectional", "bidirectional"):
            raise ValueError("attention must be unidirectional or bidirectional")
        self.cfg, self.heads, self.block = cfg, heads, cfg.block
        self.causal = cfg.attention == "unidirectional" and cfg.pattern != "block_causal"
        self._layouts: dict[int, torch.Tensor] = {}
        self._gather_plans: dict = {}  # kernels' per-length index/mask caches (sparse_attention.py)
        self._flex_masks: dict = {}

    # ----- the definition: block layout + token rule
    def layout(self, num_blocks: int) -> torch.Tensor:
        """(Hl, nb, nb) bool: key blocks each query block may attend to (cached per nb)."""
        if num_blocks not in self._layouts:
            hl = self.heads if self.cfg.different_layout_per_head else 1
            lay = np.stack([self._head_layout(num_blocks, h) for h in range(hl)])
            if self.cfg.attention == "unidirectional":
                lay &= np.tril(np.ones((num_blocks, num_blocks), dtype=bool))[None]
            self._layouts[num_blocks] = torch.from_numpy(lay)
        return self._layouts[num_blocks]

    def token_rule(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Token-level refinement of the layout (broadcasting integer positions)."""
        ok = torch.ones(torch.broadcast_shapes(q.shape, k.shape), dtype=torch.bool, device=q.device)
        if self.causal:
            ok = ok & (k <= q)
        if self.cfg.pattern == "local":
            ok = ok & ((q - k).abs() < self.cfg.window)
        return ok

    # ----- what the definition turns into
    def dense_mask(self, T: int, device=None) -> torch.Tensor:
        """(Hl, T, T) bool: the oracle every backend is tested against."""
        nb = -(-T // self.block)
        pos = torch.arange(T, device=device)
        lay = self.layout(nb).to(device)
        blk = pos // self.block
        return lay[:, blk[:, None], blk[None, :]] & self.token_rule(pos[:, None], pos[None, :])[None]

    def mask_mod(self, T: int, device=None):
        """A FlexAttention mask_mod (vmap-able: tensor indexing only)."""
        lay = self.layout(-(-T // self.block)).to(device)
        per_head = lay.shape[0] > 1
        bs, causal, window = self.block, self.causal, self.cfg.window if self.cfg.pattern == "local" else None

        def mod(b, h, q, k):
            ok = lay[h if per_head else 0, q // bs, k // bs]
            if causal:
                ok = ok & (k <= q)
            if window is not None:
                ok = ok & ((q - k).abs() < window)
            return ok

        return mod

    # ----- per-pattern layouts (one head), numpy bool (nb, nb)
    def _head_layout(self, nb: int, h: int) -> np.ndarray:
        c = self.cfg
        qb = np.arange(nb)[:, None]
        kb = np.arange(nb)[None, :]
        d = qb - kb  # how many blocks back the key block is
        lay = np.zeros((nb, nb), dtype=bool)
        if c.pattern in ("dense", "block_causal"):
            lay[:] = True
            if c.pattern == "block_causal":
                lay &= d >= 0
        elif c.pattern == "local":
            reach = -(-(c.window - 1) // self.block) + 1  # block distance a token window can span
            lay = np.abs(d) <= reach
        elif c.pattern == "strided":
            lay = (d % c.dilation == 0) & (np.abs(d) < c.num_sliding_window_blocks * c.dilation)
        elif c.pattern == "fixed":
            L, G = c.num_local_blocks, c.num_global_blocks
            lay = (qb // L) == (kb // L)  # own local window
            first = L - (1 + h % c.num_different_global_patterns) * G  # summary blocks' offset in a window
            summary = ((kb % L) >= first) & ((kb % L) < first + G)
            lay |= summary & np.ones((nb, 1), dtype=bool)  # every query sees every window's summary blocks
            if c.horizontal_global_attention:
                lay |= ((qb % L) >= first) & ((qb % L) < first + G)
        elif c.pattern == "bigbird":
            half = c.num_sliding_window_blocks // 2
            lay = np.abs(d) <= half
            G = c.num_global_blocks
            lay[:, :G] = True
            lay[:G, :] = True
            lay |= self._random(nb, h)
        elif c.pattern == "longformer":
            half = c.num_sliding_window_blocks // 2
            lay = np.abs(d) <= half
            g = self._global_blocks(nb)
            lay[:, g] = True
            lay[g, :] = True
        elif c.pattern == "variable":
            start, sizes, i = 0, list(c.local_window_blocks), 0
            while start < nb:
                size = sizes[min(i, len(sizes) - 1)]
                lay[start : start + size, start : start + size] = True
                start, i = start + size, i + 1
            g = self._global_blocks(nb)
            lay[:, g] = True
            if c.horizontal_global_attention:
                lay[g, :] = True
            lay |= self._random(nb, h)
        return lay

    def _global_blocks(self, nb: int) -> np.ndarray:
        c = self.cfg
        if c.global_block_end_indices is None:
            idx = [i for i in c.global_block_indices if i < nb]
        else:
            idx = [i for s, e in zip(c.global_block_indices, c.global_block_end_indices) for i in range(s, min(e, nb))]
        return np.asarray(sorted(set(idx)), dtype=np.int64)

    def _random(self, nb: int, h: int) -> np.ndarray:
        """num_random_blocks random key blocks per query block (causal: among blocks <= its own)."""
        rng = np.random.default_rng([self.cfg.seed, h, nb])
        lay = np.zeros((nb, nb), dtype=bool)
        for q in range(nb):
            pool = q + 1 if self.cfg.attention == "unidirectional" else nb
            n = min(self.cfg.num_random_blocks, pool)
            lay[q, rng.choice(pool, size=n, replace=False)] = True
        return lay


def custom_pattern(layout: torch.Tensor, block: int, unidirectional: bool = True) -> Pattern:
    """A pattern from a hand-made (Hl, nb, nb) layout (fixed size), as DeepSpeed's custom layouts."""
    p = Pattern(
        SparsityConfig(pattern="dense", block=block, attention="unidirectional" if unidirectional else "bidirectional"),
        layout.shape[0],
    )
    lay = layout.bool().clone()
    if unidirectional:
        lay &= torch.tril(torch.ones(lay.shape[-2:], dtype=torch.bool))
    p._layouts[layout.shape[-1]] = lay
    return p
