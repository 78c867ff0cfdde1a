"""What steps with the bytes of rows being generated: the entropy model (if any), every row's
patch-start rule (blt/patching/streaming.py) and the incremental BLT or byte LM (incremental.py).
Rows can be dropped or reordered (`take`) and another state's rows added (`append`), so a batch
can change between steps (engine.py).

    state = CachedState(model, patcher, batch=2, capacity=1024)
    logits = state.feed([[BOS, 72, 105], [BOS]])   # new byte ids per row -> (B, V) next-byte logits

With `pools` (paged.py's KVPools over `cached_transformers`), every KV cache is paged on its pool.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from blt.generation.incremental import IncrementalBLT, IncrementalByteLM
from blt.generation.paged import PagedKVCache
from blt.generation.static_step import OneByteSteps
from blt.model.flops import assumed_patch_size
from blt.patching import Patcher, StreamingStarts, entropy


def cached_transformers(model, patcher: Patcher) -> dict:
    """Every Transformer generation caches keys and values for: name -> (Transformer, positions per
    byte, dtype); positions per byte is 1 / the mean patch size the patching mode assumes for the
    global model (its positions are patches), 1 for the others."""
    dtype = next(model.parameters()).dtype
    if not hasattr(model, "local_encoder"):
        return {"lm": (model.transformer, 1.0, dtype)}
    out = {}
    if patcher.model is not None:
        out["entropy_model"] = (patcher.model.transformer, 1.0, next(patcher.model.parameters()).dtype)
    per_patch = 1.0 / assumed_patch_size(model.cfg, patcher.cfg)
    out["encoder"] = (model.local_encoder.transformer, 1.0, dtype)
    out["global"] = (model.global_transformer.transformer, per_patch, dtype)
    out["decoder"] = (model.local_decoder.transformer, 1.0, dtype)
    return out


class CachedState:
    """Everything that steps with the bytes: the entropy model, the patch-start rule of every row
    and the incremental BLT (or byte LM). Rows can be dropped or reordered (`take`) and another
    state's rows added (`append`), so a server's batch can change between steps."""

    def __init__(
        self, model, patcher: Patcher, batch: int, capacity: int, steps: OneByteSteps | None = None, pools=None
    ):
        """pools: paged.KVPools over `cached_transformers(model, patcher)`; None: contiguous caches."""
        self.is_blt = hasattr(model, "local_encoder")
        if self.is_blt:
            self.net = IncrementalBLT(model, batch, capacity, steps, pools)
        else:
            self.net = IncrementalByteLM(model, batch, capacity, steps, pools and pools["lm"])
        self.elm = (
            IncrementalByteLM(patcher.model, batch, capacity, steps, pools and pools["entropy_model"])
            if self.is_blt and patcher.model is not None
            else None
        )
        self.starts = [StreamingStarts(patcher.cfg, patcher.threshold) for _ in range(batch)]
        self.next_entropy = [math.inf] * batch  # entropy of each row's next byte
        self.device = next(model.parameters()).device

    def feed(self, rows: Sequence[Sequence[int]], every: bool = False) -> torch.Tensor:
        """New byte ids per row (possibly none) -> (B, V) next-byte logits of every row's last
        byte; every=True: (B, n, V) at each of the n = max(len(r)) new bytes (row b's first
        len(rows[b]) are real; not for HF-compatible BLT models)."""
        B, n = len(rows), max(1, max(len(r) for r in rows))
        tokens = torch.zeros(B, n, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        valid = torch.tensor([len(r) for r in rows], dtype=torch.long)
        tokens, valid = tokens.to(self.device), valid.to(self.device)
        if not self.is_blt:
            logits = self.net.feed(tokens, valid)  # (B, n, V)
            return logits if every else logits[torch.arange(B), (valid - 1).clamp(min=0)]
        # entropy of predicting the byte after each new byte (B, n), from the entropy model if any
        ent = entropy(self.elm.feed(tokens, valid)).cpu() if self.elm is not None else None
        return self.net.feed(tokens, lambda probs: self._decide(rows, n, probs, ent), valid, every)

    def prefill(self, rows: Sequence[Sequence[int]], chunk: int) -> torch.Tensor:
        """`feed`, `chunk` bytes of every row at a time (so a windowed Transformer's paged cache holds
        about window + chunk positions of a row at once, not its whole prompt) -> (B, V) next-byte
        logits of every row's last byte (rows have at least one)."""
        n = max(len(r) for r in rows)
        if n <= chunk:
            return self.feed(rows)
        out = None
        for at in range(0, n, chunk):
            logits = self.feed([r[at : at + chunk] for r in rows])  # (B, V)
            out = torch.empty_like(logits) if out is None else out
            ends = [b for b, r in enumerate(rows) if at < len(r) <= at + chunk]  # rows whose last byte was fed
            out[ends] = logits[ends]
        return out

    def _decide(self, rows: Sequence[Sequence[int]], n: int, probs: torch.Tensor | None, ent) -> torch.Tensor:
        """(B, n) starts of the new bytes, each row's rule fed every byte's signal: the router's
        probability for it (`probs`, a model with a router), else the entropy of predicting it."""
        p = probs.cpu() if probs is not None else None
        starts = torch.zeros(len(rows), n, dtype=torch.bool)
        for b, r in enumerate(rows):
            for i, tok in enumerate(r):
                if p is not None:
                    signal = float(p[b, i])
                elif ent is not None:
                    signal = self.next_entropy[b] if i == 0 else float(ent[b, i - 1])
                else:
                    signal = None
                starts[b, i] = self.starts[b].push(int(tok), signal)
            if r and ent is not None:
                self.next_entropy[b] = float(ent[b, len(r) - 1])
        return starts.to(self.device)

    @property
    def lens(self) -> torch.Tensor:
        """(B,) bytes fed to each row so far."""
        return self.net.lens

    def take(self, rows: Sequence[int]) -> None:
        """Keep these rows, in this order (a row named twice is copied)."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.net.take(idx)
        if self.elm is not None:
            self.elm.take(idx)
        seen: set[int] = set()
        starts = []
        for i in rows:
            starts.append(copy.deepcopy(self.starts[i]) if i in seen else self.starts[i])
            seen.add(i)
        self.starts, self.next_entropy = starts, [self.next_entropy[i] for i in rows]

    def append(self, other: CachedState) -> None:
        """Add the rows of `other` (same model, patcher and capacity) after these."""
        self.net.append(other.net)
        if self.elm is not None:
            self.elm.append(other.elm)
        self.starts += other.starts
        self.next_entropy += other.next_entropy

    @property
    def caches(self) -> list:
        return self.net.caches + (self.elm.caches if self.elm is not None else [])

    def room(self, n: int = 1) -> bool:
        """Whether every paged cache's pool has the blocks for n more positions of every row (the
        global model's too: a byte may complete a patch)."""
        return all(c.blocks_for(n) <= c.pool.free for c in self.caches if isinstance(c, PagedKVCache))

    def release(self) -> None:
        """Give every paged cache's blocks back to its pool (the state is let go)."""
        for c in self.caches:
            if isinstance(c, PagedKVCache):
                c.release()

    def counts(self) -> tuple[int, int]:
        """(global Transformer calls, patches they processed) so far."""
        return (self.net.global_calls, self.net.global_patches) if self.is_blt else (0, 0)
