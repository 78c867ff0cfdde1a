"""Learned patching's math, in process on small models: causality with boundaries that really moved,
gradients of the LM loss and the ratio loss reaching the router, the ratio loss steering the mean
patch size, cached generation equal to uncached, and the smoothing done in blocks equal to one
matmul and to the recurrence. (Through the CLI: tests/e2e/test_learned.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blt.config import config_from_dict
from blt.data import PAD_ID
from blt.generation import Generator
from blt.model import build_model
from blt.patching import Patcher, ratio_loss
from blt.tokens import encode

TEXT = (
    b"The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    b"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. "
) * 6


def small_config(**patching):
    return config_from_dict(
        {
            "model": {
                "encoder": {"dim": 32, "layers": 1, "heads": 2, "window": 32},
                "global_model": {"dim": 48, "layers": 2, "heads": 2},
                "decoder": {"dim": 32, "layers": 1, "heads": 2, "window": 32},
                "cross_attn_heads": 2,
                "hash_buckets": 256,
                "hash_ngram_sizes": [3, 4],
            },
            "patching": {"mode": "learned", "target_patch_size": 4.0, "max_patch_length": 12, **patching},
            "data": {"seq_len": 96},
        }
    )


def batches(n: int, T: int = 96, B: int = 4, seed: int = 0):
    ids = torch.from_numpy(encode(TEXT, bos=True, eos=False).astype("int64"))
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        at = torch.randint(0, len(ids) - T - 1, (B,), generator=g)
        yield torch.stack([ids[a : a + T + 1] for a in at.tolist()])


def train(model, cfg, steps: int, lr: float = 3e-3, seed: int = 0) -> list[dict]:
    """A plain training loop: LM loss + weight x ratio loss, as the trainer computes it."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    log = []
    for batch in batches(steps, seed=seed):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, routing = model(inputs, None, routing=True)
        lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD_ID)
        rl, frac, _ = ratio_loss(routing.probs, routing.starts, inputs != PAD_ID, cfg.patching.target_patch_size)
        (lm + cfg.patching.ratio_loss_weight * rl).backward()
        opt.step()
        opt.zero_grad()
        log.append({"lm": float(lm.detach()), "ratio": float(rl.detach()), "patch_size": 1 / float(frac)})
    model.eval()
    return log


@pytest.fixture(scope="module")
def trained():
    """A small learned-patching BLT trained 25 steps, with the starts of a fixed text before and after."""
    cfg = small_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.patching)
    x = next(batches(1, seed=7))[:, :-1]
    with torch.no_grad():
        before = model.eval()(x, None, routing=True)[1].starts
    train(model, cfg, 25)
    with torch.no_grad():
        after = model(x, None, routing=True)[1].starts
    return cfg, model, before, after, x


def test_boundaries_move_and_the_model_stays_causal(trained):
    cfg, model, before, after, x = trained
    assert (before != after).any(), "training did not move a single boundary"
    with torch.no_grad():
        ref = model(x)
        for t in (5, 17, 40, 77, 95):
            y = x.clone()
            y[:, t] = (y[:, t] - 4 + 37) % 256 + 4  # another byte at t
            logits, routing = model(y, None, routing=True)
            assert torch.equal(logits[:, :t], ref[:, :t]), f"changing byte {t} changed logits before it"
            assert torch.equal(routing.starts[:, :t], after[:, :t])  # and no start before it
            assert not torch.equal(logits[:, t:], ref[:, t:])


def test_the_lm_loss_and_the_ratio_loss_both_reach_the_router():
    cfg = small_config()
    torch.manual_seed(1)
    model = build_model(cfg.model, cfg.patching)
    x = next(batches(1))
    inputs, targets = x[:, :-1], x[:, 1:]
    logits, routing = model(inputs, None, routing=True)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    lm_grad = model.router.q_proj.weight.grad.abs().sum()
    assert lm_grad > 0 and model.router.k_proj.weight.grad.abs().sum() > 0  # the gate and the smoothing
    model.zero_grad()
    _, routing = model(inputs, None, routing=True)
    ratio_loss(routing.probs, routing.starts, inputs != PAD_ID, 4.0)[0].backward()
    assert model.router.q_proj.weight.grad.abs().sum() > 0


def test_the_mode_gives_the_trainer_its_weighted_ratio_loss_and_its_metrics():
    """What the trainer adds for learned patching, from Patcher.forward and Patcher.training_terms:
    ratio_loss_weight x the ratio loss over real bytes (with gradient to the router), and the three
    metrics metrics.jsonl logs, by name, without gradient."""
    cfg = small_config(ratio_loss_weight=0.25)
    torch.manual_seed(1)
    model = build_model(cfg.model, cfg.patching)
    patcher = Patcher(cfg.patching)
    inputs = next(batches(1))[:, :-1].clone()
    inputs[0, -20:] = PAD_ID  # padding is no real byte
    logits, ids, routing = patcher.forward(model, inputs)
    assert torch.equal(ids, routing.patch_ids) and patcher.cut(inputs) is None  # the router cut them
    extra, metrics = patcher.training_terms(routing, inputs)
    real = inputs != PAD_ID
    rl, _, mean_prob = ratio_loss(routing.probs, routing.starts, real, 4.0)
    assert torch.equal(extra, 0.25 * rl)
    assert list(metrics) == ["ratio_loss", "boundary_rate", "router_prob"]
    assert not any(v.requires_grad for v in metrics.values())
    assert (float(metrics["ratio_loss"]), float(metrics["router_prob"])) == (
        float(rl.detach()),
        float(mean_prob.detach()),
    )
    assert float(metrics["boundary_rate"]) == float((routing.router_starts & real).sum() / real.sum())
    extra.backward()
    assert model.router.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("target", [2.0, 8.0])
def test_the_ratio_loss_moves_the_mean_patch_size_to_the_target(target):
    cfg = small_config(target_patch_size=target, ratio_loss_weight=1.0, max_patch_length=None)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.patching)
    log = train(model, cfg, 40, lr=1e-2)
    first, last = log[0]["patch_size"], sum(r["patch_size"] for r in log[-5:]) / 5
    assert abs(last - target) < abs(first - target) / 2, (first, last)


def test_cached_generation_equals_uncached_also_from_mid_patch_prompts(trained):
    cfg, model, *_ = trained
    prompts = [b"To be, or not to b", b"The quick brown fox ju", b"A stitch in", b"whether 'tis nobler in the m"]
    # at least one prompt ends inside a patch (its last byte is not a patch start)
    ends = []
    for p in prompts:
        ids = torch.from_numpy(encode(p, bos=True, eos=False).astype("int64"))[None]
        with torch.no_grad():
            ends.append(bool(model(ids, None, routing=True)[1].starts[0, -1]))
    assert not all(ends)
    gen = Generator(model, Patcher(cfg.patching), 96)
    cached = gen.generate(prompts, max_bytes=70, temperature=0, seed=0)  # past the context: restarts too
    assert gen.stats["global_patches"] > 0
    uncached = gen.generate(prompts, max_bytes=70, temperature=0, seed=0, cache=False)
    assert cached == uncached
    one = [gen.generate([p], max_bytes=70, temperature=0, seed=0)[0] for p in prompts]  # batch of 1 each
    assert one == cached


def test_smoothing_in_blocks_equals_one_matmul_and_the_recurrence():
    """smooth_patches cuts a long row into blocks (memory linear in patches): the same states and
    gradients as one matmul over the row, and as smooth_step applied patch by patch (generation)."""
    from blt.model.router import smooth_patches, smooth_step

    torch.manual_seed(0)
    g = torch.randn(2, 70, 8, requires_grad=True)  # (B, P, Dg) patch-level
    P = torch.rand(2, 70)
    P[:, 0], P[0, 9], P[1, 33] = 1.0, 1.0, 0.0  # a first patch, a reset, a patch kept whole
    P.requires_grad_()
    one = smooth_patches(g, P)  # 70 patches: one block, the single matmul
    blocks = smooth_patches(g, P, block=16)  # 5 blocks, each starting from the one before
    state, steps = torch.zeros(2, 8), []
    for j in range(70):
        state = smooth_step(g[:, j], P[:, j], state)
        steps.append(state)
    torch.testing.assert_close(blocks, one)
    torch.testing.assert_close(torch.stack(steps, 1), one)
    grads = [torch.autograd.grad((s * torch.arange(8.0)).sum(), (g, P)) for s in (one, blocks)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
