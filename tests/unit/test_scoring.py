"""Scoring lm-eval requests (blt/harness/scoring.py) on tiny random models, in process: the
log-likelihoods against the model's own full forward for every patching mode, greedy as its argmax, a
shared context encoded once with the same numbers, batch-size invariance, long continuations, and a
batch too large to fit."""

from __future__ import annotations

import math

import pytest
import torch

from blt.generation import Generator
from blt.harness.scoring import BatchTooLargeError, Scorer, continuation_pieces
from blt.tokens import BOS_ID, EOS_ID, OFFSET

from random_models import random_scorer

MODES = [
    ("static", False),
    ("space", False),
    ("entropy", False),
    ("static", True),
    ("entropy", True),
    ("learned", False),
]


REQUESTS = [
    (b"The cat sat on", b" the mat"),
    (b"", b"hello"),
    (b"ab", b"c"),
    (b"x" * 70, b" y z"),
    ("caf\u00e9 ".encode(), "cr\u00e8me".encode()),
]


def close(value: float):
    """Equal as float32 sums of the same terms in another order are (how a CPU's kernels add varies):
    1e-5 absolute, or 1e-6 relative for a log-likelihood of tens of nats."""
    return pytest.approx(value, rel=1e-6, abs=1e-5)


def full_forward(scorer: Scorer, context: bytes, continuation: bytes) -> tuple[float, bool]:
    """The reference: the whole text in one unpadded forward, its last `context` bytes if longer."""
    ids = torch.tensor([[BOS_ID] + [b + OFFSET for b in context + continuation]])[:, -scorer.context :]
    with torch.no_grad():
        logits = scorer.patcher.forward(scorer.model, ids)[0][0].float()  # (T, V)
    logp = torch.log_softmax(logits, -1)
    n, T = len(continuation), ids.shape[1]
    allowed = logits.clone()
    allowed[:, :OFFSET] = float("-inf")
    allowed[:, EOS_ID] = logits[:, EOS_ID]
    total = sum(float(logp[t - 1, ids[0, t]]) for t in range(T - n, T))
    return total, all(int(allowed[t - 1].argmax()) == int(ids[0, t]) for t in range(T - n, T))


@pytest.mark.parametrize("mode,hf", MODES)
def test_loglikelihood_is_the_full_forward_sum_and_greedy_its_argmax(mode, hf):
    scorer = random_scorer(mode, hf)
    gen = Generator(scorer.model, scorer.patcher, scorer.context)
    greedy = gen.generate([b"The cat", b"ab"], max_bytes=6, temperature=0)  # continuations greedy decoding makes
    requests = REQUESTS + [(b"The cat", greedy[0]), (b"ab", greedy[1])]
    got = scorer.loglikelihood(requests)
    for (ctx, cont), (logp, is_greedy) in zip(requests, got):
        ref, ref_greedy = full_forward(scorer, ctx, cont)
        assert logp == close(ref), (ctx, cont)
        assert is_greedy == ref_greedy, (ctx, cont)
    if not hf:  # an HF-compatible byte reads the patch its next byte closes: scoring reads that next
        assert got[-2][1] and got[-1][1]  # byte's start, as training does; generation cannot, as in HF
    assert not all(g for _, g in got[: len(REQUESTS)])


@pytest.mark.parametrize("mode", ["static", "space", "entropy", "learned"])
def test_a_shared_context_is_encoded_once_with_the_full_forward_numbers(mode):
    scorer = random_scorer(mode, batch_size=2)  # 2 contexts per cached state: several states, ragged
    contexts = [b"The cat sat on", b"x" * 40, "caf\u00e9 cr".encode(), b"abcd"]
    greedy = Generator(scorer.model, scorer.patcher, scorer.context).generate(contexts, max_bytes=4, temperature=0)
    choices = [
        [b" the mat, then", b" a", "\u00e9t\u00e9".encode()],
        [b" y z", b"q", b"hello there"],
        ["\u00e8me".encode(), b"ux"],
        [b"e", b"\xe2\x82\xac"],
    ]
    requests = [(c, k) for c, ks, g in zip(contexts, choices, greedy) for k in [*ks, g]]
    requests += [(b"ab", b"c"), (b"", b"hi"), (b"ab", b"long continuation")]  # not shared: one, or too long
    got = scorer.loglikelihood(requests)
    assert scorer.shared == len(requests) - 3
    for (ctx, cont), (logp, is_greedy) in zip(requests, got):
        ref, ref_greedy = full_forward(scorer, ctx, cont)
        assert logp == close(ref), (ctx, cont)
        assert is_greedy == ref_greedy, (ctx, cont)
    assert all(hit for r, (_, hit) in zip(requests, got) if r in zip(contexts, greedy))  # greedy's continuations
    assert not all(g for _, g in got)
    off = Scorer(scorer.model, scorer.patcher, scorer.context, 2, share_context=False)
    assert off.loglikelihood(requests) == [close(v) for v in got] and off.shared == 0
    hf = random_scorer(mode if mode not in ("space", "learned") else "static", hf=True)
    assert not hf.share_context and hf.loglikelihood(requests[:3]) and hf.shared == 0  # HF-compatible: full forwards


def test_batch_size_does_not_change_the_numbers():
    one, many = random_scorer("entropy", batch_size=1), random_scorer("entropy", batch_size=16)
    docs = [b"To be, or not to be: that is the question." * 4, b"short", "\u00e9t\u00e9".encode()]
    assert [v for v, _ in one.loglikelihood(REQUESTS)] == pytest.approx(
        [v for v, _ in many.loglikelihood(REQUESTS)], abs=1e-5
    )
    assert one.rolling(docs) == pytest.approx(many.rolling(docs), abs=1e-5)
    assert one.forwards > many.forwards


def test_a_continuation_longer_than_the_context_is_scored_byte_by_byte_once():
    cont = bytes(range(40, 140))
    pieces = continuation_pieces(0, b"context", cont, width=32)
    scored = [t for p in pieces for t in p.targets if t >= 0]
    assert sorted(scored) == sorted(b + OFFSET for b in cont) and all(len(p.ids) <= 32 for p in pieces)
    value, _ = random_scorer("static", context=32).loglikelihood([(b"context", cont)])[0]
    assert math.isfinite(value) and value < 0


def test_a_batch_that_does_not_fit_says_so_in_one_line():
    scorer = random_scorer("static")

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    scorer.model.forward = oom
    with pytest.raises(BatchTooLargeError, match="does not fit in cpu memory; use a smaller batch size"):
        scorer.loglikelihood(REQUESTS)


@pytest.mark.parametrize("mode,hf", [("entropy", False), ("static", True)])
def test_generate_until_gives_the_generators_bytes_in_every_mode_of_the_harness(mode, hf):
    """lm-eval's generate_until is the same loop as `blt generate`: the Generator's bytes for each
    context, cut before the stop string, sampled with the same seed; also uncached and in lockstep
    with other ranks (ZeRO-3: a `sync` that says another rank has more rows left)."""
    scorer = random_scorer(mode, hf, context=32)
    contexts, until = [b"The cat", b"", b"ab" * 30], [b"e"]
    gen = Generator(scorer.model, scorer.patcher, scorer.context)
    for opts in (dict(temperature=0.0), dict(temperature=0.8, seed=4)):
        want = [o.split(b"e")[0] for o in gen.generate(contexts, max_bytes=40, stop=until, **opts)]
        assert scorer.generate(contexts, until, 40, **opts) == want
        assert len(set(want)) == len(want)
    alone = Scorer(scorer.model, scorer.patcher, scorer.context, cached=False)
    lockstep = Scorer(scorer.model, scorer.patcher, scorer.context, cached=False, sync=lambda n: n + 1 if n else 0)
    want = [o.split(b"e")[0] for o in gen.generate(contexts, max_bytes=40, stop=until, temperature=0, cache=False)]
    assert alone.generate(contexts, until, 40) == lockstep.generate(contexts, until, 40) == want
    assert lockstep.forwards > alone.forwards  # padding forwards kept it in step with the other rank
