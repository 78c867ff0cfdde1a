"""The model never looks ahead, its kernels equal dense masked attention, and its hash n-gram
embedding equals a slow reference."""

import pytest
import torch

from blt.config import ModelConfig, PatchingConfig, TransformerConfig
from blt.data import OFFSET, VOCAB_SIZE, encode
from blt.model import BLT, ByteLM
from blt.model.attention import (
    decoder_mask,
    dense_attention,
    patch_pooling_attention,
    pooling_mask,
    previous_patch_attention,
)
from blt.model.hash_embed import PRIMES, HashNgramEmbedding, ngram_hash
from blt.patching import Patcher


def tiny_model_cfg(**kw) -> ModelConfig:
    cfg = ModelConfig(
        encoder=TransformerConfig(dim=32, layers=1, heads=2, window=8),
        global_model=TransformerConfig(dim=48, layers=2, heads=2),
        decoder=TransformerConfig(dim=32, layers=1, heads=2, window=8),
        lm=TransformerConfig(dim=32, layers=1, heads=2),
        cross_attn_heads=2,
        hash_ngram_sizes=[2, 3],
        hash_buckets=97,
        hash_functions=2,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def random_ids(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(OFFSET, VOCAB_SIZE, (B, T), generator=g)


def text_ids(text: str, T: int) -> torch.Tensor:
    ids = torch.from_numpy(encode(text, bos=True, eos=False).astype("int64"))[:T]
    return ids[None]


def make_patcher(mode: str, split_first_byte: bool = False) -> Patcher:
    if mode == "entropy":
        torch.manual_seed(1)
        lm = ByteLM(tiny_model_cfg()).eval()
        p = Patcher(PatchingConfig(mode="entropy", max_patch_length=6, split_first_byte=split_first_byte), lm)
        p.threshold = float(p.entropies(random_ids(2, 40, seed=5))[:, 1:].median())
        return p
    return Patcher(PatchingConfig(mode=mode, patch_size=3, max_patch_length=6, split_first_byte=split_first_byte))


@pytest.mark.parametrize(
    "mode,hf", [("static", False), ("space", False), ("entropy", False), ("static", True), ("entropy", True)]
)
def test_changing_byte_t_never_changes_logits_before_t(mode, hf):
    """Also for model.hf_compat (HF's decoder rule, decoder cross-attention in every layer)."""
    torch.manual_seed(0)
    extra = (
        dict(
            hf_compat=True,
            cross_attn_all_layers_decoder=True,
            decoder=TransformerConfig(dim=32, layers=2, heads=2, window=8),
        )
        if hf
        else {}
    )
    model = BLT(tiny_model_cfg(**extra)).eval()
    patcher = make_patcher(mode, split_first_byte=hf)
    x = text_ids("To be, or not to be: that is the question. Whether 'tis nobler", 48)
    T = x.shape[1]
    with torch.no_grad():
        base = model(x, patcher(x))
        for t in (1, 5, 17, 30, T - 1):
            for new in (OFFSET + ord(" "), OFFSET + ord("Z"), OFFSET + 0xE4):
                y = x.clone()
                y[0, t] = new
                out = model(y, patcher(y))
                assert torch.equal(out[0, :t], base[0, :t]), f"{mode}: byte {t} changed earlier logits"
    # and the model does use the past: a changed byte changes some later logits
    y = x.clone()
    y[0, 10] = OFFSET + ord("#")
    with torch.no_grad():
        assert not torch.allclose(model(y, patcher(y))[0, 11:], base[0, 11:])


def test_byte_lm_is_causal():
    torch.manual_seed(0)
    lm = ByteLM(tiny_model_cfg()).eval()
    x = random_ids(1, 30)
    with torch.no_grad():
        base = lm(x)
        y = x.clone()
        y[0, 12] = OFFSET
        assert torch.equal(lm(y)[0, :12], base[0, :12])


def _patch_ids(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < 0.3
    starts[:, 0] = True
    return starts.long().cumsum(1) - 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooling_kernel_equals_dense_reference(seed):
    B, H, T, hd, k = 2, 3, 23, 8, 2
    ids = _patch_ids(B, T, seed)
    ids[1, -5:] = ids[1, -6]  # a longer last patch
    P = int(ids.max()) + 1 + 1  # one extra, empty (padding) patch
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, P * k, hd, generator=g, requires_grad=True)
    kk = torch.randn(B, H, T, hd, generator=g, requires_grad=True)
    v = torch.randn(B, H, T, hd, generator=g, requires_grad=True)
    out = patch_pooling_attention(q, kk, v, ids, k)
    ref = dense_attention(q, kk, v, pooling_mask(ids, P, k))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, :, -k:] == 0)  # the empty patch sees nothing
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, kk, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, kk, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pooling_mask_is_own_patch_only():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = pooling_mask(ids, 3, 2)[0]  # (P*k, T)
    expect = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expect.repeat_interleave(2, 0))


def test_decoder_mask_is_previous_patch_only():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = decoder_mask(ids, 3, 1)[0]  # (T, P)
    expect = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(m, expect)
    # no byte ever sees its own patch or a later one
    P = torch.arange(3)[None, :]
    assert not (m & (P >= ids[0][:, None])).any()


@pytest.mark.parametrize("seed", [0, 1])
def test_decoder_kernel_equals_dense_reference(seed):
    B, H, T, hd, k = 2, 2, 19, 8, 3
    ids = _patch_ids(B, T, seed)
    P = int(ids.max()) + 1
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, hd, generator=g, requires_grad=True)
    kk = torch.randn(B, H, P * k, hd, generator=g, requires_grad=True)
    v = torch.randn(B, H, P * k, hd, generator=g, requires_grad=True)
    out = previous_patch_attention(q, kk, v, ids, k)
    ref = dense_attention(q, kk, v, decoder_mask(ids, P, k))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, kk, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, kk, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def slow_hash(ids: list[int], t: int, n: int, prime: int, buckets: int) -> int:
    window = [0] * max(0, n - 1 - t) + ids[max(0, t - n + 1) : t + 1]
    h = 0
    for i, tok in enumerate(window):
        h += tok * prime**i
    h = (h + 2**63) % 2**64 - 2**63  # int64 wrap-around
    return h % buckets  # Python's % is non-negative for positive buckets


def test_ngram_hash_matches_slow_reference():
    ids = random_ids(2, 25, seed=3)
    for n in (1, 3, 8):
        for prime in PRIMES[:3]:
            fast = ngram_hash(ids, n, prime, 50002)
            for b in range(2):
                row = ids[b].tolist()
                assert fast[b].tolist() == [slow_hash(row, t, n, prime, 50002) for t in range(len(row))]


def test_hash_embedding_matches_slow_reference():
    torch.manual_seed(0)
    sizes, buckets, funcs = [2, 3, 5], 31, 2
    emb = HashNgramEmbedding(16, sizes, buckets, funcs)
    ids = random_ids(1, 12, seed=7)
    out = emb(ids)
    row = ids[0].tolist()
    for t in range(12):
        ref = torch.zeros(16)
        table = 0
        for f in range(funcs):
            for n in sizes:
                ref += emb.embedding.weight[table * buckets + slow_hash(row, t, n, PRIMES[f], buckets)]
                table += 1
        torch.testing.assert_close(out[0, t], ref)


@pytest.mark.parametrize("T,window", [(40, 8), (37, 8), (64, 16), (20, 16)])
def test_sliding_window_attention_equals_dense_reference(T, window):
    from blt.model.attention import blocked_window_attention, causal_self_attention, sliding_window_mask

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 2, T, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = sliding_window_mask(T, window)[None].expand(2, T, T)
    for out in (causal_self_attention(q, k, v, window), blocked_window_attention(q, k, v, window)):
        ref = dense_attention(q, k, v, mask)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        w = torch.randn_like(out)
        for a, b in zip(
            torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))
        ):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sparse_hash_gradients_train_like_dense():
    """hash_sparse_grad changes how the tables are updated (lazy SparseAdam), not the model: same
    logits, same gradient norm, and one step moves the loss the same way."""
    from blt.config import OptimizerConfig
    from blt.train.optim import build_optimizer, clip_grad_norm

    x = random_ids(2, 24, seed=4)
    ids = torch.arange(24).div(3, rounding_mode="floor").expand(2, 24)
    losses, norms = {}, {}
    for sparse in (False, True):
        torch.manual_seed(0)
        model = BLT(tiny_model_cfg(hash_sparse_grad=sparse))
        opt = build_optimizer(model, OptimizerConfig(lr=1e-2))
        out = []
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(x, ids).flatten(0, 1), x.flatten())
            loss.backward()
            norms.setdefault(sparse, clip_grad_norm([p for p in model.parameters() if p.grad is not None], 1.0))
            opt.step()
            opt.zero_grad()
            out.append(float(loss.detach()))
        losses[sparse] = out
    assert losses[True][0] == pytest.approx(losses[False][0], abs=1e-6)
    assert norms[True] == pytest.approx(norms[False], rel=1e-5)
    assert losses[True][1] == pytest.approx(losses[False][1], abs=1e-3)  # first Adam step equal up to laziness
    assert losses[True][1] < losses[True][0]


def _as_multi_head(grouped: torch.nn.Module, heads: int) -> torch.nn.Module:
    """A copy of a Transformer whose attention is multi-head, each key/value head's weights repeated for
    its group of query heads: the oracle of grouped-query attention."""
    import copy

    from blt.model.layers import Transformer

    cfg = copy.deepcopy(grouped.cfg)
    cfg.kv_heads = None
    mha = Transformer(cfg, 1e-5, 10000.0)
    state = {}
    for name, w in grouped.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            kv, hd = w.shape[0] // (cfg.dim // heads), cfg.dim // heads
            w = w.view(kv, hd, -1).repeat_interleave(heads // kv, dim=0).reshape(cfg.dim, -1)
        state[name] = w
    mha.load_state_dict(state)
    return mha.eval()


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize(
    "attention",
    [{}, {"window": 8}, {"sparse": {"pattern": "bigbird", "block": 4}}, {"sparse": {"pattern": "local", "block": 4}}],
)
def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads(kv_heads, attention):
    """kv_heads of 4 heads (2: grouped, 1: multi-query), dense, windowed and sparse: the same outputs
    and input gradients as multi-head attention whose key/value weights repeat per group."""
    from blt.config import config_from_dict
    from blt.model.layers import Transformer

    section = {"dim": 32, "layers": 2, "heads": 4, "kv_heads": kv_heads, **attention}
    cfg = config_from_dict({"model": {"global_model": section}}).model.global_model
    torch.manual_seed(0)
    gqa = Transformer(cfg, 1e-5, 10000.0).eval()
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (kv_heads * 8, 32)
    mha = _as_multi_head(gqa, 4)
    x = torch.randn(2, 40, 32, requires_grad=True)
    out, ref = gqa(x), mha(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    (a,), (b,) = torch.autograd.grad((out * w).sum(), x), torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kv_heads_equal_to_heads_is_todays_multi_head_attention_bit_for_bit():
    """Existing checkpoints keep loading: kv_heads = heads builds the same weights and gives the same logits."""
    x = random_ids(2, 30, seed=1)
    ids = _patch_ids(2, 30, seed=2)
    outs = []
    for kv in (None, 2):
        torch.manual_seed(0)
        sections = {
            name: TransformerConfig(**{**vars(getattr(tiny_model_cfg(), name)), "kv_heads": kv})
            for name in ("encoder", "global_model", "decoder")
        }
        model = BLT(tiny_model_cfg(**sections)).eval()
        with torch.no_grad():
            outs.append((model.state_dict(), model(x, ids)))
    assert outs[0][0].keys() == outs[1][0].keys()
    assert all(torch.equal(outs[0][0][k], outs[1][0][k]) for k in outs[0][0])
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_a_grouped_query_blt_is_causal(kv_heads):
    torch.manual_seed(0)
    sections = {
        name: TransformerConfig(**{**vars(getattr(tiny_model_cfg(), name)), "heads": 4, "kv_heads": kv_heads})
        for name in ("encoder", "global_model", "decoder")
    }
    model = BLT(tiny_model_cfg(**sections)).eval()
    x, ids = random_ids(1, 36, seed=3), _patch_ids(1, 36, seed=4)
    with torch.no_grad():
        base = model(x, ids)
        for t in (3, 17, 35):
            y = x.clone()
            y[0, t] = OFFSET + 7
            assert torch.equal(model(y, ids)[0, :t], base[0, :t])


def test_kv_heads_that_do_not_divide_heads_are_refused_in_one_line():
    from blt.config import check_config, config_from_dict
    from blt.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        check_config(config_from_dict({"model": {"global_model": {"heads": 4, "kv_heads": 3}}}))
    assert "model.global_model.kv_heads (3) must divide model.global_model.heads (4)" in str(e.value)
    assert "\n" not in str(e.value)
