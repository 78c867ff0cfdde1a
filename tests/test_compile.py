"""training.compile: torch.compile applied to every Transformer block from outside the model gives
eager's losses, and a compiled run resumes exactly. (Under ZeRO-3: test_distributed.py.)"""

from __future__ import annotations

import shutil

import pytest

from badinput import run_blt
from conftest import CONFIGS, TINY_BLT, read_metrics

slow = pytest.mark.slow


def train(run, cache_dir, *extra, env=None) -> dict[int, float]:
    out = run_blt("train", CONFIGS / "tiny.yaml", f"run_dir={run}", f"data.cache_dir={cache_dir}",
                  "patching.mode=static", *TINY_BLT, "training.steps=4", "checkpoint.every=2",
                  "checkpoint.keep_last=5", *extra, env=env)
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
    assert train(resumed, cache_dir, "training.compile=true") == compiled
