"""Positions per Transformer section (`position: rope | alibi | none`): ALiBi's slopes against HF
BLOOM's, every attention kernel against a dense reference with the bias, causality, cached and
batched generation equal to the uncached forward, and the one-line refusals."""

from __future__ import annotations

import pytest
import torch
from test_sparse import CASES, max_diff

from blt.config import config_from_dict
from blt.errors import ConfigError
from blt.generation import Generator
from blt.model.alibi import alibi_slopes
from blt.model.attention import causal_self_attention
from blt.model.layers import Transformer
from blt.model.sparse_attention import dense_sparse_attention, flex_sparse_attention, gather_sparse_attention
from blt.model.sparse_patterns import PATTERNS, Pattern
from blt.tokens import OFFSET

from random_models import random_blt

PROMPTS = [b"h\xc3", "The cat sat on", "", "d"]


def reference(q, k, v, allowed: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """softmax(q.k / sqrt(hd) - slope_h * |i - j|) over the allowed keys; rows with none: zeros."""
    T = q.shape[-2]
    pos = torch.arange(T)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 - slopes[:, None, None] * (pos[:, None] - pos).abs()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def qkv(T: int, H: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, H, T, 8, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8, 12, 16])
def test_slopes_are_bloom_s(heads):
    """The paper's slopes, including head counts that are not a power of two, as HF's BLOOM builds them."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    bloom = build_alibi_tensor(torch.ones(1, 3), heads, torch.float32)  # (H, 1, 3): slope * position
    torch.testing.assert_close(alibi_slopes(heads), bloom[:, 0, 1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("T,window", [(40, None), (12, 8), (45, 8), (64, 16)])  # full, one mask, blocked kernel
def test_causal_and_windowed_kernels_equal_the_dense_reference(T, window):
    q, k, v = qkv(T)
    slopes = alibi_slopes(4)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = (j <= i) & (j > i - (window or T))
    got = causal_self_attention(q, k, v, window, slopes)
    assert max_diff(got, reference(q, k, v, allowed, slopes), (q, k, v)) <= 1e-5


@pytest.mark.parametrize("name", [p for p in PATTERNS if p != "block_causal"])
def test_sparse_backends_equal_the_dense_reference(name):
    """gather (forward and gradients) and flex (forward: CPU has no flex backward) with ALiBi as the
    pattern's bias / score_mod; T is not a multiple of the block and long enough for global rows."""
    p = Pattern(torch_cfg(name), 4)
    T, slopes = 100, alibi_slopes(4)
    q, k, v = qkv(T, seed=1)
    want = lambda: reference(q, k, v, p.dense_mask(T), slopes)  # noqa: E731 (a graph per comparison)
    assert max_diff(gather_sparse_attention(q, k, v, p, slopes), want(), (q, k, v)) <= 1e-5
    assert max_diff(dense_sparse_attention(q, k, v, p, slopes), want(), (q, k, v)) <= 1e-5
    with torch.no_grad():
        flex = flex_sparse_attention(*(x.detach() for x in (q, k, v)), p, slopes)
        assert (flex - want()).abs().max() <= 1e-5


def torch_cfg(name: str):
    from blt.config import SparseAttentionConfig

    return SparseAttentionConfig(pattern=name, **CASES[name])


def section(position: str, kv_heads=None, **extra):
    s = {"dim": 32, "layers": 2, "heads": 4, "kv_heads": kv_heads, "position": position, **extra}
    return config_from_dict({"model": {"global_model": s}}).model.global_model


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("position", ["alibi", "none"])
@pytest.mark.parametrize("attention", [{}, {"window": 8}, {"sparse": {"pattern": "bigbird", "block": 4}}])
def test_a_section_is_causal_and_its_cached_steps_equal_the_forward(position, kv_heads, attention):
    """MHA, GQA and MQA with ALiBi or no positions: changing position t never changes outputs before
    t, and a ragged batch stepped through a KV cache (a prompt, then one position at a time) gives
    the forward's values at every position."""
    from blt.generation.kv_cache import KVCache

    torch.manual_seed(0)
    tf = Transformer(section(position, kv_heads, **attention), 1e-5, 10000.0).eval()
    x = torch.randn(2, 30, 32)
    with torch.no_grad():
        full = tf(x)
        for t in (3, 17, 29):
            y = x.clone()
            y[:, t] += 1.0
            assert torch.equal(tf(y)[:, :t], full[:, :t])
        cache = KVCache.for_transformer(tf, 2, 30)
        valid = torch.tensor([10, 6])  # row 1's prompt is shorter: the batch is ragged from here on
        first = tf.step(x[:, :10], cache, valid)
        torch.testing.assert_close(first[0], full[0, :10], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first[1, :6], full[1, :6], atol=1e-5, rtol=1e-5)
        for _ in range(14):  # row b feeds its position lens[b]
            at = cache.lens.clone()
            out = tf.step(x[torch.arange(2), at][:, None], cache)
            torch.testing.assert_close(out[:, 0], full[torch.arange(2), at], atol=1e-5, rtol=1e-5)


def test_alibi_changes_the_model_and_keeps_its_weights():
    """ALiBi and none add no weights (checkpoints of either load into the other) but attend differently."""
    outs = []
    for position in ("rope", "alibi", "none"):
        torch.manual_seed(0)
        tf = Transformer(section(position), 1e-5, 10000.0).eval()
        with torch.no_grad():
            outs.append((tf.state_dict(), tf(torch.ones(1, 12, 32).cumsum(1))))
    assert all(outs[0][0].keys() == o[0].keys() for o in outs)
    assert not torch.allclose(outs[0][1], outs[1][1]) and not torch.allclose(outs[1][1], outs[2][1])


@pytest.mark.parametrize(
    "mode,kv_heads,position,temperature",
    [("static", None, "alibi", 0.0), ("entropy", 2, "alibi", 0.9), ("learned", 1, "none", 0.0)],
)
def test_cached_generation_equals_uncached(mode, kv_heads, position, temperature):
    """A BLT (and its entropy model) with ALiBi or no positions in every section: the cached bytes
    (greedy or sampled) of a ragged batch equal the uncached reference, which re-runs the context."""
    gen = Generator(*random_blt(mode, kv_heads=kv_heads, position=position), 96)
    opts = dict(max_bytes=24, temperature=temperature, seed=5)
    assert gen.generate(PROMPTS, **opts) == gen.generate(PROMPTS, cache=False, **opts)


def test_blt_with_alibi_is_causal():
    model, patcher = random_blt("static", kv_heads=2, position="alibi")
    x = torch.randint(OFFSET, OFFSET + 200, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = patcher.forward(model, x)[0]
        for t in (5, 21, 39):
            y = x.clone()
            y[0, t] = OFFSET + 7
            assert torch.equal(patcher.forward(model, y)[0][0, :t], base[0, :t])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"model": {"hf_compat": True, "decoder": {"position": "alibi"}}, "patching": {"split_first_byte": True}},
            "model.decoder.position=alibi with model.hf_compat=true: HF's BLT has RoPE only",
        ),
        (
            {"model": {"global_model": {"position": "none", "rope_scaling": {"factor": 8.0}}}},
            "model.global_model.rope_scaling scales RoPE, but model.global_model.position is none",
        ),
        ({"model": {"encoder": {"position": "relative"}}}, "model.encoder.position"),
    ],
)
def test_impossible_combinations_are_refused_in_one_line(overrides, message):
    from blt.config import check_config

    with pytest.raises(ConfigError) as e:
        check_config(config_from_dict(overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_resume_with_another_position_names_the_key():
    from blt.train.rundir import describe_diff, model_diff

    a = config_from_dict({})
    b = config_from_dict({"model": {"global_model": {"position": "alibi"}}})
    assert describe_diff(model_diff(a, b), "the checkpoint", "the config") == (
        "model.global_model.position: 'rope' in the checkpoint, 'alibi' in the config"
    )
