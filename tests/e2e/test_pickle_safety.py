"""A shared or downloaded checkpoint never runs code on the machine that loads it: every loader
entry point (eval, generate, patch, export, consolidate, training.init_from,
patching.entropy_model, resume with either engine) refuses a malicious pickle with one line, and
its payload never runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from badinput import assert_user_error, run_blt
from conftest import CONFIGS, TINY_BLT

ROOT = CONFIGS.parent


class Payload:
    """Unpickling this runs `touch marker`: what an attacker would put in a .pt file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def plant(path: Path, marker: Path, wrap=lambda p: {"module": p}) -> None:
    torch.save(wrap(Payload(marker)), path)


@pytest.fixture
def evil(static_run, tmp_path) -> tuple[Path, Path]:
    """A run dir as the issue found it: a complete-looking ZeRO checkpoint (state.json,
    config.yaml, no model.safetensors, an empty optimizer shard) whose model shard is a malicious
    pickle. Returns (run dir, marker the payload would create)."""
    src = static_run / "checkpoints" / "step_00000002"
    step = tmp_path / "evil" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    for name in ("state.json", "config.yaml"):
        shutil.copy(src / name, step / name)
    (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    marker = tmp_path / "PAYLOAD_RAN"
    plant(step / "mp_rank_00_model_states.pt", marker)
    return step.parent.parent, marker


def test_the_payload_is_live(evil):
    """The planted file really runs code when unpickled the way DeepSpeed's own loader does."""
    run, marker = evil
    code = "import torch, sys; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run(
        [sys.executable, "-c", code, str(run / "checkpoints/step_00000002/mp_rank_00_model_states.pt")],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert marker.exists()


@pytest.mark.parametrize("verb", ["eval", "generate", "patch", "export", "consolidate"])
def test_loaders_refuse_a_malicious_zero_shard(evil, tmp_path, verb):
    run, marker = evil
    extra = {"generate": ["--max-bytes", "4"], "patch": ["--text", "hi"], "export": [tmp_path / "out"]}
    line = assert_user_error([verb, run, *extra.get(verb, [])], watch=[run], contains="was not loaded")
    assert "mp_rank_00_model_states.pt" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["training.init_from", "patching.entropy_model"])
def test_training_refuses_a_malicious_source_model(evil, tmp_path, cache_dir, key):
    run, marker = evil
    mode = ["patching.mode=entropy"] if key == "patching.entropy_model" else ["patching.mode=static"]
    out = run_blt(
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={tmp_path / 'new'}",
        f"data.cache_dir={cache_dir}",
        *TINY_BLT,
        *mode,
        "training.steps=1",
        f"{key}={run}",
    )
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert "Traceback" not in err and "was not loaded" in err.splitlines()[-1], err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_resume_refuses_a_malicious_local_checkpoint(static_run, tmp_path, cache_dir, name):
    run = tmp_path / "run"
    shutil.copytree(static_run, run)
    marker = tmp_path / "PAYLOAD_RAN"
    plant(run / "checkpoints" / "step_00000002" / name, marker, wrap=lambda p: {"state": p})
    out = run_blt(
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        "patching.mode=static",
        *TINY_BLT,
        "training.steps=4",
    )
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert "Traceback" not in err and name in err.splitlines()[-1] and "was not loaded" in err, err
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_resume_refuses_a_malicious_shard(tmp_path, cache_dir):
    """A 2-process ZeRO-2 job resuming a checkpoint whose shard was replaced: every rank refuses."""
    from blt.net import free_port

    run = tmp_path / "run"
    args = [
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        "patching.mode=static",
        *TINY_BLT,
        "training.batch_size=2",
        "model.hash_sparse_grad=false",
        "distributed.zero_stage=2",
    ]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def launch(*extra):
        return subprocess.run(
            ["bash", str(ROOT / "launch" / "torchrun.sh"), str(CONFIGS / "tiny.yaml"), *args, *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env={**env, "MASTER_PORT": str(free_port())},
        )

    first = launch("training.steps=2")
    assert first.returncode == 0, first.stderr
    marker = tmp_path / "PAYLOAD_RAN"
    plant(run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", marker)
    again = launch("training.steps=4")
    assert again.returncode != 0
    errors = [ln for ln in again.stderr.splitlines() if ": error: " in ln]
    assert errors and all("mp_rank_00_model_states.pt" in ln and "was not loaded" in ln for ln in errors), again.stderr
    # torchrun reports a failed child with its own traceback; none comes from blt's code
    assert f'File "{ROOT / "blt"}' not in again.stderr, again.stderr
    assert not marker.exists()
