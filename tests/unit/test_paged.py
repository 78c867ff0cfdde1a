"""The paged KV cache (blt/generation/paged.py) against the contiguous one: the same step outputs for
ragged rows that are dropped, copied, joined and rewound; the same bytes from the generation loop
for rows that join and leave mid-way, waiting and preempted under a tight budget; blocks back in the
pool once rows finish; budgets too small refused in one line."""

from __future__ import annotations

import pytest
import torch

from blt.config import config_from_dict
from blt.generation import Generator
from blt.generation.engine import Engine, Params, Row
from blt.generation.kv_cache import KVCache
from blt.generation.paged import BlockPool, KVBudgetError, PagedKVCache
from blt.model import build_model
from blt.patching import Patcher
from blt.tokens import BOS_ID, OFFSET
from blt.typed import OptionError

from random_models import BLT, random_blt

PROMPTS = [b"The cat sat on the mat", b"h\xc3", b"", b"d" * 40, b"KING. What"]


def byte_lm(window=8, sparse=None):
    torch.manual_seed(0)
    lm = {"dim": 32, "layers": 2, "heads": 4, "kv_heads": 2, "window": window}
    if sparse is not None:
        lm["sparse"] = sparse
    cfg = config_from_dict({"model": {"arch": "byte_lm", "lm": lm, "init_std": 0.3}})
    return build_model(cfg.model).eval(), Patcher(cfg.patching)


def sparse_blt():
    sparse = {"pattern": "local", "block": 4, "window": 6}
    cfg = config_from_dict(
        {
            "model": {**BLT, "global_model": {**BLT["global_model"], "sparse": sparse}},
            "patching": {"mode": "static", "patch_size": 3},
        }
    )
    return build_model(cfg.model).eval(), Patcher(cfg.patching)


MODELS = {
    "static": lambda: random_blt("static"),
    "entropy-gqa": lambda: random_blt("entropy", kv_heads=2),  # 4 heads share 2 key/value heads
    "static-hf": lambda: random_blt("static", hf=True),  # its decoder redoes the last byte (a rewind)
    "learned-alibi": lambda: random_blt("learned", position="alibi"),  # ALiBi reads each slot's position
    "sparse-global": sparse_blt,
    "byte_lm": byte_lm,
}


def arrivals(sampled: bool) -> dict[int, list[Row]]:
    """Rows that join at steps 0, 3 and 9 with their own ends (lengths, a stop string, seeds)."""
    opts = dict(temperature=0.9, top_p=0.95) if sampled else dict(temperature=0.0)

    def row(i: int, max_bytes: int, stop=()) -> Row:
        return Row([BOS_ID] + [b + OFFSET for b in PROMPTS[i]], Params(max_bytes, seed=i, stop=stop, **opts))

    return {0: [row(0, 40), row(1, 12)], 3: [row(2, 30, stop=[b"e"]), row(3, 45)], 9: [row(4, 20)]}


def drive(engine: Engine, plan: dict[int, list[Row]]) -> tuple[list[bytes], int]:
    """Run the loop, rows joining at their steps -> (every row's bytes, the most rows that waited)."""
    rows = [r for step in sorted(plan) for r in plan[step]]
    step, waited = 0, 0
    with torch.inference_mode():
        while step <= max(plan) or engine.active:
            engine.add(plan.get(step, []))
            waited = max(waited, len(engine.waiting))
            engine.step()
            step += 1
    assert all(r.finish for r in rows)
    return [bytes(r.out) for r in rows], waited


def free_blocks(engine: Engine) -> dict:
    return {n: (p.free, p.blocks) for n, p in engine.pools.pools.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_paged_generation_gives_the_contiguous_bytes_as_rows_join_and_leave(name):
    """Rows join mid-way and leave at different steps (context 32: rows also restart); the paged
    cache (prompts prefilled in chunks) gives the contiguous cache's bytes, greedy and sampled, and
    every block is back in its pool once the rows are done."""
    model, patcher = MODELS[name]()
    for sampled in (False, True):
        want, _ = drive(Engine(model, patcher, 32), arrivals(sampled))
        paged = Engine(model, patcher, 32, kv_cache_mb=4)
        paged.pools.chunk = 8  # prompts and restarts are prefilled 8 bytes at a time
        got, waited = drive(paged, arrivals(sampled))
        assert got == want and waited == 0
        assert len(set(want)) == len(want) and sum(map(len, want)) > 60  # the rows really generated
        assert paged.counts["restarts"] > 0 and paged.counts["preemptions"] == 0
        assert all(free == total for free, total in free_blocks(paged).values()), free_blocks(paged)


@pytest.mark.parametrize("name", ["entropy-gqa", "byte_lm"])
def test_rows_that_wait_or_are_preempted_keep_their_bytes(name):
    """A budget that holds about two rows: the others wait for room, and rows that run the pools
    dry mid-generation are preempted (their blocks back, prefilled again from their ids later);
    every row's bytes are what they are with room for all. (The byte LM has no window here: a
    windowed one's rows hold only their window's blocks, and never run the pool dry.)"""
    model, patcher = random_blt("entropy", kv_heads=2) if name == "entropy-gqa" else byte_lm(window=None)
    probe = Engine(model, patcher, 64, kv_cache_mb=1)
    blocks = {n: p.blocks for n, p in probe.pools.pools.items()}
    mb = 1 * 5 / min(blocks.values())  # about 5 blocks in the smallest pool
    for sampled in (False, True):
        want, _ = drive(Engine(model, patcher, 64), arrivals(sampled))
        tight = Engine(model, patcher, 64, kv_cache_mb=mb)
        got, waited = drive(tight, arrivals(sampled))
        assert got == want
        assert waited > 0 and tight.counts["preemptions"] > 0, (waited, tight.counts)
        assert all(free == total for free, total in free_blocks(tight).values())


def test_budgets_too_small_are_refused_in_one_line():
    model, patcher = random_blt("static")
    with pytest.raises(KVBudgetError, match=r"kv_cache_mb 0.001 is too small .* give at least [\d.]+ MB"):
        Engine(model, patcher, 64, kv_cache_mb=0.001)
    engine = Engine(model, patcher, 64, kv_cache_mb=0.06)
    limit = engine.pools.limit
    assert 1 < limit < 64
    too_long = Row([BOS_ID] + [OFFSET] * limit, Params(5))
    with pytest.raises(
        KVBudgetError,
        match=rf"prompt of {limit} bytes .* kv_cache_mb 0.06 holds .* at most {limit - 1} bytes; raise kv_cache_mb",
    ):
        engine.add([too_long])
    assert not engine.active  # nothing joined
    fits = Row([BOS_ID] + [OFFSET + 1] * (limit - 1), Params(5, temperature=0))
    engine.add([fits])
    while engine.active:
        engine.step()
    assert len(fits.out) == 5
    with pytest.raises(OptionError, match="compile"):
        Generator(model, patcher, 64, compile=True, kv_cache_mb=8)
    with pytest.raises(OptionError, match="kv_cache_mb must be > 0"):
        Generator(model, patcher, 64, kv_cache_mb=0)


def test_generator_with_a_budget_gives_the_same_bytes():
    model, patcher = random_blt("entropy")
    prompts = ["ROMEO.", "", "a longer prompt than the others, past the context" * 2]
    opts = dict(max_bytes=40, temperature=0.8, seed=3)
    want = Generator(model, patcher, 48).generate(prompts, **opts)
    paged = Generator(model, patcher, 48, kv_cache_mb=2)
    assert paged.generate(prompts, **opts) == want and paged.stats["bytes"] == sum(map(len, want))


@pytest.mark.parametrize(
    "window,sparse", [(8, None), (None, None), (None, {"pattern": "strided", "block": 4, "dilation": 2})]
)
def test_the_paged_cache_steps_as_the_contiguous_cache(window, sparse):
    """One Transformer stepped against both caches: a ragged prefill (padding in the step), byte
    steps past the window (early blocks given back), rows dropped, copied and reordered, another
    cache's rows joined, a rewind; every output equal, every block back at the end."""
    model, _ = byte_lm(window, sparse)
    tf, C = model.transformer, 64
    pool = BlockPool.for_transformer(tf, blocks=80, block_size=4)
    torch.manual_seed(1)

    def both(make):
        return make(lambda b: KVCache.for_transformer(tf, b, C)), make(lambda b: PagedKVCache(pool, b, C))

    def step(caches, x, valid):
        outs = []
        for c in caches:
            outs.append(tf.step(x, c, valid))
        valid_rows = torch.arange(x.shape[1])[None] < valid[:, None]  # (B, n) the real positions
        torch.testing.assert_close(outs[0][valid_rows], outs[1][valid_rows], atol=1e-5, rtol=0)

    def run(caches, lengths):
        step(caches, torch.randn(len(lengths), max(lengths), 32), torch.tensor(lengths))
        for _ in range(14):
            step(caches, torch.randn(len(lengths), 1, 32), torch.ones(len(lengths), dtype=torch.long))

    a = both(lambda new: new(3))
    run(a, [9, 2, 5])
    held = a[1].held
    if window is not None:
        assert held < sum(-(-n // 4) for n in a[1].lens.tolist())  # blocks before the window went back
    for c in a:
        c.take(torch.tensor([2, 0, 2]))  # row 1 leaves, row 2 is copied
    assert pool.free == pool.blocks - a[1].held
    b = both(lambda new: new(2))
    run(b, [3, 7])
    for mine, theirs in zip(a, b):
        mine.append(theirs)
    for c in a:
        c.rewind(torch.tensor([1, 0, 1, 1, 0]))
    run(a, [1, 2, 1, 3, 1])
    assert a[1].lens.tolist() == a[0].lens.tolist()
    a[1].release()
    assert pool.free == pool.blocks
