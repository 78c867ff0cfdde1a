"""End to end from the CLI: the quick start, exact resume, and bad input that fails cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli


def blt_args(run, cache_dir, entropy_run, *extra):
    return [
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        f"patching.entropy_model={entropy_run}",
        *TINY_BLT,
        *extra,
    ]


def test_quick_start_train_eval_generate_patch(tmp_path, capsys, cache_dir, entropy_run):
    run = tmp_path / "tiny"
    code, out, err = run_cli(capsys, *blt_args(run, cache_dir, entropy_run, "training.steps=6"))
    assert code == 0, err
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").is_file()
    final = json.loads(out.strip().splitlines()[-1])
    assert final["step"] == 6 and 0 < final["bpb"] < 9
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    # the resolved config records the threshold derived for the target patch size
    resolved = (run / "config.yaml").read_text()
    assert "threshold: null" not in resolved

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York.\n")
    code, out, err = run_cli(capsys, "eval", run, "--data", held_out)
    assert code == 0, err
    result = json.loads(out)
    assert result["bytes"] == len(held_out.read_bytes()) and 0 < result["bpb"] < 9
    # shorter windows than training's (--seq-len): the same bytes scored, each window with less context
    code, out, err = run_cli(capsys, "eval", run, "--data", held_out, "--seq-len", "16")
    assert code == 0, err
    short = json.loads(out)
    assert short["seq_len"] == 16 and short["bytes"] == result["bytes"] and short["bpb"] != result["bpb"]

    code, out, err = run_cli(
        capsys,
        "generate",
        run,
        "--prompt",
        "ROMEO.",
        "--max-bytes",
        "40",
        "--seed",
        "3",
        "--temperature",
        "0.8",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
    )
    assert code == 0, err
    assert out.startswith("ROMEO.") and len(out.encode()) > len("ROMEO.")
    code, again, _ = run_cli(
        capsys,
        "generate",
        run,
        "--prompt",
        "ROMEO.",
        "--max-bytes",
        "40",
        "--seed",
        "3",
        "--temperature",
        "0.8",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
    )
    assert again == out  # same seed, same bytes

    code, out, err = run_cli(capsys, "patch", run, "--text", "To be, or not to be", "--json")
    assert code == 0, err
    patches = json.loads(out)["patches"]
    assert "".join(p["text"] for p in patches) == "To be, or not to be"
    assert all(len(p["entropies"]) == p["bytes"] for p in patches)


@pytest.mark.parametrize("sparse", [False, True])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, capsys, cache_dir, entropy_run, sparse):
    full, split = tmp_path / "full", tmp_path / "split"
    common = [
        "training.steps=8",
        "checkpoint.every=4",
        "schedule.warmup_steps=3",
        "model.dropout=0.1",
        f"model.hash_sparse_grad={str(sparse).lower()}",
    ]
    assert run_cli(capsys, *blt_args(full, cache_dir, entropy_run, *common))[0] == 0
    # stop after 4 steps (as if killed after the step-4 checkpoint), then resume with the full config
    assert run_cli(capsys, *blt_args(split, cache_dir, entropy_run, *common, "training.steps=4"))[0] == 0
    state = json.loads((split / "checkpoints" / "step_00000004" / "state.json").read_text())
    code, _, err = run_cli(capsys, *blt_args(split, cache_dir, entropy_run, *common))
    assert code == 0, err
    assert "resumed" in err + _
    a = {m["step"]: m["loss"] for m in read_metrics(full) if "loss" in m}
    b = {m["step"]: m["loss"] for m in read_metrics(split) if "loss" in m}
    for s in (5, 6, 7, 8):
        assert a[s] == b[s], f"step {s}: {a[s]} != {b[s]}"
    assert state["data"]["position"] > 0


def test_byte_lm_baseline_trains(tmp_path, capsys, cache_dir):
    run = tmp_path / "baseline"
    code, out, err = run_cli(
        capsys,
        "train",
        CONFIGS / "byte_baseline_tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        "training.steps=3",
        "model.lm.dim=32",
        "model.lm.heads=2",
        "model.lm.layers=1",
        "data.seq_len=64",
        "training.batch_size=4",
        "eval.max_bytes=1024",
        "logging.progress=false",
        "training.max_minutes=null",
    )
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["step"] == 3


# ----------------------------------------------------------------------------- bad input


def one_line_error(code, err, *words):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("blt ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]


def test_config_typo_and_wrong_type(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", CONFIGS / "tiny.yaml", "training.stepz=3")
    one_line_error(code, err, "training.stepz", "training.steps")
    code, _, err = run_cli(capsys, "train", CONFIGS / "tiny.yaml", "training.steps=many")
    one_line_error(code, err, "training.steps", "int")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  encoder: {dimm: 3}\n")
    code, _, err = run_cli(capsys, "train", bad)
    one_line_error(code, err, "model.encoder.dimm", "model.encoder.dim")
    code, _, err = run_cli(capsys, "train", tmp_path / "nope.yaml")
    one_line_error(code, err, "nope.yaml", "not found")


def test_missing_empty_and_binary_corpus(tmp_path, capsys, cache_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    for path, word in ((tmp_path / "missing.txt", "missing.txt"), (empty, "empty.txt"), (binary, "blob.txt")):
        run = tmp_path / f"run_{path.stem}"
        code, _, err = run_cli(
            capsys,
            "train",
            CONFIGS / "byte_baseline_tiny.yaml",
            f"run_dir={run}",
            f"data.train=[{path}]",
            f"data.cache_dir={cache_dir}",
            "logging.progress=false",
        )
        one_line_error(code, err, word)


def test_checkpoint_that_does_not_match_the_config(tmp_path, capsys, cache_dir, entropy_run):
    # the entropy model is a byte_lm with lm.dim=32; ask for another size and resume from it
    code, _, err = run_cli(
        capsys,
        "train",
        CONFIGS / "entropy_tiny.yaml",
        f"run_dir={entropy_run}",
        f"data.cache_dir={cache_dir}",
        "model.lm.dim=64",
        "logging.progress=false",
    )
    one_line_error(code, err, "model.lm", "trained with")


def test_unwritable_run_dir_and_no_overwrite(tmp_path, capsys, cache_dir, entropy_run):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, *blt_args(blocker / "run", cache_dir, entropy_run, "training.steps=1"))
    one_line_error(code, err, "not writable")
    # a run with checkpoints is never overwritten by a fresh start
    before = {p: p.stat().st_mtime_ns for p in (entropy_run / "checkpoints").rglob("*") if p.is_file()}
    code, _, err = run_cli(
        capsys,
        "train",
        CONFIGS / "entropy_tiny.yaml",
        f"run_dir={entropy_run}",
        f"data.cache_dir={cache_dir}",
        "checkpoint.resume=none",
        "logging.progress=false",
    )
    one_line_error(code, err, "already holds checkpoints")
    after = {p: p.stat().st_mtime_ns for p in (entropy_run / "checkpoints").rglob("*") if p.is_file()}
    assert before == after


def test_console_script_runs(tmp_path):
    """The installed `blt` entry point (not just main()) answers."""
    exe = Path(sys.executable).with_name("blt")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "blt"]
    out = subprocess.run(
        [*cmd, "info", str(CONFIGS / "tiny.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(CONFIGS.parent)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["params"] > 0 and 0 < info["global_share"] < 1


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, cache_dir, entropy_run):
    """A preempted job (SIGTERM) finishes its step, checkpoints, exits 0; rerunning continues it."""
    import signal
    import time

    run = tmp_path / "preempted"
    args = [
        sys.executable,
        "-m",
        "blt",
        *map(
            str,
            blt_args(
                run, cache_dir, entropy_run, "training.steps=100000", "checkpoint.every=100000", "training.threads=1"
            ),
        ),
    ]
    env = {**os.environ, "PYTHONPATH": str(CONFIGS.parent)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and "resume" in err
    saved = json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "state.json").read_text())
    stopped_at = saved["step"]
    assert 3 <= stopped_at < 100000
    # rerun the same command with a reachable end: it continues from the saved step
    args[args.index("training.steps=100000")] = f"training.steps={stopped_at + 2}"
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"at step {stopped_at}" in done.stderr
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]
