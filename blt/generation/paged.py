"""A paged KV cache (vLLM's PagedAttention, in plain PyTorch): keys and values live in fixed-size
blocks of a pool shared by every row of one Transformer (bytes or patches). A row holds a table of
its blocks: it takes blocks as it grows and gives them back when it leaves (`take` without it),
when it is rewound past them, and, in a windowed Transformer, once they are wholly before every
position its later steps can see. So rows of different lengths share one pool instead of each
holding the whole context.

    pool = BlockPool.for_transformer(model.transformer, blocks=256, block_size=16)
    cache = PagedKVCache(pool, batch=2, capacity=1024)   # KVCache's step interface (kv_cache.py)
    y = model.transformer.step(x, cache, valid)          # (B, n, D) new positions -> (B, n, D)
    cache.take(rows); cache.append(other)                # other: a cache on the same pool; no copy

`KVPools` splits a memory budget (MB) between the pools of a model's cached Transformers and says
how long a prompt fits and how many rows the pools hold (the engine's `kv_cache_mb`).
"""

from __future__ import annotations

import math

import torch

from blt.errors import UserError
from blt.generation.kv_cache import KVCache

BLOCK_SIZE = 16  # positions per block: measured, see docs/serving.md#paged-kv-cache
ROW_BYTES = 1024  # KVPools balances its pools for rows of this many bytes (measured, docs/serving.md)
PREFILL_CHUNK = 256  # bytes of a prompt prefilled per step with a paged cache (CachedState.prefill)
REWIND = 1  # the most positions a cache is rewound (an HF-compatible decoder redoes its last byte)


class PoolFull(RuntimeError):
    """A pool has fewer free blocks than a step needs (the engine waits or preempts a row)."""


class KVBudgetError(UserError):
    """A KV-cache budget too small for a prompt, or for one block of every pool."""


class BlockPool:
    """Keys and values of one Transformer's layers in `blocks` blocks of `block_size` positions:
    k, v (layers, blocks + 1, block_size, kv_heads, head_dim). Block 0 is scratch and never handed
    out: padding positions are written there, and slots a row does not hold read from it (masked)."""

    def __init__(self, layers, kv_heads, head_dim, blocks, block_size=BLOCK_SIZE, device=None, dtype=torch.float32):
        self.blocks, self.block_size = blocks, block_size
        self.k = torch.zeros(layers, blocks + 1, block_size, kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self._free = list(range(blocks, 0, -1))  # a stack: low ids first
        self.tables: dict[int, tuple] = {}  # the Transformer's step constants per capacity, made once

    @staticmethod
    def shape_of(transformer) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of a Transformer's cache."""
        c = transformer.cfg
        return max(1, c.layers), c.kv_heads or c.heads, c.dim // c.heads

    @classmethod
    def for_transformer(cls, transformer, blocks, block_size=BLOCK_SIZE, device=None, dtype=torch.float32):
        return cls(*cls.shape_of(transformer), blocks, block_size, device, dtype)

    @classmethod
    def block_bytes(cls, transformer, block_size=BLOCK_SIZE, dtype=torch.float32) -> int:
        layers, kv_heads, head_dim = cls.shape_of(transformer)
        return 2 * layers * kv_heads * head_dim * block_size * dtype.itemsize  # keys and values

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """n free block ids; PoolFull (nothing taken) if fewer are free."""
        if n > len(self._free):
            raise PoolFull(f"{n} blocks wanted, {len(self._free)} of {self.blocks} free")
        out = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return out

    def release(self, ids) -> None:
        self._free.extend(i for i in ids if i)  # 0: a slot given back already


class PagedKVCache(KVCache):
    """KVCache's step interface (and mask: windows, ragged rows, sparse patterns; `begin` is
    KVCache's) over a BlockPool: row b's position p is at block blocks[b][p // block_size], offset
    p % block_size. `write` gathers the blocks covering the slots the step may see, (B, Hkv, L, hd)."""

    def __init__(self, pool: BlockPool, batch: int, capacity: int):
        dev = pool.k.device
        self.pool, self.capacity, self.bs = pool, capacity, pool.block_size
        self.lens = torch.zeros(batch, dtype=torch.long, device=dev)  # cached positions per row
        self.blocks: list[list[int]] = [[] for _ in range(batch)]  # each row's block ids; 0: given back (window)
        self.gone = [0] * batch  # leading blocks of each row given back (window)
        self.tables = pool.tables.get(capacity)  # the Transformer's step constants, shared over the pool
        self.pos, self.L, self.lo, self.in_step = None, 0, 0, True
        self.steps = torch.arange(capacity, device=dev)
        self.dense = None
        self.window = None  # the window of the last step (early freeing)
        self._table, self._dirty = None, True

    # ------------------------------------------------------------------ the step interface

    def begin(self, n: int, window: int | None, pattern=None, valid=None) -> torch.Tensor | None:
        """KVCache.begin, then blocks for the positions the step keeps: the first valid[b] of row b
        (None: all n); the rest are padding, written to scratch, so they take no blocks."""
        mask = super().begin(n, window, pattern)  # pos, L, lo, key_pos and the mask, as KVCache plans them
        self.window, bs = window, self.bs
        lens = self.lens.tolist()
        keep = [n] * len(lens) if valid is None else valid.tolist()
        need = [max(0, -(-(length + k) // bs) - len(b)) for length, k, b in zip(lens, keep, self.blocks)]
        if sum(need):
            new = self.pool.alloc(sum(need))
            for b, m in enumerate(need):
                self.blocks[b] += new[:m]
                new = new[m:]
            self._dirty = True
        table = self._block_table()  # (B, C / bs) block ids, 0 past each row's blocks: scratch
        blk = table.gather(1, self.pos // bs)  # (B, n) the new positions' blocks
        self._slots = (blk * bs + self.pos % bs).flatten()  # (B * n,) slots in the pool's flat layout
        b0, b1 = self.lo // bs, -(-self.L // bs)  # the blocks covering [lo, L)
        self._ids, self._off = table[:, b0:b1].flatten(), self.lo - b0 * bs  # (B * nb,)
        return mask

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, n, hd) at the planned slots; returns the keys and values of slots
        [lo, L) of every row (B, Hkv, L - lo, hd), gathered from its blocks."""
        B, H, n, hd = k.shape
        out = []
        for pool, new in ((self.pool.k[layer], k), (self.pool.v[layer], v)):  # (blocks + 1, bs, Hkv, hd)
            flat = pool.view(-1, H, hd)  # (slots, Hkv, hd)
            flat.index_copy_(0, self._slots, new.transpose(1, 2).reshape(B * n, H, hd).to(pool.dtype))
            seen = pool.index_select(0, self._ids).view(B, -1, H, hd)  # (B, nb * bs, Hkv, hd)
            out.append(seen[:, self._off : self._off + self.L - self.lo].transpose(1, 2))  # (B, Hkv, L - lo, hd)
        return out[0], out[1]

    def advance(self, valid: torch.Tensor | int) -> None:
        self.lens += valid
        if self.tables is not None:
            self.pool.tables.setdefault(self.capacity, self.tables)
        self._trim()

    def rewind(self, counts: torch.Tensor) -> None:
        """Forget the last counts[b] positions of every row; blocks past the new ends go back."""
        super().rewind(counts)
        if self.window is not None and any(
            g * self.bs > length - self.window + 1 for g, length in zip(self.gone, self.lens.tolist()) if g
        ):  # the next query (at `length`) would see a slot given back
            raise RuntimeError(f"a paged cache is rewound by at most {REWIND} position past its window")
        self._trim()

    # ------------------------------------------------------------------ rows

    def take(self, rows: torch.Tensor) -> None:
        """Keep these rows (any order; a row named twice has its blocks copied), in this order;
        the blocks of rows left out go back to the pool."""
        idx = rows.tolist()
        blocks, gone, seen = [], [], set()
        for i in idx:
            if i in seen:  # a copy: new blocks with the same keys and values
                old = [b for b in self.blocks[i] if b]
                new = iter(self.pool.alloc(len(old)))
                blocks.append([next(new) if b else 0 for b in self.blocks[i]])
                src = torch.tensor(old, device=self.lens.device)
                dst = torch.tensor([b for b in blocks[-1] if b], device=self.lens.device)
                self.pool.k[:, dst], self.pool.v[:, dst] = self.pool.k[:, src], self.pool.v[:, src]
            else:
                blocks.append(self.blocks[i])
            gone.append(self.gone[i])
            seen.add(i)
        for i, b in enumerate(self.blocks):
            if i not in seen:
                self.pool.release(b)
        self.blocks, self.gone, self.lens = blocks, gone, self.lens[rows]
        self._dirty = True

    def append(self, other: PagedKVCache) -> None:
        """Add the rows of `other` (a cache on the same pool) after these: their block tables join,
        keys and values stay where they are; `other` is left empty."""
        if other.pool is not self.pool:
            raise ValueError("append joins caches on one pool")
        self.blocks, self.gone = self.blocks + other.blocks, self.gone + other.gone
        self.lens = torch.cat([self.lens, other.lens])
        other.blocks, other.gone, other.lens = [], [], other.lens[:0]
        self._dirty = True

    def release(self) -> None:
        """Give every row's blocks back (the cache then has no rows)."""
        self.take(self.lens.new_zeros(0))

    def blocks_for(self, n: int) -> int:
        """New blocks the rows need to hold n more positions each."""
        bs = self.bs
        return sum(max(0, -(-(length + n) // bs) - len(b)) for length, b in zip(self.lens.tolist(), self.blocks))

    @property
    def held(self) -> int:
        """Blocks the rows hold."""
        return sum(1 for b in self.blocks for i in b if i)

    # ------------------------------------------------------------------ internals

    def _block_table(self) -> torch.Tensor:
        if self._dirty:
            width = -(-self.capacity // self.bs)
            rows = [b + [0] * (width - len(b)) for b in self.blocks]
            self._table = torch.tensor(rows, dtype=torch.long).view(len(rows), width).to(self.lens.device)
            self._dirty = False
        return self._table

    def _trim(self) -> None:
        """Give back blocks past each row's end (a step's padding, a rewind) and, under a window,
        the blocks wholly before every position the row's later steps can see (they are masked)."""
        bs, freed = self.bs, []
        for b, length in enumerate(self.lens.tolist()):
            blocks = self.blocks[b]
            end = -(-length // bs)
            if len(blocks) > end:
                freed += blocks[end:]
                del blocks[end:]
            if self.window is not None:  # a later query q >= length - REWIND sees slots > q - window
                first = min(len(blocks), max(0, length - self.window - REWIND + 1) // bs)
                for j in range(self.gone[b], first):
                    freed.append(blocks[j])
                    blocks[j] = 0
                self.gone[b] = max(self.gone[b], first)
        if freed:
            self.pool.release(freed)
            self._dirty = True


class KVPools:
    """A KV-cache budget of `mb` MB (MiB) split between the block pools of a model's cached
    Transformers, in proportion to what a row of `row_bytes` bytes (the context if shorter) holds in
    each: its positions there (1 per byte in a byte-level Transformer, at most its window's; 1 per
    patch in the global model, at the mean patch size the patching mode assumes) times the bytes of
    a position (layers x 2 x kv_heads x head_dim x the dtype's size). Prompts are prefilled
    `chunk` bytes at a time, so a windowed Transformer's pool holds at most window + chunk
    positions of a prompt at once (CachedState.prefill).

    transformers: name -> (Transformer, positions per byte, dtype)."""

    def __init__(
        self,
        transformers: dict,
        mb: float,
        context: int,
        block_size: int = BLOCK_SIZE,
        device=None,
        what: str = "kv_cache_mb",
        row_bytes: int = ROW_BYTES,
        chunk: int = PREFILL_CHUNK,
    ):
        self.mb, self.context, self.block_size, self.what, self.chunk = mb, context, block_size, what, chunk
        self.specs = transformers
        size = {n: BlockPool.block_bytes(tf, block_size, dt) for n, (tf, _, dt) in transformers.items()}
        share = {n: self._blocks(n, min(row_bytes, context)) * size[n] for n in transformers}  # a typical row's bytes
        total, budget = sum(share.values()), mb * 2**20
        blocks = {n: int(budget * share[n] / total // size[n]) for n in transformers}
        if min(blocks.values()) < 1:
            least = max(size[n] * total / share[n] for n in transformers)
            raise KVBudgetError(
                f"{what} {mb:g} is too small to hold one block of {block_size} positions in every cached "
                f"Transformer ({', '.join(transformers)}); give at least {math.ceil(least / 2**20 * 100) / 100:g} MB"
            )
        self.pools = {
            n: BlockPool.for_transformer(tf, blocks[n], block_size, device, dt)
            for n, (tf, _, dt) in transformers.items()
        }

    def __getitem__(self, name: str) -> BlockPool:
        return self.pools[name]

    def _blocks(self, name: str, length: int, extra: int = 0) -> int:
        """Blocks a row of `length` bytes holds in one pool while `extra` more positions are being
        written (a windowed Transformer's: only those its window and the new positions span)."""
        tf, per_byte, _ = self.specs[name]
        held = -(-math.ceil(length * per_byte) // self.block_size)
        window = tf.cfg.window if tf.pattern is None else None
        if window is not None:  # slots from (length - window) // bs * bs on (paged.py's _trim)
            held = min(held, -(-(window + extra) // self.block_size) + 2)
        return max(1, held)

    def need(self, length: int) -> dict[str, int]:
        """Blocks of each pool a prefill of `length` ids takes at most (patches: as many as the mean
        patch size gives)."""
        return {n: self._blocks(n, length, self.chunk) for n in self.pools}

    @property
    def limit(self) -> int:
        """The most ids (BOS included) one row's prefill may have: what fits in the whole pools."""
        fits = [self.context]
        for n, p in self.pools.items():
            if self._blocks(n, self.context, self.chunk) > p.blocks:  # a window does not save it
                fits.append(math.floor(p.blocks * self.block_size / self.specs[n][1]))
        return min(fits)

    def check(self, ids: int) -> None:
        """KVBudgetError unless a prompt of `ids` ids (BOS included; the context's last ones are read) fits."""
        if min(ids, self.context) > self.limit:
            raise KVBudgetError(
                f"a prompt of {min(ids, self.context) - 1} bytes does not fit in the KV cache: {self.what} "
                f"{self.mb:g} holds prompts of at most {self.limit - 1} bytes; raise {self.what} or shorten the prompt"
            )

    def rows_at(self, length: int) -> int:
        """Rows of `length` bytes the pools hold at once (a windowed Transformer's rows hold only their window)."""
        return min(p.blocks // self._blocks(n, length) for n, p in self.pools.items())

    def stats(self) -> dict:
        """The pools for /health: block size, blocks total / free / used, per pool and summed."""
        pools = {n: {"blocks": p.blocks, "free": p.free, "used": p.blocks - p.free} for n, p in self.pools.items()}
        total, free = sum(p["blocks"] for p in pools.values()), sum(p["free"] for p in pools.values())
        return {
            "mb": self.mb,
            "block_size": self.block_size,
            "blocks": total,
            "free": free,
            "used": total - free,
            "pools": pools,
        }
