"""Hash n-gram embeddings: for every n-gram size n and hash function f, the n bytes ending at
position t are hashed (rolling polynomial hash, int64 wrap-around, as in HF transformers' BLT)
into one of `buckets` rows of a table; all rows are added to the byte embedding.

One fused table holds every (function, size) table back to back, in the order
for f in functions: for n in sizes, which is the layout HF's `encoder_hash_tok_embedding` uses.

    e = emb(tokens)                   # (B, T) byte ids -> (B, T, D)
    e = emb.step(context, n)          # (B, back - 1 + n) ids ending with n new bytes -> (B, n, D)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PRIMES = [
    1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899,
    9576890767, 3628273133, 2860486313, 5463458053, 3367900313,
]  # fmt: skip


def _int64(x: int) -> int:
    """x wrapped to a signed 64-bit integer, as int64 arithmetic wraps."""
    return (x + 2**63) % 2**64 - 2**63


def hash_powers(primes: list[int], sizes: list[int], width: int) -> list[list[int]]:
    """One row per (prime, size): the multiplier of each of the last `width` bytes, oldest first,
    prime**i for the i-th byte of the n-gram ending at the newest (0 for bytes before it)."""
    return [[0] * (width - n) + [_int64(p**i) for i in range(n)] for p in primes for n in sizes]


def windows(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T) ids -> (B, T, width) the `width` ids ending at each position, zeros before the first."""
    return F.pad(tokens.long(), (width - 1, 0)).unfold(1, width, 1)


def hash_windows(wins: torch.Tensor, powers: torch.Tensor) -> torch.Tensor:
    """(..., width) ids, (tables, width) powers -> (..., tables) each table's hash of the n-gram
    ending at the newest id: sum_i id_i * prime**i, wrapped to int64 (not yet reduced to buckets)."""
    return (wins[..., None, :] * powers).sum(-1)


def ngram_hash(tokens: torch.Tensor, n: int, prime: int, buckets: int) -> torch.Tensor:
    """(B, T) ids -> (B, T) bucket of the n-gram ending at each position (zeros pad the left)."""
    powers = torch.tensor(hash_powers([prime], [n], n), device=tokens.device)  # (1, n)
    return torch.remainder(hash_windows(windows(tokens, n), powers)[..., 0], buckets)


class HashNgramEmbedding(nn.Module):
    def __init__(self, dim: int, ngram_sizes: list[int], buckets: int, functions: int, sparse: bool = False):
        super().__init__()
        self.sizes, self.buckets, self.functions = list(ngram_sizes), buckets, functions
        self.num_tables = functions * len(self.sizes)
        self.width = max(self.sizes)  # bytes an n-gram reaches back, the new one included
        primes = [PRIMES[f % len(PRIMES)] for f in range(functions)]
        self.register_buffer("powers", torch.tensor(hash_powers(primes, self.sizes, self.width)), persistent=False)
        self.register_buffer("offsets", torch.arange(self.num_tables) * buckets, persistent=False)
        # sparse=True: the gradient holds only the rows a batch used (see blt/train/optim.py)
        self.embedding = nn.Embedding(max(1, buckets * self.num_tables), dim, sparse=sparse)

    def rows(self, wins: torch.Tensor) -> torch.Tensor:
        """(..., width) ids -> (..., tables) the fused table's row of each table's n-gram."""
        return torch.remainder(hash_windows(wins, self.powers), self.buckets) + self.offsets

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) sum of every table's row for its n-gram."""
        return self.embedding(self.rows(windows(tokens, self.width))).sum(2)  # (B, T, tables, D) -> (B, T, D)

    def step(self, context: torch.Tensor, n: int) -> torch.Tensor:
        """forward at the last n positions: (B, width - 1 + n) ids ending with them (zeros before a
        row's first byte) -> (B, n, D)."""
        return self.embedding(self.rows(context.long().unfold(1, self.width, 1))).sum(2)
