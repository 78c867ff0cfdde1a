"""Sparse attention: every pattern and backend against the dense reference, causality, layouts on
hand-checked cases, the model with sparse patterns, and training with a sparse global model."""

from __future__ import annotations

import pytest
import torch

from blt.config import ConfigError, SparseAttentionConfig, TransformerConfig, load_config
from blt.model.sparse_attention import (
    SparseBackendError,
    dense_sparse_attention,
    flex_sparse_attention,
    gather_sparse_attention,
    sparse_attention,
)
from blt.model.sparse_patterns import PATTERNS, Pattern, custom_pattern

from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli

B16 = dict(block=16)
CASES = {
    "dense": dict(B16),
    "local": dict(B16, window=24),
    "strided": dict(B16, dilation=2, num_sliding_window_blocks=3),
    "fixed": dict(
        B16, num_local_blocks=2, num_global_blocks=1, different_layout_per_head=True, num_different_global_patterns=2
    ),
    "bigbird": dict(
        B16, num_random_blocks=1, num_sliding_window_blocks=3, num_global_blocks=2, different_layout_per_head=True
    ),
    "longformer": dict(B16, num_sliding_window_blocks=3, global_block_indices=[0, 10]),
    "variable": dict(
        B16, num_random_blocks=1, local_window_blocks=[2, 3], global_block_indices=[3], horizontal_global_attention=True
    ),
    "block_causal": dict(B16),
}


def pattern(name: str, attention: str = "unidirectional", heads: int = 4, **kw) -> Pattern:
    return Pattern(SparseAttentionConfig(pattern=name, attention=attention, **{**CASES[name], **kw}), heads)


def qkv(T: int, H: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, H, T, 8, generator=g, requires_grad=True) for _ in range(3)]


def max_diff(a, b, inputs) -> float:
    g = torch.randn_like(a)
    ga, gb = torch.autograd.grad(a, inputs, g), torch.autograd.grad(b, inputs, g)
    return max([(a - b).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(ga, gb)])


def test_every_pattern_is_covered():
    assert set(CASES) == set(PATTERNS)


@pytest.mark.parametrize("attention", ["unidirectional", "bidirectional"])
@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("T", [100, 520])  # not a multiple of the block; long enough for global rows
def test_gather_backend_equals_the_dense_reference(name, attention, T):
    p = pattern(name, attention)
    q, k, v = qkv(T)
    assert max_diff(gather_sparse_attention(q, k, v, p), dense_sparse_attention(q, k, v, p), (q, k, v)) <= 1e-5


@pytest.mark.parametrize("name", PATTERNS)
def test_flex_backend_forward_equals_the_dense_reference(name):
    """On CPU FlexAttention runs forward only (eager); the mask_mod must be the same pattern."""
    p = pattern(name)
    q, k, v = (x.detach() for x in qkv(100))
    with torch.no_grad():
        diff = (flex_sparse_attention(q, k, v, p) - dense_sparse_attention(q, k, v, p)).abs().max()
    assert diff <= 1e-5


def test_fully_masked_rows_give_zeros_in_every_backend():
    layout = torch.ones(1, 5, 5, dtype=torch.bool)
    layout[0, 2] = False  # query block 2 may see nothing
    p = custom_pattern(layout, 16)
    q, k, v = qkv(70, H=2)
    ref = dense_sparse_attention(q, k, v, p)
    assert ref[:, :, 32:48].abs().max() == 0
    assert max_diff(gather_sparse_attention(q, k, v, p), ref, (q, k, v)) <= 1e-5
    with torch.no_grad():
        assert (flex_sparse_attention(q.detach(), k.detach(), v.detach(), p) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name", [n for n in PATTERNS if n != "block_causal"])
def test_unidirectional_patterns_are_causal(name):
    p = pattern(name)
    T, t = 300, 137
    q, k, v = (x.detach() for x in qkv(T))
    base = gather_sparse_attention(q, k, v, p)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t:] += 5.0
    v2[:, :, t:] -= 3.0
    assert torch.equal(gather_sparse_attention(q, k2, v2, p)[:, :, :t], base[:, :, :t])


def as_rows(layout: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row).flatten().tolist() for row in layout]


def test_fixed_layout_hand_checked():
    p = Pattern(SparseAttentionConfig(pattern="fixed", block=4, num_local_blocks=3, num_global_blocks=1), 2)
    # windows {0,1,2} and {3,4,5}; each window's last block (2, 5) is its summary, seen by all later blocks
    assert as_rows(p.layout(6)[0]) == [[0], [0, 1], [0, 1, 2], [2, 3], [2, 3, 4], [2, 3, 4, 5]]


def test_longformer_layout_hand_checked():
    p = Pattern(
        SparseAttentionConfig(
            pattern="longformer",
            block=4,
            attention="bidirectional",
            num_sliding_window_blocks=3,
            global_block_indices=[2],
        ),
        1,
    )
    assert as_rows(p.layout(6)[0]) == [[0, 1, 2], [0, 1, 2], [0, 1, 2, 3, 4, 5], [2, 3, 4], [2, 3, 4, 5], [2, 4, 5]]
    ranges = Pattern(
        SparseAttentionConfig(
            pattern="longformer",
            block=4,
            attention="bidirectional",
            num_sliding_window_blocks=1,
            global_block_indices=[1],
            global_block_end_indices=[3],
        ),
        1,
    )
    assert as_rows(ranges.layout(5)[0])[4] == [1, 2, 4]


def test_bigbird_layout_with_a_fixed_seed():
    cfg = dict(
        pattern="bigbird",
        block=4,
        attention="bidirectional",
        num_sliding_window_blocks=3,
        num_global_blocks=1,
        num_random_blocks=1,
    )
    lay = Pattern(SparseAttentionConfig(**cfg, seed=0), 1).layout(8)[0]
    q, k = torch.arange(8)[:, None], torch.arange(8)[None, :]
    base = ((q - k).abs() <= 1) | (q == 0) | (k == 0)
    assert (lay & base).equal(base)  # window and global row/column are all there
    extra = (lay & ~base).sum(1)
    assert (extra <= 1).all() and extra.sum() >= 1  # plus at most one random block per row
    assert lay.equal(Pattern(SparseAttentionConfig(**cfg, seed=0), 1).layout(8)[0])  # seeded: reproducible
    assert not all(Pattern(SparseAttentionConfig(**cfg, seed=s), 1).layout(8)[0].equal(lay) for s in range(1, 6))
    causal = Pattern(SparseAttentionConfig(**{**cfg, "attention": "unidirectional"}, seed=0), 1).layout(8)[0]
    assert not causal.triu(1).any()


def test_variable_and_strided_layouts_hand_checked():
    var = Pattern(
        SparseAttentionConfig(
            pattern="variable", block=4, num_random_blocks=0, local_window_blocks=[1, 2], global_block_indices=[0]
        ),
        1,
    )
    assert as_rows(var.layout(5)[0]) == [[0], [0, 1], [0, 1, 2], [0, 3], [0, 3, 4]]
    strided = Pattern(SparseAttentionConfig(pattern="strided", block=4, dilation=2, num_sliding_window_blocks=2), 1)
    assert as_rows(strided.layout(6)[0]) == [[0], [1], [0, 2], [1, 3], [2, 4], [3, 5]]


def test_local_pattern_is_a_token_window():
    p = Pattern(SparseAttentionConfig(pattern="local", block=4, window=3), 1)
    m = p.dense_mask(10)[0]
    q, k = torch.arange(10)[:, None], torch.arange(10)[None, :]
    assert m.equal((q - k >= 0) & (q - k < 3))


def test_flex_cannot_train_on_cpu_and_says_so():
    q, k, v = qkv(40)
    with pytest.raises(SparseBackendError, match="backend gather"):
        sparse_attention(q, k, v, pattern("local"), backend="flex")


@pytest.mark.parametrize(
    "bad,message",
    [
        ("model.global_model.sparse.attention=bidirectional", "causal attention"),
        ("model.global_model.sparse.pattern=block_causal", "causal attention"),
        ("model.encoder.sparse.pattern=local", "window=null"),
        ("model.global_model.sparse.pattern=starry", "model.global_model.sparse.pattern"),
    ],
)
def test_sparse_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", [bad])


def test_blt_with_sparse_attention_everywhere_is_causal():
    from blt.config import ModelConfig, PatchingConfig
    from blt.model import BLT
    from blt.patching import Patcher

    local = SparseAttentionConfig(pattern="local", block=8, window=16)
    cfg = ModelConfig(
        encoder=TransformerConfig(dim=32, layers=1, heads=2, sparse=local),
        global_model=TransformerConfig(
            dim=48,
            layers=2,
            heads=2,
            sparse=SparseAttentionConfig(pattern="bigbird", block=4, num_global_blocks=1, num_random_blocks=1),
        ),
        decoder=TransformerConfig(dim=32, layers=1, heads=2, sparse=local),
        cross_attn_heads=2,
        hash_buckets=64,
    )
    torch.manual_seed(0)
    model = BLT(cfg).eval()
    patcher = Patcher(PatchingConfig(mode="static", patch_size=3))
    x = torch.randint(4, 260, (1, 90))
    with torch.no_grad():
        base = model(x, patcher(x))
        for t in (20, 61):
            y = x.clone()
            y[0, t] = 4 + (int(x[0, t]) + 7) % 256
            assert torch.equal(model(y, patcher(y))[0, :t], base[0, :t])


def test_tiny_blt_trains_with_a_sparse_global_model(tmp_path, capsys, cache_dir):
    """16 KiB byte sequences on a CPU: a BigBird global model and local-window byte Transformers."""
    run = tmp_path / "sparse"
    code, _, err = run_cli(
        capsys,
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        *TINY_BLT,
        "patching.mode=static",
        "data.seq_len=16384",
        "training.batch_size=1",
        "training.steps=4",
        "model.global_model.sparse.pattern=bigbird",
        "model.global_model.sparse.block=32",
        "model.encoder.window=null",
        "model.encoder.sparse.pattern=local",
        "model.encoder.sparse.window=64",
        "model.encoder.sparse.block=32",
        "eval.max_bytes=16384",
    )
    assert code == 0, err
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert max(m.get("peak_mem_gb", 0) for m in read_metrics(run)) < 4
