"""Hash n-gram embeddings: for every n-gram size n and hash function f, the n bytes ending at
position t are hashed (rolling polynomial hash, int64 wrap-around, as in HF transformers' BLT)
into one of `buckets` rows of a table; all rows are added to the byte embedding.

One fused table holds every (function, size) table back to back, in the order
for f in functions: for n in sizes, which is the layout HF's `encoder_hash_tok_embedding` uses.
"""

from __future__ import annotations

import torch
import torch.nn as nn

PRIMES = [
    1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899,
    9576890767, 3628273133, 2860486313, 5463458053, 3367900313,
]  # fmt: skip


def ngram_hash(tokens: torch.Tensor, n: int, prime: int, buckets: int) -> torch.Tensor:
    """(B, T) ids -> (B, T) bucket of the n-gram ending at each position (zeros pad the left):
    sum_i tokens[t - n + 1 + i] * prime**i, wrapped to int64, then mod buckets (non-negative)."""
    B, T = tokens.shape
    padded = torch.cat([tokens.new_zeros(B, n - 1), tokens], dim=1).long()  # (B, T + n - 1)
    h = torch.zeros(B, T, dtype=torch.long, device=tokens.device)
    power = torch.ones((), dtype=torch.long, device=tokens.device)
    p = torch.tensor(prime, dtype=torch.long, device=tokens.device)
    for i in range(n):
        h = h + padded[:, i : i + T] * power  # int64 arithmetic wraps like the reference
        power = power * p
    return torch.remainder(h, buckets)


class HashNgramEmbedding(nn.Module):
    def __init__(self, dim: int, ngram_sizes: list[int], buckets: int, functions: int, sparse: bool = False):
        super().__init__()
        self.sizes, self.buckets, self.functions = list(ngram_sizes), buckets, functions
        self.num_tables = functions * len(self.sizes)
        # sparse=True: the gradient holds only the rows a batch used (see blt/train/optim.py)
        self.embedding = nn.Embedding(max(1, buckets * self.num_tables), dim, sparse=sparse)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) sum of every table's row for its n-gram."""
        ids = []
        for f in range(self.functions):
            for n in self.sizes:
                ids.append(ngram_hash(tokens, n, PRIMES[f % len(PRIMES)], self.buckets) + len(ids) * self.buckets)
        return self.embedding(torch.stack(ids, dim=-1)).sum(2)  # (B, T, tables, D) -> (B, T, D)
