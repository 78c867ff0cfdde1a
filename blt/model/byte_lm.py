"""A plain byte-level Transformer LM: the baseline BLT is compared with, and the entropy model
that decides BLT's patch boundaries.

    lm = ByteLM(cfg.model)
    logits = lm(tokens)   # (B, T) byte ids -> (B, T, 260) next-byte logits
"""

from __future__ import annotations

import torch
import torch.nn as nn

from blt.config import ModelConfig
from blt.model.blt import init_weights
from blt.model.layers import RMSNorm, Transformer
from blt.tokens import VOCAB_SIZE


class ByteLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.lm.dim
        self.embed_tokens = nn.Embedding(VOCAB_SIZE, D)
        self.transformer = Transformer(cfg.lm, cfg.norm_eps, cfg.rope_theta, cfg.dropout)
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.lm_head = nn.Linear(D, VOCAB_SIZE, bias=False)
        init_weights(self, cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, patch_ids: torch.Tensor | None = None, routing: bool = False):
        """tokens (B, T) -> logits (B, T, V); patch_ids is accepted and ignored, routing=True gives
        (logits, None) (the same call as BLT)."""
        logits = self.lm_head(self.norm(self.transformer(self.embed_tokens(tokens))))
        return (logits, None) if routing else logits

    def step(self, tokens: torch.Tensor, cache, valid: torch.Tensor | None = None) -> torch.Tensor:
        """forward for n new bytes per row (B, n) against a KV cache -> (B, n, V) next-byte logits."""
        return self.lm_head(self.norm(self.transformer.step(self.embed_tokens(tokens), cache, valid)))
