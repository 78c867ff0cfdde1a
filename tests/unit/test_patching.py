"""Patchers on hand-made inputs with known boundaries."""

import math

import pytest
import torch

from blt.config import PatchingConfig
from blt.data import BOS_ID, encode
from blt.patching import (
    entropy_from_logits,
    entropy_starts,
    limit_patch_length,
    patch_ids_from_starts,
    patch_lengths,
    patch_starts,
    space_starts,
    static_starts,
    threshold_for_patch_size,
)


def ids_of(data, bos=False) -> torch.Tensor:
    return torch.from_numpy(encode(data, bos=bos, eos=False).astype("int64"))[None]


def pieces(data: bytes, starts: torch.Tensor) -> list[bytes]:
    idx = torch.nonzero(starts[0]).flatten().tolist() + [len(data)]
    return [data[a:b] for a, b in zip(idx[:-1], idx[1:])]


def test_static():
    s = static_starts(torch.zeros(2, 10, dtype=torch.long), 4)
    assert patch_lengths(s) == [[4, 4, 2], [4, 4, 2]]
    assert patch_ids_from_starts(s)[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_space_ascii():
    text = b"hello world, how are you?"
    assert pieces(text, space_starts(ids_of(text))) == [b"hello ", b"world, ", b"how ", b"are ", b"you?"]


def test_space_multibyte_utf8_stays_inside_words():
    text = "héllo wörld 世界 ok".encode()
    got = pieces(text, space_starts(ids_of(text)))
    assert got == ["héllo ".encode(), "wörld ".encode(), "世界 ".encode(), b"ok"]
    for p in got:  # no multibyte character is cut
        p.decode("utf-8")


def test_space_invalid_bytes_are_just_bytes():
    text = b"ab\xff\xfe cd\x80"
    got = pieces(text, space_starts(ids_of(text)))
    assert got == [b"ab\xff\xfe ", b"cd\x80"]
    assert b"".join(got) == text


def test_entropy_global_and_monotonic():
    H = torch.tensor([[math.inf, 0.1, 2.0, 0.5, 0.4, 3.0, 2.9, 0.2]])
    assert entropy_starts(H, 1.0, "global")[0].tolist() == [1, 0, 1, 0, 0, 1, 1, 0]
    # monotonic: H_t - H_{t-1} > 1.0 at t=2 (1.9) and t=5 (2.6)
    assert entropy_starts(H, 1.0, "monotonic")[0].tolist() == [1, 0, 1, 0, 0, 1, 0, 0]


def test_max_patch_length_cuts_long_patches_greedily():
    s = torch.zeros(1, 11, dtype=torch.bool)
    s[0, 0] = s[0, 7] = True
    assert patch_lengths(limit_patch_length(s, 3)) == [[3, 3, 1, 3, 1]]
    assert patch_lengths(limit_patch_length(s, None)) == [[7, 4]]


def test_bos_always_starts_a_patch():
    ids = torch.cat([ids_of(b"abcdefg"), ids_of(b"xy", bos=True)], 1)
    cfg = PatchingConfig(mode="static", patch_size=5, max_patch_length=None)
    s = patch_starts(ids, cfg)
    assert s[0, 7] and ids[0, 7] == BOS_ID
    assert patch_lengths(s) == [[5, 2, 3]]


def test_entropy_alignment():
    # logits at t predict byte t+1, so H[:, t+1] is the entropy of logits[:, t]
    logits = torch.full((1, 3, 4), -1e9)
    logits[0, 0, 0] = 0  # certain -> entropy 0
    logits[0, 1] = 0  # uniform over 4 -> log 4
    H = entropy_from_logits(logits)
    assert H[0, 0] == math.inf
    assert abs(float(H[0, 1])) < 1e-6 and abs(float(H[0, 2]) - math.log(4)) < 1e-6


def test_threshold_for_target_patch_size():
    g = torch.Generator().manual_seed(0)
    H = torch.rand(4, 512, generator=g) * 3
    for target in (2.0, 4.0, 6.0):
        th = threshold_for_patch_size(H, target, "global", max_len=None)
        s = entropy_starts(H, th, "global")
        assert abs(s.numel() / float(s.sum()) - target) < 0.1 * target
    th = threshold_for_patch_size(H, 3.0, "monotonic", max_len=8)
    s = limit_patch_length(entropy_starts(H, th, "monotonic"), 8)
    assert abs(s.numel() / float(s.sum()) - 3.0) < 0.3


@pytest.mark.parametrize("mode", ["static", "space", "entropy"])
@pytest.mark.parametrize("threshold_mode", ["global", "monotonic"])
@pytest.mark.parametrize("max_len,split_first", [(None, False), (3, True), (16, False)])
def test_streaming_starts_equal_patch_starts(mode, threshold_mode, max_len, split_first):
    """Generation decides starts byte by byte; it must cut exactly where whole-sequence patching does."""
    from blt.patching import StreamingStarts

    cfg = PatchingConfig(
        mode=mode,
        patch_size=3,
        threshold=1.0 if threshold_mode == "global" else 0.1,
        threshold_mode=threshold_mode,
        max_patch_length=max_len,
        split_first_byte=split_first,
    )
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(4, 260, (3, 50), generator=g)
    toks[:, 0], toks[1, 20], toks[:, 5:8] = 1, 1, 32 + 4  # BOS, a BOS inside, spaces
    H = torch.rand(3, 50, generator=g) * 2
    H[:, 0] = math.inf
    ref = patch_starts(toks, cfg, H)
    for b in range(3):
        ss = StreamingStarts(cfg)
        assert [ss.push(int(toks[b, t]), float(H[b, t])) for t in range(50)] == ref[b].tolist()


def test_each_mode_says_what_its_signal_is_for_pictures_and_blt_patch():
    """`blt patch` names the signal (its JSON key) and states the rule; pictures label the curve and
    draw the threshold: all from the mode, the same words as before the modes owned them."""
    from blt.patching import Patcher

    learned = Patcher(PatchingConfig(mode="learned", target_patch_size=4.0)).signal
    assert (learned.key, learned.label, learned.threshold) == ("probabilities", "boundary probability (router)", 0.5)
    assert learned.rule == "a patch starts where the router's probability is >= 0.5"
    entropy = Patcher(PatchingConfig(mode="entropy", threshold=1.25)).signal
    assert (entropy.key, entropy.label) == ("entropies", "next-byte entropy (entropy model), nats")
    assert (entropy.threshold, entropy.rule) == (1.25, "threshold 1.250")
    static = Patcher(PatchingConfig(mode="static", patch_size=4)).signal
    assert (static.key, static.threshold, static.rule) == ("entropies", None, "")


@pytest.mark.parametrize("mode", ["static", "space", "entropy"])
def test_a_mode_without_a_router_runs_the_model_on_its_own_cut_and_adds_no_training_terms(mode):
    """The trainer calls Patcher.forward and training_terms for every mode: the model runs on the
    patcher's own cut and gives no Routing; there is no extra loss and no extra metric."""
    from blt.config import config_from_dict
    from blt.model import build_model
    from blt.patching import Patcher

    small = {"encoder": {"dim": 16, "heads": 2}, "global_model": {"dim": 32, "layers": 1, "heads": 2}}
    model_cfg = config_from_dict({"model": {**small, "decoder": {"dim": 16, "heads": 2}, "cross_attn_heads": 2}})
    torch.manual_seed(0)
    model = build_model(model_cfg.model, model_cfg.patching).eval()
    cfg = PatchingConfig(mode=mode, patch_size=3, threshold=1.0)
    tokens = ids_of(b"hello world, hello patches", bos=True)  # (1, T)
    H = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(0)) * 2  # (1, T) entropies
    patcher = Patcher(cfg)
    with torch.no_grad():
        logits, ids, routing = patcher.forward(model, tokens, H)
        want = patch_ids_from_starts(patch_starts(tokens, cfg, H))
        assert torch.equal(ids, want) and torch.equal(patcher.cut(tokens, H), want)
        assert torch.equal(logits, model(tokens, want))
    assert routing is None and patcher.training_terms(routing, tokens) == (None, {})
