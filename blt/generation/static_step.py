"""Compiled generation: the one-new-byte step of each cached component at fixed shapes, compiled
with torch.compile (`Generator.load(path, compile=True)`, `blt generate --compile`).

The eager step (steps.py) attends over the cache's filled slots only, so its shapes grow by one
every byte: compiled, that is a new graph per length. Here every shape is fixed by (batch,
capacity, window): a new position is written at slot lens[b] in place; attention reads the whole
capacity under a mask (slots <= lens[b]), or, in a windowed model, each row's last `window` slots,
gathered; RoPE is read at lens[b]. One graph then serves every byte, and inductor fuses each
component's ~100 small ops (norms, RoPE, masks, residuals, SwiGLU) into a few generated kernels
around the matrix products.

    steps = OneByteSteps()                                    # once per Generator: graphs are reused
    h = steps.encode(enc, tokens, history, cache, valid)      # (B, 1) new bytes -> (B, 1, D) byte-level

What stays eager: prompts and other multi-byte feeds, the global model (once per patch, on patches
of varying length), HF-compatible decoders (they redo the previous byte) and sparse attention
patterns. Compiling costs tens of seconds per component on first use (less with inductor's cache
warm from an earlier process); the graphs are kept for the Generator's life.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn as nn

from blt.generation.kv_cache import KVCache
from blt.generation.steps import block_step, step_tables
from blt.model.layers import Transformer

# graphs per step function (one per component and batch size, across every Generator of the
# process); past it, dynamo runs that step eagerly (the same values, uncompiled)
RECOMPILE_LIMIT = 64


class _FixedSlots:
    """Stands in for KVCache.write (steps.attention_step calls it): writes one new position per row
    at slot lens[b] and returns the slots attention reads: every slot, or, under a window, each
    row's last `window` slots (slots (B, W): gathered, so a windowed model reads W, not C)."""

    def __init__(
        self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], lens: torch.Tensor, slots: torch.Tensor | None
    ):
        self.k, self.v, self.lens, self.slots = k, v, lens, slots  # per layer (B, H, C, hd); (B,)
        self.rows = torch.arange(lens.shape[0], device=lens.device)

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


def one_position(
    tf: Transformer,
    x: torch.Tensor,
    k: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    lens: torch.Tensor,
    tables: tuple,
    before=None,
) -> torch.Tensor:
    """transformer_step for one new position per row, at fixed shapes: x (B, 1, D) -> (B, 1, D);
    k, v (per layer (B, H, C, hd)) are written at slot lens[b] (the caller advances lens)."""
    cos_t, sin_t, swap, fused = tables
    C, W = k[0].shape[2], tf.cfg.window
    if W is not None and W < C:  # each row's last W slots (before slot 0: masked)
        wanted = lens[:, None] - W + 1 + torch.arange(W, device=x.device)[None]  # (B, W)
        slots, seen = wanted.clamp(min=0), wanted >= 0
    else:
        slots = None
        seen = torch.arange(C, device=x.device)[None] <= lens[:, None]  # (B, C)
    mask = seen[:, None, None, :]  # (B, 1, 1, W or C)
    at = lens[:, None]  # (B, 1)
    rope = (cos_t[at].transpose(1, 2), sin_t[at].transpose(1, 2), swap)  # (B, 1, 1, hd)
    cache = _FixedSlots(k, v, lens, slots)
    for i, layer in enumerate(tf.layers):
        x = x if before is None else before(i, x)
        x = block_step(layer, x, rope, cache, i, mask, fused[i])
    return x


def _lm_logits(model: nn.Module, tokens, k, v, lens, tables):
    """A byte LM (entropy model or baseline): (B, 1) new bytes -> (B, 1, V) next-byte logits."""
    h = one_position(model.transformer, model.embed_tokens(tokens), k, v, lens, tables)
    return model.lm_head(model.norm(h))


def _encoder_states(enc: nn.Module, tokens, history, k, v, lens, tables):
    """The local encoder: (B, 1) new bytes and (B, n) the bytes ending with them (zeros before the
    first; n = the largest hash n-gram size) -> (B, 1, D) byte-level states."""
    x = enc.embed_tokens(tokens)  # (B, 1, D)
    if enc.hash_embed is not None:
        x = x + enc.hash_embed(history)[:, -1:]
    return one_position(enc.transformer, x, k, v, lens, tables)


def _decoder_logits(dec: nn.Module, cross: list, h, kv: list, k, v, lens, tables, cross_k: int, kernel):
    """The local decoder: (B, 1, D) encoder states and each cross-attention's (keys, values) of the
    byte's source patch (B, cross_k, D) -> (B, V) next-byte logits."""
    x = cross[0].attend(h, *kv[0], kernel, None, cross_k)  # (B, 1, D) byte-level

    def more(i, y):
        return y if i == 0 else cross[i].attend(y, *kv[i], kernel, None, cross_k)

    x = one_position(dec.transformer, x, k, v, lens, tables, more if len(kv) > 1 else None)
    return dec.lm_head(dec.norm(x[:, 0]))


class OneByteSteps:
    """The compiled one-byte steps, shared by every cached state of one Generator. Each call runs
    the component's graph and advances its cache by `valid` (B,): 1 for a row with a new byte, 0 for
    a row without (its slot is written and later overwritten, as in the eager step)."""

    def __init__(self):
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # dynamic=False: a graph per batch size, with every shape fixed (a symbolic batch was
        # slower); no fullgraph=True, so a graph past the recompile limit runs eagerly instead of
        # raising in the middle of a generation (the tests check that there is no graph break)
        self._lm = torch.compile(_lm_logits, dynamic=False)
        self._enc = torch.compile(_encoder_states, dynamic=False)
        self._dec = torch.compile(_decoder_logits, dynamic=False)
        self.calls = Counter()  # compiled steps run so far, per component (Generator.stats["compiled_steps"])

    def byte_lm(self, model: nn.Module, tokens: torch.Tensor, cache: KVCache, valid: torch.Tensor) -> torch.Tensor:
        """(B, 1) new bytes (valid (B,): 1, or 0 for a row without one) -> (B, 1, V) next-byte logits."""
        cache.check_room(1)
        self.calls["byte_lm"] += 1
        out = self._lm(
            model, tokens, cache.k.unbind(0), cache.v.unbind(0), cache.lens, step_tables(model.transformer, cache)
        )
        cache.advance(valid)
        return out

    def encode(
        self, enc: nn.Module, tokens: torch.Tensor, history: torch.Tensor, cache: KVCache, valid: torch.Tensor
    ) -> torch.Tensor:
        """(B, 1) new bytes, (B, n) the last n bytes of each row -> (B, 1, D) encoder states."""
        cache.check_room(1)
        self.calls["encode"] += 1
        out = self._enc(
            enc, tokens, history, cache.k.unbind(0), cache.v.unbind(0), cache.lens, step_tables(enc.transformer, cache)
        )
        cache.advance(valid)
        return out

    def decode(
        self,
        dec: nn.Module,
        cross: list,
        h: torch.Tensor,
        kv: list,
        cache: KVCache,
        valid: torch.Tensor,
        cross_k: int,
        kernel,
    ) -> torch.Tensor:
        """(B, 1, D) encoder states, per cross-attention the source patch's (keys, values) -> (B, V)."""
        cache.check_room(1)
        self.calls["decode"] += 1
        out = self._dec(
            dec,
            cross,
            h,
            kv,
            cache.k.unbind(0),
            cache.v.unbind(0),
            cache.lens,
            step_tables(dec.transformer, cache),
            cross_k,
            kernel,
        )
        cache.advance(valid)
        return out
