"""Generation: the KV-cached path (entropy model, encoder and decoder stepping per byte, global
model once per patch) against the uncached reference; sampling options; streaming; the CLI."""

from __future__ import annotations

import codecs

import pytest
import torch

from blt.config import config_from_dict
from blt.generation import Generator, stream_text
from blt.generation.incremental import IncrementalBLT
from blt.model import build_model
from blt.patching import Patcher, patch_ids_from_starts, patch_starts

from random_models import BLT, random_blt

# prompts that end mid-patch and in the middle of a UTF-8 character (the first byte of "é")
PROMPTS = [b"h\xc3", "The cat sat on", "", "d"]


def make(
    mode: str,
    hf: bool = False,
    context: int = 96,
    seed: int = 0,
    all_layers: bool = False,
    kv_heads=None,
    position: str = "rope",
) -> Generator:
    return Generator(*random_blt(mode, hf, all_layers, seed, kv_heads, position), context)


@pytest.mark.parametrize(
    "mode,hf,all_layers",
    [
        ("static", False, False),
        ("space", False, False),
        ("entropy", False, False),
        ("static", True, False),
        ("entropy", True, True),
        ("learned", False, False),
        ("learned", False, True),
    ],
)
def test_cached_greedy_equals_uncached_byte_for_byte(mode, hf, all_layers):
    gen = make(mode, hf, all_layers=all_layers)
    cached = gen.generate(PROMPTS, max_bytes=48, temperature=0)
    stats = gen.stats
    reference = gen.generate(PROMPTS, max_bytes=48, temperature=0, cache=False)
    assert cached == reference
    assert sum(map(len, cached)) > 100  # the rows really generated
    assert 0 < stats["global_calls"] < stats["bytes"]  # the global model ran per patch, not per byte


@pytest.mark.parametrize(
    "mode,hf,cache",
    [
        ("static", False, True),
        ("space", False, True),
        ("entropy", True, True),
        ("learned", False, True),
        ("entropy", True, False),
        ("learned", False, False),
    ],
)
def test_a_prompt_gives_the_same_bytes_alone_and_in_a_batch(mode, hf, cache):
    """Every row samples with its own RNG seeded with `seed` and restarts its context alone, so a
    prompt's bytes do not depend on what else is generated with it (context 24: rows restart)."""
    gen = make(mode, hf, context=24)
    for opts in (dict(temperature=0.8, seed=3), dict(temperature=0, stop=[b"e"])):
        batch = gen.generate(PROMPTS, max_bytes=50, cache=cache, **opts)
        assert batch == [gen.generate([p], max_bytes=50, cache=cache, **opts)[0] for p in PROMPTS]
        assert len(set(batch)) > 1  # the rows differ: the check can fail
    assert gen.stats["context_restarts"] > 0 if cache else True


@pytest.mark.parametrize("mode,hf,kv_heads", [("entropy", False, 2), ("learned", False, 1), ("static", True, 1)])
def test_grouped_and_multi_query_attention_generate_cached_as_uncached(mode, hf, kv_heads):
    """Grouped-query (2 key/value heads of 4) and multi-query (1) attention in every Transformer: the
    KV caches hold kv_heads heads, and cached greedy and sampled bytes equal the uncached reference."""
    gen = make(mode, hf, kv_heads=kv_heads)
    for opts in (dict(temperature=0), dict(temperature=0.9, seed=2)):
        cached = gen.generate(PROMPTS, max_bytes=40, **opts)
        assert cached == gen.generate(PROMPTS, max_bytes=40, cache=False, **opts)
        assert sum(map(len, cached)) > 60
    from blt.generation.incremental import IncrementalBLT

    inc = IncrementalBLT(gen.model, batch=1, capacity=8)
    assert inc.glob_cache.k.shape[2] == inc.enc_cache.k.shape[2] == kv_heads  # (layers, B, Hkv, C, hd)


@pytest.mark.parametrize("mode", ["static", "entropy", "learned"])
def test_cached_sampling_equals_uncached_with_the_same_seed(mode):
    gen = make(mode)
    opts = dict(max_bytes=40, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    assert gen.generate(PROMPTS, **opts) == gen.generate(PROMPTS, **opts, cache=False)
    assert gen.generate(PROMPTS, **opts) != gen.generate(PROMPTS, **{**opts, "seed": 8})


def test_incremental_logits_match_the_full_forward_at_every_byte():
    gen = make("entropy")
    model, patcher = gen.model, gen.patcher
    torch.manual_seed(1)
    tokens = torch.randint(4, 260, (2, 50))
    tokens[:, 0] = 1
    ids = patcher(tokens)
    full = model(tokens, ids)  # (B, T, V)
    starts = patch_starts(tokens, patcher.cfg, patcher.entropies(tokens))
    assert (patch_ids_from_starts(starts) == ids).all()
    inc = IncrementalBLT(model, 2, 64)
    inc.feed(tokens[:, :10], starts[:, :10], torch.tensor([10, 3]))  # ragged prefill
    inc.feed(tokens[:, 3:10], starts[:, 3:10], torch.tensor([0, 7]))  # row 1 catches up
    for t in range(10, 50):
        logits = inc.feed(tokens[:, t : t + 1], starts[:, t : t + 1], torch.tensor([1, 1]))
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=0)
    # one global step per completed patch: patches before each row's last are done
    assert inc.done.tolist() == ids[:, -1].tolist()


def test_global_model_runs_once_per_patch():
    gen = make("static")  # 3-byte patches
    out = gen.generate([""], max_bytes=60, temperature=0)
    fed = 1 + len(out[0]) - 1  # BOS and every generated byte but the last went through the model
    assert gen.stats["global_calls"] == (fed - 1) // 3  # a patch completes when the next one starts


def test_stop_strings_max_bytes_and_top_k_one():
    gen = make("static")
    greedy = gen.generate(["ab"], max_bytes=40, temperature=0)[0]
    stop = greedy[10:12]
    stopped = gen.generate(["ab"], max_bytes=40, temperature=0, stop=[stop])[0]
    assert stopped == greedy[: greedy.index(stop) + len(stop)]  # ends right after the stop string
    assert gen.generate(["ab"], max_bytes=7, temperature=0)[0] == greedy[:7]
    assert gen.generate(["ab"], max_bytes=40, temperature=1.0, top_k=1, seed=3)[0] == greedy


def test_generation_past_the_context_and_long_prompts():
    gen = make("entropy", context=32)
    long_prompt = "x" * 50  # longer than the context: only its last 32 bytes are seen
    out = gen.generate([long_prompt, "y"], max_bytes=80, temperature=0.8, seed=0)
    assert [len(o) for o in out] == [80, 80] or all(len(o) <= 80 for o in out)
    assert gen.stats["bytes"] == sum(map(len, out))


def test_byte_lm_cached_equals_uncached():
    torch.manual_seed(0)
    cfg = config_from_dict(
        {
            "model": {"arch": "byte_lm", "lm": {"dim": 32, "layers": 2, "heads": 2, "window": 8}, "init_std": 0.3},
            "patching": {"mode": "static", "patch_size": 1},
        }
    )
    gen = Generator(build_model(cfg.model), Patcher(cfg.patching), 64)
    assert gen.generate(PROMPTS, max_bytes=30, temperature=0) == gen.generate(
        PROMPTS, max_bytes=30, temperature=0, cache=False
    )


def test_streamed_text_is_always_whole_utf8_characters():
    data = "héllo wörld ✓ 🙂".encode() + b"\xff" + b"!"
    pieces: list[str] = []
    assert stream_text(iter(data), pieces.append) == data
    assert all(p.encode("utf-8") for p in pieces)  # every write is valid on its own
    assert "".join(pieces) == codecs.decode(data, "utf-8", errors="replace")
    assert "é" in pieces and "🙂" in pieces  # multi-byte characters arrive whole


def test_cached_generation_with_sparse_attention_patterns():
    """Length-independent sparse patterns (local, strided, longformer) give the same bytes cached."""
    torch.manual_seed(0)
    sparse = {
        "encoder": {
            "dim": 32,
            "layers": 1,
            "heads": 2,
            "window": None,
            "sparse": {"pattern": "strided", "block": 4, "dilation": 2, "num_sliding_window_blocks": 4},
        },
        "global_model": {"dim": 64, "layers": 2, "heads": 2, "sparse": {"pattern": "local", "block": 4, "window": 6}},
        "decoder": {
            "dim": 32,
            "layers": 2,
            "heads": 2,
            "window": None,
            "sparse": {
                "pattern": "longformer",
                "block": 8,
                "num_sliding_window_blocks": 3,
                "global_block_indices": [0],
            },
        },
    }
    cfg = config_from_dict({"model": {**BLT, **sparse}, "patching": {"mode": "static", "patch_size": 3}})
    gen = Generator(build_model(cfg.model).eval(), Patcher(cfg.patching), 96)
    assert gen.generate(PROMPTS, max_bytes=40, temperature=0) == gen.generate(
        PROMPTS, max_bytes=40, temperature=0, cache=False
    )


def test_sampling_draws_each_id_with_its_filtered_probability():
    """Inverse-CDF sampling: frequencies follow the softmax, top-k / top-p drop what they should,
    and a row's draw is the same alone or in a batch with the same uniform number."""
    from blt.generation.sampling import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits.expand(1000, -1), 1.0, None, None, gen) for _ in range(20)])
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.01)
    assert set(sample_next(logits.expand(2000, -1), 1.0, 2, None, gen).tolist()) == {0, 1}
    assert set(sample_next(logits.expand(2000, -1), 1.0, None, 0.7, gen).tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7
    u = torch.rand(8, generator=gen)
    batch = torch.randn(8, 260, generator=gen)
    together = sample_next(batch, 0.8, 40, 0.9, None, u)
    alone = [int(sample_next(batch[i : i + 1], 0.8, 40, 0.9, None, u[i : i + 1])) for i in range(8)]
    assert together.tolist() == alone


@pytest.mark.parametrize(
    "mode,hf,kv_heads,position",
    [("entropy", False, None, "rope"), ("static", True, None, "rope"), ("learned", False, 2, "alibi")],
)
def test_compiled_generation_equals_eager(mode, hf, kv_heads, position):
    """compile=True: the one-byte steps run compiled at fixed shapes and give eager's bytes, greedy
    and sampled, for a batch of ragged prompts that stop at different bytes and pass the context;
    each step is one graph (no graph break), and the decoder stays compiled once rows have stopped
    (an HF-compatible decoder, which redoes the previous byte, stays eager). The learned case has
    grouped-query attention and ALiBi (its bias over the windowed slots the compiled step gathers)."""
    from torch._dynamo.utils import counters

    eager = make(mode, hf, context=48, all_layers=True, kv_heads=kv_heads, position=position)
    compiled = Generator(eager.model, eager.patcher, eager.context, compile=True)
    breaks = sum(counters["graph_break"].values())
    for opts in (dict(temperature=0), dict(temperature=0.9, top_p=0.95, seed=3)):
        stop = eager.generate(PROMPTS, max_bytes=20, **opts)[1][12:14]  # row 1 stops after ~14 bytes
        kw = dict(max_bytes=70, stop=[stop], **opts)
        want = eager.generate(PROMPTS, **kw)
        before = dict(compiled.steps.calls)
        assert compiled.generate(PROMPTS, **kw) == want  # = eager, whose rows equal each prompt alone
        assert len({len(o) for o in want}) > 1  # rows stopped at different bytes
        calls = {k: v - before.get(k, 0) for k, v in compiled.steps.calls.items()}
        steps = max(len(o) for o in want)  # byte steps of this generation
        assert calls["encode"] >= 0.8 * steps and calls.get("byte_lm", 0) >= (0.8 * steps if mode == "entropy" else 0)
        assert calls.get("decode", 0) == 0 if hf else calls["decode"] >= 0.8 * steps
        assert compiled.stats["context_restarts"] > 0
    assert sum(counters["graph_break"].values()) == breaks


def test_compiled_byte_lm_equals_eager():
    torch.manual_seed(0)
    cfg = config_from_dict(
        {
            "model": {"arch": "byte_lm", "lm": {"dim": 32, "layers": 2, "heads": 2, "window": 8}, "init_std": 0.3},
            "patching": {"mode": "static", "patch_size": 1},
        }
    )
    eager = Generator(build_model(cfg.model), Patcher(cfg.patching), 64)
    compiled = Generator(eager.model, eager.patcher, 64, compile=True)
    assert compiled.generate(PROMPTS, max_bytes=30, temperature=0) == eager.generate(
        PROMPTS, max_bytes=30, temperature=0
    )
    assert compiled.stats["compiled_steps"] > 0
