"""Key/value caches for incremental decoding of any `Transformer` (bytes or patches).

One cache holds every layer's keys and values for a batch of sequences that may have different
lengths: row b has `lens[b]` cached positions. A step appends `n` new positions to every row, of
which the first `valid[b]` count (the rest are padding, written past the row's end and overwritten
later), so a ragged prefill, a lockstep byte step and a patch step where only some rows have a new
patch are the same call. Rows can be dropped, reordered or copied (`take`) and another cache's rows
added (`append`), so a server's batch can change between steps:

    cache = KVCache.for_transformer(model.transformer, batch=2, capacity=1024)
    y = model.transformer.step(x, cache, valid)   # x (B, n, D) new positions -> (B, n, D)

Every step first plans its slots and mask once (`begin`), then each layer writes and reads (`write`).
`FixedSlots` is the same interface at fixed shapes, for compiled one-position steps.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """A step would write past the cache's capacity (the caller shifts its context first)."""


class KVCache:
    def __init__(
        self, layers: int, batch: int, heads: int, head_dim: int, capacity: int, device=None, dtype=torch.float32
    ):
        self.capacity = capacity
        self.k = torch.zeros(layers, batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)  # cached positions per row
        self.tables = None  # the Transformer's step_constants (RoPE tables, stacked weights), made on first use
        self.pos, self.L, self.lo, self.in_step = None, 0, 0, True  # the current step's plan (`begin`)
        self.steps = torch.arange(capacity, device=device)
        self.dense = None  # a sparse pattern's mask over the whole capacity

    @classmethod
    def for_transformer(cls, transformer, batch: int, capacity: int, device=None, dtype=torch.float32) -> KVCache:
        c = transformer.cfg
        return cls(max(1, c.layers), batch, c.kv_heads or c.heads, c.dim // c.heads, capacity, device, dtype)

    def check_room(self, n: int) -> None:
        if int(self.lens.max()) + n > self.capacity:
            raise CacheFullError(f"KV cache holds {self.capacity} positions; {int(self.lens.max())} + {n} do not fit")

    def begin(self, n: int, window: int | None, pattern=None, valid=None) -> torch.Tensor | None:
        """Plan a step of n new positions per row (shared by every layer): their slots, the slots
        [lo, L) any of them can see, and the mask over those: (B, 1 or Hl, n, L - lo) bool, new
        position i of row b (at lens[b] + i) sees slot j iff j <= lens[b] + i, within the last
        `window` positions, and allowed by a sparse `pattern`. None when every new position sees
        all of [lo, L) (one new position, rows of equal length, no pattern)."""
        self.check_room(n)
        top, low = int(self.lens.max()), int(self.lens.min())
        self.pos = self.lens[:, None] + self.steps[:n]  # (B, n)
        self.L, self.lo = top + n, max(0, low - window + 1) if window is not None else 0
        self.in_step = top == low  # all rows write the same slots: a slice, not a scatter
        self.key_pos = self.steps[self.lo : self.L]  # (L - lo,) the positions of the slots `write` returns
        if n == 1 and self.in_step and pattern is None:
            return None
        q = self.pos[:, None, :, None]  # (B, 1, n, 1)
        j = torch.arange(self.lo, self.L, device=q.device)[None, None, None, :]  # (1, 1, 1, L - lo)
        ok = j <= q
        if window is not None:
            ok = ok & (j > q - window)
        if pattern is not None:  # the pattern's rows at these positions (layout of the full capacity)
            if self.dense is None:
                self.dense = pattern.dense_mask(self.capacity, q.device)  # (Hl, C, C), once per cache
            dense = self.dense[:, :, self.lo : self.L]  # (Hl, C, L - lo)
            rows = q[:, 0, :, 0].clamp(max=self.capacity - 1)  # (B, n)
            ok = ok & dense[:, rows].permute(1, 0, 2, 3)  # (B, Hl, n, L - lo)
        return ok

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, n, hd) at the planned slots (`begin`); returns the keys and values of
        slots [lo, L) (B, H, L - lo, hd) for attention."""
        B, H, n, hd = k.shape
        if self.in_step:
            self.k[layer, :, :, self.L - n : self.L] = k
            self.v[layer, :, :, self.L - n : self.L] = v
        else:
            idx = self.pos.view(B, 1, n, 1).expand(B, H, n, hd)
            self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
            self.v[layer].scatter_(2, idx, v.to(self.v.dtype))
        return self.k[layer, :, :, self.lo : self.L], self.v[layer, :, :, self.lo : self.L]

    def take(self, rows: torch.Tensor) -> None:
        """Keep these rows (a (B',) index: any order, repeats allowed), in this order."""
        self.k, self.v, self.lens = self.k[:, rows], self.v[:, rows], self.lens[rows]

    def append(self, other: KVCache) -> None:
        """Add the rows of `other` (same capacity, layers and heads) after this cache's rows."""
        self.k, self.v = torch.cat([self.k, other.k], 1), torch.cat([self.v, other.v], 1)
        self.lens = torch.cat([self.lens, other.lens])

    def advance(self, valid: torch.Tensor | int) -> None:
        self.lens += valid

    def rewind(self, counts: torch.Tensor) -> None:
        """Forget the last counts[b] positions of every row (they will be written again)."""
        self.lens -= torch.minimum(counts, self.lens)


class FixedSlots:
    """KVCache's step interface at fixed shapes, for one new position per row (compiled steps,
    static_step.py): the position is written at slot lens[b] of per-layer tensors (B, H, C, hd) in
    place, and attention reads every slot under a mask (slots <= lens[b]), or, under a window, each
    row's last `window` slots, gathered (a windowed model reads W slots, not C). `advance` does
    nothing: the caller advances its KVCache after the compiled call."""

    def __init__(self, k, v, lens: torch.Tensor, tables: tuple):
        self.k, self.v, self.lens, self.tables = k, v, lens, tables  # per layer (B, H, C, hd); (B,)
        self.capacity = k[0].shape[2]
        self.rows = torch.arange(lens.shape[0], device=lens.device)
        self.pos, self.slots = lens[:, None], None  # (B, 1) the new position of every row

    def begin(self, n: int, window: int | None, pattern=None, valid=None) -> torch.Tensor:
        if window is not None and window < self.capacity:  # each row's last W slots (before slot 0: masked)
            wanted = self.lens[:, None] - window + 1 + torch.arange(window, device=self.lens.device)[None]  # (B, W)
            self.slots, seen = wanted.clamp(min=0), wanted >= 0
            self.key_pos = self.slots  # (B, W) the positions of the slots `write` returns
        else:
            self.key_pos = torch.arange(self.capacity, device=self.lens.device)  # (C,)
            seen = self.key_pos[None] <= self.lens[:, None]  # (B, C)
        return seen[:, None, None, :]  # (B, 1, 1, W or C)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # an index_put on each layer's own tensor: inductor writes it in place (a scatter into a
        # slice of the stacked cache would copy the whole cache every step)
        self.k[layer][self.rows, :, self.lens] = k[:, :, 0].to(self.k[layer].dtype)  # (B, H, hd)
        self.v[layer][self.rows, :, self.lens] = v[:, :, 0].to(self.v[layer].dtype)
        if self.slots is None:
            return self.k[layer], self.v[layer]  # (B, H, C, hd)
        B, H, _, hd = k.shape
        at = self.slots[:, None, :, None].expand(B, H, -1, hd)
        return self.k[layer].gather(2, at), self.v[layer].gather(2, at)  # (B, H, W, hd)

    def advance(self, valid) -> None:
        pass
