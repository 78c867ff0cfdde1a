"""Learned patching (patching.mode=learned) through the command line: export carries the router
and HF export refuses it, exact resume, combinations that cannot work refused in one line, the
smoothing's memory linear in patches, and `blt patch --file` on a long text. (The math, in process:
tests/unit/test_learned.py.)"""

from __future__ import annotations

import itertools
import json

import pytest

from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli

TEXT = (
    b"The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    b"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. "
) * 6


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
    code, out, err = run_cli(capsys, "patch", tmp_path / "exp", "--text", "To be, or not to be")
    assert code == 0 and "(learned, a patch starts where the router's probability is >= 0.5);" in out, err
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
