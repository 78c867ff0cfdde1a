"""Compiled generation: the one-new-byte step of each cached component at fixed shapes, compiled
with torch.compile (`Generator.load(path, compile=True)`, `blt generate --compile`).

The eager step attends over the cache's filled slots only, so its shapes grow by one every byte:
compiled, that is a new graph per length. Here the model's own `step` runs against `FixedSlots`
(kv_cache.py), which fixes every shape by (batch, capacity, window). One graph then serves every
byte, and inductor fuses each component's ~100 small ops (norms, RoPE, masks, residuals, SwiGLU)
into a few generated kernels around the matrix products.

    steps = OneByteSteps()                                    # once per Generator: graphs are reused
    h = steps.encode(enc, tokens, context, cache, valid)      # (B, 1) new bytes -> (B, 1, D) byte-level

What stays eager: prompts and other multi-byte feeds, the global model (once per patch, on patches
of varying length), HF-compatible decoders (they redo the previous byte) and sparse attention
patterns. Compiling costs tens of seconds per component on first use (less with inductor's cache
warm from an earlier process); the graphs are kept for the Generator's life.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn

from blt.generation.kv_cache import FixedSlots, KVCache

# graphs per step function (one per component and batch size, across every Generator of the
# process); past it, dynamo runs that step eagerly (the same values, uncompiled)
RECOMPILE_LIMIT = 64


def _lm_logits(model: nn.Module, tokens, k, v, lens, tables):
    """A byte LM (entropy model or baseline): (B, 1) new bytes -> (B, 1, V) next-byte logits."""
    return model.step(tokens, FixedSlots(k, v, lens, tables))


def _encoder_states(enc: nn.Module, tokens, context, k, v, lens, tables):
    """The local encoder: (B, 1) new bytes, (B, reach + 1) the ids ending with them -> (B, 1, D)."""
    return enc.step(tokens, context, FixedSlots(k, v, lens, tables))


def _decoder_logits(dec: nn.Module, h, kv: list, kernel, k, v, lens, tables):
    """The local decoder: (B, 1, D) encoder states and each cross-attention's (keys, values) of the
    byte's source patch (B, cross_k, D) -> (B, V) next-byte logits."""
    return dec.logits(dec.step(h, kv, kernel, None, FixedSlots(k, v, lens, tables))[:, 0])


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

    def _run(self, name: str, fn, tf: nn.Module, cache: KVCache, valid: torch.Tensor, *args):
        cache.check_room(1)
        self.calls[name] += 1
        out = fn(*args, cache.k.unbind(0), cache.v.unbind(0), cache.lens, tf.tables_of(cache))
        cache.advance(valid)
        return out

    def byte_lm(self, model: nn.Module, tokens: torch.Tensor, cache: KVCache, valid: torch.Tensor) -> torch.Tensor:
        """(B, 1) new bytes (valid (B,): 1, or 0 for a row without one) -> (B, 1, V) next-byte logits."""
        return self._run("byte_lm", self._lm, model.transformer, cache, valid, model, tokens)

    def encode(
        self, enc: nn.Module, tokens: torch.Tensor, context: torch.Tensor, cache: KVCache, valid: torch.Tensor
    ) -> torch.Tensor:
        """(B, 1) new bytes, (B, reach + 1) the ids ending with them -> (B, 1, D) encoder states."""
        return self._run("encode", self._enc, enc.transformer, cache, valid, enc, tokens, context)

    def decode(
        self, dec: nn.Module, h: torch.Tensor, kv: list, cache: KVCache, valid: torch.Tensor, kernel
    ) -> torch.Tensor:
        """(B, 1, D) encoder states, per cross-attention the source patch's (keys, values) -> (B, V)."""
        return self._run("decode", self._dec, dec.transformer, cache, valid, dec, h, kv, kernel)
