"""Incremental (KV-cached) forward passes of BLT and the byte LM, for generation.

The caller feeds bytes as they arrive, with their patch starts (decided on the fly, see
blt/patching/streaming.py `StreamingStarts`); every component keeps its own KV cache:
- the local encoder and decoder run on the new bytes only;
- when a patch is complete (the next one has started) it is pooled from the cached encoder states
  and the global Transformer runs once for it, extending its patch-level cache;
- the decoder reads each byte's source patch from the cached global states.
A model that cuts its own patches (a router: learned patching) decides the starts from the
encoder's states: `starts` is then a function of the router's probabilities for the new bytes,
and each completed patch's global state is smoothed with the one before, as its forward does (the
model's `route_step`, `confidence_step` and `smooth_step`).
Each feed returns the next-byte logits, equal (up to float rounding) to the full forward on the
whole sequence at the last byte.

    inc = IncrementalBLT(model, batch=2, capacity=1024)
    logits = inc.feed(tokens, starts, valid)   # (B, n) new bytes, (B, n) starts, (B,) how many -> (B, V)
    logits = inc.feed(tokens, decide, valid)   # decide((B, n) router probabilities or None) -> (B, n) starts

With `pools` (paged.py: a BlockPool per component, "encoder", "decoder", "global"; the byte LM's
one pool) the KV caches are paged: rows take blocks as they grow and give them back as they leave.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from blt.generation.kv_cache import CacheFullError, KVCache
from blt.generation.paged import BlockPool, PagedKVCache
from blt.generation.static_step import OneByteSteps
from blt.model.attention import one_patch_attention, patch_state_attention, source_patches_at


def _arange_rows(start: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) starts -> (B, n) start + 0..n-1."""
    return start[:, None] + torch.arange(n, device=start.device)[None]


def _steps_for(tf, steps: OneByteSteps | None) -> OneByteSteps | None:
    """`steps` where this Transformer's one-byte step can run compiled (no sparse pattern), else None."""
    return steps if steps is not None and tf.pattern is None else None


def _new_cache(tf, batch: int, capacity: int, pool: BlockPool | None, device, dtype) -> KVCache:
    """A paged cache on `pool`, or a contiguous one of `capacity` positions per row."""
    return (
        PagedKVCache(pool, batch, capacity)
        if pool is not None
        else KVCache.for_transformer(tf, batch, capacity, device, dtype)
    )


def _check_paged(steps: OneByteSteps | None, pools) -> None:
    if steps is not None and pools is not None:
        raise ValueError("the compiled one-byte steps run contiguous KV caches, not paged ones")


class IncrementalByteLM:
    """The byte LM (entropy model or baseline) one chunk of bytes at a time; `steps`: the compiled
    one-byte steps (static_step.py), used for one new byte per row."""

    def __init__(self, model, batch: int, capacity: int, steps: OneByteSteps | None = None, pool=None):
        _check_paged(steps, pool)
        p = next(model.parameters())
        self.model = model
        self.cache = _new_cache(model.transformer, batch, capacity, pool, p.device, p.dtype)
        self.steps = _steps_for(model.transformer, steps)

    @property
    def lens(self) -> torch.Tensor:
        return self.cache.lens

    def take(self, rows: torch.Tensor) -> None:
        """Keep these rows, in this order (see KVCache.take)."""
        self.cache.take(rows)

    def append(self, other: IncrementalByteLM) -> None:
        """Add the rows of `other` (the same model and capacity) after these."""
        self.cache.append(other.cache)

    @property
    def caches(self) -> list[KVCache]:
        return [self.cache]

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, n) new byte ids, (B,) valid counts -> (B, n, V) next-byte logits at each new byte."""
        m = self.model
        if self.steps is not None and tokens.shape[1] == 1:
            return self.steps.byte_lm(m, tokens, self.cache, valid)
        return m.step(tokens, self.cache, valid)


class IncrementalBLT:
    """BLT one chunk of bytes at a time; see the module docstring."""

    def __init__(self, model, batch: int, capacity: int, steps: OneByteSteps | None = None, pools=None):
        _check_paged(steps, pools)
        p = next(model.parameters())
        dev, dt, cfg = p.device, p.dtype, model.cfg
        self.model, self.capacity = model, capacity
        enc, dec = model.local_encoder, model.local_decoder
        # the compiled one-byte steps (static_step.py), per component that can use them
        self.enc_steps, self.dec_steps = _steps_for(enc.transformer, steps), _steps_for(dec.transformer, steps)
        self.k, self.hf, D = cfg.cross_attn_k, cfg.hf_compat, cfg.encoder.dim
        pool = (lambda name: None) if pools is None else pools.__getitem__
        self.enc_cache = _new_cache(enc.transformer, batch, capacity, pool("encoder"), dev, dt)
        self.dec_cache = _new_cache(dec.transformer, batch, capacity, pool("decoder"), dev, dt)
        glob = model.global_transformer.transformer
        self.glob_cache = _new_cache(glob, batch, capacity, pool("global"), dev, dt)  # patch-level
        self.tokens = torch.zeros(batch, capacity, dtype=torch.long, device=dev)  # (B, C) bytes so far
        self.patch_ids = torch.zeros(batch, capacity, dtype=torch.long, device=dev)  # (B, C) patch of each byte
        self.h = torch.zeros(batch, capacity, D, device=dev, dtype=dt)  # (B, C, D) encoder states, byte-level
        self.patch_start = torch.zeros(batch, capacity, dtype=torch.long, device=dev)  # (B, C) first byte of patch p
        # every decoder cross-attention's keys and values of every patch, computed once per patch
        self.dec_k = [
            torch.zeros(batch, capacity, self.k, cfg.decoder.dim, device=dev, dtype=dt) for _ in dec.cross_attns
        ]  # patch-level
        self.dec_v = [torch.zeros_like(t) for t in self.dec_k]
        self.lens = torch.zeros(batch, dtype=torch.long, device=dev)  # bytes fed per row
        self.done = torch.zeros(batch, dtype=torch.long, device=dev)  # patches with a global state per row
        self.cur_pid = torch.full((batch,), -1, dtype=torch.long, device=dev)  # patch of each row's last byte
        self.routed = False  # the model cuts its own patches (it has a router)
        self.global_calls = 0  # global Transformer steps (one per batch of newly completed patches)
        self.global_patches = 0  # patches the global Transformer processed
        self.patch_conf = torch.ones(batch, capacity, device=dev)  # (B, C) router confidence of patch p's start
        self.smoothed = torch.zeros(batch, cfg.global_model.dim, device=dev, dtype=dt)  # (B, Dg)

    @property
    def caches(self) -> list[KVCache]:
        return [self.enc_cache, self.dec_cache, self.glob_cache]

    _ROWS = ("tokens", "patch_ids", "h", "patch_start", "lens", "done", "cur_pid", "patch_conf", "smoothed")

    def take(self, rows: torch.Tensor) -> None:
        """Keep these rows (a (B',) index: any order, repeats allowed), in this order."""
        for cache in (self.enc_cache, self.dec_cache, self.glob_cache):
            cache.take(rows)
        for name in self._ROWS:
            setattr(self, name, getattr(self, name)[rows])
        self.dec_k, self.dec_v = [t[rows] for t in self.dec_k], [t[rows] for t in self.dec_v]

    def append(self, other: IncrementalBLT) -> None:
        """Add the rows of `other` (the same model and capacity) after these; counters add up."""
        for mine, theirs in (
            (self.enc_cache, other.enc_cache),
            (self.dec_cache, other.dec_cache),
            (self.glob_cache, other.glob_cache),
        ):
            mine.append(theirs)
        for name in self._ROWS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.dec_k = [torch.cat(pair) for pair in zip(self.dec_k, other.dec_k)]
        self.dec_v = [torch.cat(pair) for pair in zip(self.dec_v, other.dec_v)]
        self.global_calls += other.global_calls
        self.global_patches += other.global_patches

    @torch.no_grad()
    def feed(
        self, tokens: torch.Tensor, starts: torch.Tensor | Callable, valid: torch.Tensor, every: bool = False
    ) -> torch.Tensor:
        """tokens, starts (B, n): new bytes and whether each begins a patch (learned patching: a
        function of the router's (B, n) probabilities that returns them); valid (B,): how many of
        each row's n are real. Returns (B, V) logits for the byte after each row's last real byte;
        every=True: (B, n, V), the next-byte logits at every new byte (not for HF-compatible
        models, whose last byte's logits wait for the byte after it)."""
        if every and self.hf:
            raise ValueError("feed(every=True) needs a model that is not HF-compatible")
        B, n = tokens.shape
        if int((self.lens + n).max()) > self.capacity:
            raise CacheFullError(f"IncrementalBLT holds {self.capacity} bytes: start a new one on a shorter context")
        slots = _arange_rows(self.lens, n)  # (B, n) where the new bytes go
        real = torch.arange(n, device=tokens.device)[None] < valid[:, None]  # (B, n)
        self.tokens.scatter_(1, slots, tokens)
        h = self._encode(tokens, slots, valid)  # (B, n, D): the encoder reads bytes only
        probs = self._route(h, slots)  # (B, n) the router's probabilities, None without a router
        self.routed = probs is not None  # completed patches' global states are smoothed
        if callable(starts):
            starts = starts(probs)
        conf = None if probs is None else self.model.confidence_step(probs, starts)  # (B, n); slot 0 has p = 1
        pids = self.cur_pid[:, None] + (starts & real).long().cumsum(1)  # (B, n)
        self.cur_pid = pids[:, -1] if n == 1 else pids.gather(1, (valid - 1).clamp(min=0)[:, None])[:, 0]
        self.patch_ids.scatter_(1, slots, pids)
        rows, cols = (starts & real).nonzero(as_tuple=True)
        self.patch_start[rows, pids[rows, cols]] = slots[rows, cols]
        if conf is not None:
            self.patch_conf[rows, pids[rows, cols]] = conf[rows, cols]
        new_lens = self.lens + valid
        self._complete_patches(new_lens)
        one = not self.hf and n == 1 and int(self.cur_pid.min()) > 0
        if one and (self.dec_steps is not None or bool(valid.all())):
            logits = self._decode_one(h, valid)  # the common generation step: one byte per row, after patch 0
            logits = logits[:, None] if every else logits
        else:
            logits = self._decode(new_lens, valid, every)
        self.lens = new_lens
        return logits

    def _encode(self, tokens: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, n) new bytes (already in self.tokens at `slots`) -> (B, n, D) their encoder states."""
        enc = self.model.local_encoder
        n = tokens.shape[1]
        pos = _arange_rows(self.lens - enc.reach, enc.reach + n)  # (B, reach + n) the n-grams' bytes, new ones last
        context = torch.where(pos >= 0, self.tokens.gather(1, pos.clamp(min=0)), 0)  # (B, reach + n) byte ids
        if self.enc_steps is not None and n == 1:
            h = self.enc_steps.encode(enc, tokens, context, self.enc_cache, valid)  # (B, 1, D)
        else:
            h = enc.step(tokens, context, self.enc_cache, valid)  # (B, n, D)
        self.h.scatter_(1, slots[..., None].expand_as(h), h)
        return h

    def _route(self, h: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
        """(B, n, D) new byte states at `slots` (B, n) -> (B, n) the router's probabilities (1 at
        slot 0; None without a router), each against the state of the byte before (in self.h)."""
        before = self.h.gather(1, (slots - 1).clamp(min=0)[..., None].expand_as(h))  # (B, n, D)
        return self.model.route_step(h, before, slots == 0)

    def _smooth(self, g: torch.Tensor, todo: torch.Tensor) -> torch.Tensor:
        """The new patches' global states g (B, m, Dg) smoothed in order, each with the one before,
        as the model's forward does (a model with a router: learned patching)."""
        out = g.clone()
        for j in range(g.shape[1]):
            pid = (self.done + j).clamp(max=self.capacity - 1)  # (B,) patch j of this call
            P = self.patch_conf.gather(1, pid[:, None])[:, 0]
            s = self.model.smooth_step(g[:, j], P, self.smoothed)  # (B, Dg)
            self.smoothed = torch.where((todo > j)[:, None], s, self.smoothed)
            out[:, j] = s
        return out

    def _complete_patches(self, new_lens: torch.Tensor) -> None:
        """Pool every patch that is now complete and run the global Transformer once on them."""
        last_pid = self.cur_pid  # (B,), -1 for an empty row
        target = last_pid.clamp(min=0)  # patches < the last byte's patch are complete
        if self.hf:  # split_first_byte: patch 0 is byte 0 alone, complete as soon as it exists
            target = torch.where(new_lens > 0, target.clamp(min=1), target)
        todo = (target - self.done).clamp(min=0)  # (B,) new complete patches per row
        if int(todo.sum()) == 0:
            return
        enc, glob, dec = self.model.local_encoder, self.model.global_transformer, self.model.local_decoder
        rows, pids, lo, hi = [], [], [], []
        done, tgt, last, lens = self.done.tolist(), target.tolist(), last_pid.tolist(), new_lens.tolist()
        for b in range(len(done)):
            if tgt[b] <= done[b]:
                continue
            first = self.patch_start[b, done[b] : tgt[b] + 1].tolist()  # starts of patches done..target
            for j, p in enumerate(range(done[b], tgt[b])):
                rows.append(b), pids.append(p), lo.append(first[j])
                hi.append(first[j + 1] if p + 1 <= last[b] else lens[b])  # patch p ends where p + 1 starts
        L = max(h - lo_ for lo_, h in zip(lo, hi))
        lo_t = torch.tensor(lo, device=self.h.device)
        idx = _arange_rows(lo_t, L).clamp(max=self.capacity - 1)  # (N, L) byte slots of each patch
        mask = torch.arange(L, device=idx.device)[None] < (torch.tensor(hi, device=idx.device) - lo_t)[:, None]
        rows_t = torch.tensor(rows, device=idx.device)
        summaries = enc.pool_step(self.h[rows_t[:, None], idx], mask)  # (N, k*D) from the patches' bytes
        # pack per row (B, m, k*D) and step the global model: one call for every new patch
        m = int(todo.max())
        order = torch.tensor([p - done[b] for b, p in zip(rows, pids)], device=idx.device)
        packed = summaries.new_zeros(len(todo), m, summaries.shape[-1])
        packed[rows_t, order] = summaries
        g = glob.step(packed, self.glob_cache, todo)  # (B, m, Dg)
        if self.routed:
            g = self._smooth(g, todo)
        pids_t = torch.tensor(pids, device=idx.device)
        for (keys, values), (k_new, v_new) in zip(zip(self.dec_k, self.dec_v), dec.patch_context(g[rows_t, order])):
            keys[rows_t, pids_t], values[rows_t, pids_t] = k_new, v_new  # (N, k, D) each
        self.done = self.done + todo
        self.global_calls += 1
        self.global_patches += len(rows)

    def _decode_one(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """_decode for one new byte per row, each reading the patch before its own (all exist);
        eager only when every row has a byte (valid all 1), compiled also with rows that have none."""
        dec, B = self.model.local_decoder, h.shape[0]
        at = (torch.arange(B, device=h.device), self.cur_pid - 1)
        kv = [(keys[at], values[at]) for keys, values in zip(self.dec_k, self.dec_v)]  # (B, k, D) each
        if self.dec_steps is not None:
            return self.dec_steps.decode(dec, h, kv, self.dec_cache, valid, one_patch_attention)
        return dec.logits(dec.step(h, kv, one_patch_attention, None, self.dec_cache)[:, 0])  # (B, V)

    def _decode(self, new_lens: torch.Tensor, valid: torch.Tensor, every: bool = False) -> torch.Tensor:
        dec = self.model.local_decoder
        first = self.lens.clone()
        if self.hf:  # HF: a byte reads the patch its next byte closes, so the previous byte is redone
            redo = (self.lens > 0) & (valid > 0)
            self.dec_cache.rewind(redo.long())
            first = first - redo.long()
        count = new_lens - first  # (B,) bytes through the decoder
        n2 = int(count.max())
        slots = _arange_rows(first, n2).clamp(max=self.capacity - 1)  # (B, n2)
        h = self.h.gather(1, slots[..., None].expand(-1, -1, self.h.shape[-1]))  # (B, n2, D)
        src = source_patches_at(self.patch_ids, slots, new_lens, self.hf)  # (B, n2) the patch each byte reads
        B = h.shape[0]
        at = (torch.arange(B, device=h.device)[:, None], src.clamp(min=0))  # each byte's source patch
        kv = [(keys[at].flatten(1, 2), values[at].flatten(1, 2)) for keys, values in zip(self.dec_k, self.dec_v)]
        local = torch.arange(n2, device=h.device).expand(B, n2)  # byte i reads its own gathered (B, n2*k, D)
        x = dec.step(h, kv, partial(patch_state_attention, valid=src >= 0), local, self.dec_cache, count)  # (B, n2, D)
        if every:  # not HF: the n2 decoded bytes are the new ones (padding past valid[b])
            return dec.logits(x)  # (B, n2, V) byte-level
        return dec.logits(x[torch.arange(B, device=h.device), (count - 1).clamp(min=0)])  # (B, V)
