"""training.compile: torch.compile applied to every Transformer block from outside the model gives
eager's losses, and a compiled run resumes exactly (under ZeRO-3: test_distributed.py); and the GPU
script's dry run. (Compiled generation: test_generate.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from badinput import run_blt
from conftest import CONFIGS, ROOT, TINY_BLT, read_metrics

slow = pytest.mark.slow


def train(run, cache_dir, *extra, env=None) -> dict[int, float]:
    out = run_blt(
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        "patching.mode=static",
        *TINY_BLT,
        "training.steps=4",
        "checkpoint.every=2",
        "checkpoint.keep_last=5",
        *extra,
        env=env,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


@slow
def test_compiled_training_matches_eager_and_resumes_exactly(tmp_path, cache_dir):
    eager = train(tmp_path / "eager", cache_dir)
    run, kernels = tmp_path / "compiled", tmp_path / "inductor"
    compiled = train(run, cache_dir, "training.compile=true", env={"TORCHINDUCTOR_CACHE_DIR": str(kernels)})
    assert sorted(compiled) == [1, 2, 3, 4]
    assert any(kernels.rglob("*.py")), "inductor generated no code: the blocks ran eagerly"
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], abs=1e-5), step
    assert "compile: true" in (run / "config.yaml").read_text()

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    again = {"TORCHINDUCTOR_CACHE_DIR": str(kernels)}  # the first run's kernels: the resume need not compile anew
    assert train(resumed, cache_dir, "training.compile=true", env=again) == compiled


@slow
def test_the_gpu_script_dry_run_runs_every_part(tmp_path):
    """bench/gpu.py --dry-run: the GPU script's every part on CPU at toy sizes, so it cannot rot
    between the rare GPU runs; only what cannot run on a CPU (FlexAttention's backward) is skipped."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    rows = [r for part in report["parts"].values() for r in part]
    assert set(report["parts"]) == {"correctness", "zero2", "train", "generation"}
    skipped = [r["case"] for r in rows if r["ok"] is None]
    assert skipped and all("flex" in case for case in skipped), skipped
    assert all(r["ok"] for r in rows if r["ok"] is not None)
    assert sum(r["ok"] is True for r in report["parts"]["correctness"]) == 6  # 3 patching modes x gather, dense
    train = {r["case"]: r for r in report["parts"]["train"]}
    assert train["toy: compiled"]["bytes_per_s"] > 0 and train["toy: compiled"]["peak_mem_gb"] > 0
    gen = {r["case"]: r for r in report["parts"]["generation"]}
    assert gen["generation, batch 8, compiled"]["compiled_steps"] > 0
    assert "| train | toy: windowed SDPA | yes |" in out.stdout  # the table
