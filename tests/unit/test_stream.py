"""The training stream over prepared sources (blt/data/stream.py), in process: mixture proportions that
follow the weights, an exact resume in the middle of a mixture, the same stream whatever the number
of ranks, prefetching that reads the same stream, and validation ids read lazily across shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blt.data import DataError, Source, StreamLoader


def loader(three, batch_size=8, rank=0, world_size=1, weights=(0.5, 0.3, 0.2), seed=0, prefetch=2):
    sources = [Source(name, w, p) for name, w, p in zip("abc", weights, three)]
    return StreamLoader(sources, 64, batch_size, seed, rank, world_size, prefetch=prefetch)


def test_mixture_proportions_follow_the_weights(three):
    ld = loader(three)
    counts = np.zeros(3)
    for _ in range(250):  # 2000 windows: the smallest source is repeated over several epochs
        batch = next(ld)
        counts += np.bincount(batch.sources, minlength=3)
        assert batch.tokens.shape == (8, 65) and batch.tokens.dtype == torch.int64
    assert np.abs(counts / counts.sum() - [0.5, 0.3, 0.2]).max() < 0.02
    smallest = ld.windows[2].count
    assert counts[2] > 2 * smallest  # several epochs of source c


def test_resume_in_the_middle_of_a_mixture_is_exact(three):
    ld = loader(three)
    for _ in range(37):
        next(ld)
    state = json.loads(json.dumps(ld.state_dict()))  # what a checkpoint stores
    after = [next(ld) for _ in range(20)]
    resumed = loader(three)
    resumed.load_state_dict(state)
    again = [next(resumed) for _ in range(20)]
    for a, b in zip(after, again):
        assert torch.equal(a.tokens, b.tokens) and (a.windows == b.windows).all()
    ld.record([3, 2, 1])
    resumed.load_state_dict(ld.state_dict())
    assert resumed.bytes_seen() == {"a": 3 * 64, "b": 2 * 64, "c": 64}
    with pytest.raises(DataError, match="resume with the same data"):
        loader(three, weights=(0.2, 0.3, 0.5)).load_state_dict(state)


def test_the_stream_does_not_depend_on_the_number_of_ranks(three):
    """2 ranks -> 1 and 1 -> 2 at the data level: the ranks' rows of each global batch, in rank
    order, are the rows one process reads; a position saved on one layout continues on the other."""
    single = loader(three, batch_size=8)
    reference = [next(single).tokens for _ in range(12)]
    pair = [loader(three, batch_size=4, rank=r, world_size=2) for r in range(2)]
    for step in range(6):
        assert torch.equal(torch.cat([next(ld).tokens for ld in pair]), reference[step])
    state = pair[0].state_dict()
    one = loader(three, batch_size=8)
    one.load_state_dict(state)  # 2 -> 1
    for step in range(6, 9):
        assert torch.equal(next(one).tokens, reference[step])
    pair = [loader(three, batch_size=4, rank=r, world_size=2) for r in range(2)]
    for ld in pair:
        ld.load_state_dict(one.state_dict())  # 1 -> 2
    for step in range(9, 12):
        assert torch.equal(torch.cat([next(ld).tokens for ld in pair]), reference[step])


def test_prefetch_reads_the_same_stream(three):
    a, b = loader(three, prefetch=0), loader(three, prefetch=4)
    for _ in range(10):
        assert torch.equal(next(a).tokens, next(b).tokens)


def test_validation_ids_read_lazily_across_shards(three):
    data = three[0]
    full = np.concatenate([np.asarray(data.tokens(k, "val")) for k in range(len(data.shards))])
    ids = data.split_tokens("val")
    assert len(data.shards) >= 3 and len(ids) == len(full)
    rng = np.random.default_rng(0)
    for a, b in rng.integers(0, len(full) + 5, (100, 2)):
        assert np.array_equal(ids[a:b], full[a:b])
    rest = ids[1000:]  # an open slice is a view, not a copy
    assert len(rest) == len(full) - 1000 and np.array_equal(rest[5:900], full[1005:1900])
    assert np.array_equal(data.split_tokens("val", 700)[0 : 10**9], full[:700])
