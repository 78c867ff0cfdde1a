"""Learned patching (patching.mode=learned): a router in the model cuts the patches, trained end to
end. Causality with boundaries that really moved, gradients reaching the router, the ratio loss
steering the mean patch size, cached generation equal to uncached, exact resume, and the places a
patching mode shows up (blt patch, metrics, exports, refusals)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from blt.config import config_from_dict
from blt.data import PAD_ID
from blt.generation import Generator
from blt.model import build_model
from blt.patching import Patcher, ratio_loss
from blt.tokens import encode

from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli

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


def test_export_carries_the_router_and_hf_export_refuses(tmp_path, capsys, cache_dir):
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        "train",
        CONFIGS / "tiny_learned.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        *TINY_BLT,
        "training.steps=4",
    )
    assert code == 0, err
    records = [m for m in read_metrics(run) if "loss" in m]
    assert all({"ratio_loss", "boundary_rate", "router_prob", "avg_patch_size"} <= set(m) for m in records)
    assert "entropy model" not in err  # nothing to train first, nothing to mention
    code, out, err = run_cli(capsys, "info", run)  # FLOPs at the patch size the run measured
    info, steps = json.loads(out), [m["avg_patch_size"] for m in records]
    assert info["measured_patch_size"] == pytest.approx(len(steps) / sum(1 / s for s in steps))
    assert info["assumed_patch_size"] == 4.0
    code, out, err = run_cli(capsys, "export", run, tmp_path / "exp")
    assert code == 0, err
    code, a, err = run_cli(capsys, "eval", run)
    code, b, err = run_cli(capsys, "eval", tmp_path / "exp")
    a, b = json.loads(a), json.loads(b)
    assert (a["bpb"], a["avg_patch_size"]) == (b["bpb"], b["avg_patch_size"])
    code, out, err = run_cli(capsys, "patch", tmp_path / "exp", "--text", "To be, or not to be", "--json")
    assert code == 0, err
    patches = json.loads(out)["patches"]
    assert "".join(p["text"] for p in patches) == "To be, or not to be"
    assert all(len(p["probabilities"]) == p["bytes"] and all(0 <= q <= 1 for q in p["probabilities"]) for p in patches)
    # a patch starts where the router says so (p >= 0.5) or where the one before reached max_patch_length
    for before, p in zip(patches[1:], patches[2:]):
        assert p["probabilities"][0] >= 0.5 or before["bytes"] == 12
    assert all(q < 0.5 for p in patches for q in p["probabilities"][1:])
    code, out, err = run_cli(capsys, "export", run, tmp_path / "hf", "--format", "hf")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "learned" in err and "patching.mode" in err
    assert not (tmp_path / "hf").exists()


def test_exact_resume_with_learned_patching(tmp_path, capsys, cache_dir):
    full, split = tmp_path / "full", tmp_path / "split"
    common = [
        "train",
        CONFIGS / "tiny_learned.yaml",
        f"data.cache_dir={cache_dir}",
        *TINY_BLT,
        "training.steps=8",
        "checkpoint.every=4",
        "schedule.warmup_steps=3",
    ]
    assert run_cli(capsys, *common, f"run_dir={full}")[0] == 0
    assert run_cli(capsys, *common, f"run_dir={split}", "training.steps=4")[0] == 0
    code, out, err = run_cli(capsys, *common, f"run_dir={split}")
    assert code == 0, err
    a = {m["step"]: m for m in read_metrics(full) if "loss" in m}
    b = {m["step"]: m for m in read_metrics(split) if "loss" in m}
    for s in (5, 6, 7, 8):
        for key in ("loss", "ratio_loss", "avg_patch_size"):
            assert a[s][key] == b[s][key], f"step {s} {key}: {a[s][key]} != {b[s][key]}"


@pytest.mark.parametrize(
    "override, words",
    [
        (["model.hf_compat=true", "patching.split_first_byte=true"], ["hf_compat", "learned"]),
        (["patching.threshold=1.5"], ["patching.threshold", "learned"]),
        (["patching.target_patch_size=1"], ["target_patch_size", "> 1"]),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(tmp_path, capsys, override, words):
    code, out, err = run_cli(capsys, "train", CONFIGS / "tiny_learned.yaml", f"run_dir={tmp_path / 'r'}", *override)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "r").exists()


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


def peak_run(args: list, tmp_path) -> tuple[int, str, str, float]:
    """Run `python ARGS` as a child; (exit code, stdout, stderr, its peak resident memory in GB)."""
    import os
    import subprocess
    import sys

    from badinput import ROOT

    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, *map(str, args)], stdout=o, stderr=e, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out.read_text(), err.read_text(errors="replace"), usage.ru_maxrss / 1e6  # KB on Linux


def test_smoothing_memory_is_linear_in_patches(tmp_path):
    """40,000 patches (a 160 KB row): one (P, P) float64 matrix would be 12.8 GB."""
    code, out, err, gb = peak_run(
        [
            "-c",
            "import torch; from blt.model.router import smooth_patches; "
            "print(smooth_patches(torch.randn(1, 40000, 8), torch.rand(1, 40000)).shape)",
        ],
        tmp_path,
    )
    assert code == 0 and "40000" in out, err
    assert gb < 1.5, f"peak memory {gb:.2f} GB"


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, cache_dir):
    """A tiny learned-patching BLT (data.seq_len 64) trained 1 step by the real CLI."""
    from badinput import run_blt

    run = tmp_path_factory.mktemp("learned") / "run"
    proc = run_blt(
        "train",
        CONFIGS / "tiny_learned.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        *TINY_BLT,
        "training.steps=1",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return run


def test_blt_patch_reads_a_long_file_in_windows_with_bounded_memory(learned_run, tmp_path, capsys):
    """`blt patch --text` of 120 KB tried to allocate 23.9 GB. Now `--file` reads the text, cut into
    windows of data.seq_len bytes as training reads it (each window starts a patch), within a
    bounded memory; the first window is patched as that text alone is."""
    text = (TEXT * 120)[:120_000]
    (tmp_path / "long.txt").write_bytes(text)
    code, out, err, gb = peak_run(
        ["-m", "blt", "patch", learned_run, "--file", tmp_path / "long.txt", "--json"], tmp_path
    )
    assert code == 0, err
    assert gb < 1.5, f"peak memory {gb:.2f} GB"
    found = json.loads(out)
    patches, window = found["patches"], found["window"]
    assert window == 64 and "".join(p["text"] for p in patches).encode() == text
    starts = set(itertools.accumulate([p["bytes"] for p in patches[:-1]], initial=0))  # BOS is position 0
    assert set(range(0, len(text) + 1, window)) <= starts
    code, out, err = run_cli(capsys, "patch", learned_run, "--text", text[: window - 1].decode(), "--json")
    alone = json.loads(out)["patches"]
    assert code == 0 and patches[: len(alone) - 1] == alone[:-1]  # its last patch may go on into window 2
