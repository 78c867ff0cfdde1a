"""launch/slurm.sbatch on a real one-node SLURM cluster (tests/slurm/cluster.sh: munged, slurmctld and
slurmd, 2 CPUs): a job trains with 2 processes (srun + torchrun over gloo), and a job requeued mid-run
checkpoints on SLURM's SIGTERM, starts again, resumes and ends exactly where the uninterrupted job ends.

Needs root and Debian's slurm-wlm: `bash tests/slurm/cluster.sh install` (skipped without it, failed
with BLT_REQUIRE_SLURM=1)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import _last_step, dist_args, final_val, losses, trace

from blt.net import free_port

from conftest import CONFIGS

ROOT = CONFIGS.parent
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SLURM_DIR = Path(os.environ.get("BLT_SLURM_DIR", "/tmp/blt-slurm"))
pytestmark = pytest.mark.slow

STEPS = 120  # both jobs; ~25 ms a step, so the requeued job is still training when the requeue lands
# only the stop and the end save: a checkpoint every 4 steps (dist_args) would cost more than training
TRAIN = [f"training.steps={STEPS}", "checkpoint.every=100000"]
DONE = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


@pytest.fixture(scope="module")
def slurm() -> dict:
    """Starts the cluster for this module and always stops it; the environment for its commands."""
    missing = [
        b
        for b in ("slurmctld", "slurmd", "munged", "sbatch")
        if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    ]
    why = None
    if missing:
        why = f"SLURM is not installed ({', '.join(missing)} missing); run: bash tests/slurm/cluster.sh install"
    elif os.geteuid() != 0:
        why = "the test SLURM cluster needs root (SlurmUser=root)"
    if why:
        if os.environ.get("BLT_REQUIRE_SLURM") == "1":
            pytest.fail(f"BLT_REQUIRE_SLURM=1: {why}")
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=str(SLURM_DIR / "slurm.conf"), BLT_SLURM_DIR=str(SLURM_DIR))
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    try:
        up = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, env=env, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True, env=env, timeout=120)


def submit(slurm: dict, submit_dir: Path, args: list[str]) -> int:
    """sbatch launch/slurm.sbatch from submit_dir; the job id. The command line overrides the script's
    GPU-cluster header: one node, 2 CPUs and no GPUs (there are none), so launch/common.sh starts 2 CPU
    processes. The script's own header keeps the log of a requeued job (--open-mode=append)."""
    env = {
        **slurm,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "BLT_ROOT": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(free_port()),
    }
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--cpus-per-task=2",
            "--gpus-per-node=0",
            str(ROOT / "launch" / "slurm.sbatch"),
            str(CONFIGS / "tiny.yaml"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=submit_dir,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().split(";")[0])


def job(slurm: dict, job_id: int) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, env=slurm, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_done(slurm: dict, job_id: int, timeout: float = 240, restarts: int = 0) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(slurm, job_id)
        if info["JobState"] in DONE and int(info["Restarts"]) >= restarts:
            return info
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s")


def log_of(submit_dir: Path, job_id: int) -> str:
    """The job's output, where the script's header puts it: blt-<job name>-<job id>.out in the submit dir."""
    path = submit_dir / f"blt-blt-{job_id}.out"
    assert path.exists(), sorted(p.name for p in submit_dir.iterdir())
    return path.read_text()


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory, cache_dir, entropy_run) -> tuple[Path, int, dict, str]:
    """An uninterrupted job: (run dir, job id, its scontrol record, its log)."""
    submit_dir = tmp_path_factory.mktemp("slurm_reference")
    run = submit_dir / "run"
    job_id = submit(slurm, submit_dir, dist_args(run, cache_dir, entropy_run, *TRAIN))
    info = wait_done(slurm, job_id)
    return run, job_id, info, log_of(submit_dir, job_id)


def test_sbatch_trains_with_two_processes(reference):
    run, job_id, info, log = reference
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-3000:]
    assert Path(info["StdOut"]).name == f"blt-blt-{job_id}.out"
    assert f"2 processes, deepspeed ZeRO-2 -> {run}" in log
    assert f'"step": {STEPS}' in log  # the final validation line
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert (run / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


def test_requeued_job_checkpoints_resumes_and_matches_the_uninterrupted_job(
    slurm, reference, tmp_path, cache_dir, entropy_run
):
    """`scontrol requeue` mid-run: SLURM's SIGTERM makes the ranks save, the job runs again (same id,
    Restarts=1), resumes from that checkpoint and ends with the reference job's losses at every step."""
    ref = reference[0]
    run = tmp_path / "run"
    job_id = submit(slurm, tmp_path, dist_args(run, cache_dir, entropy_run, *TRAIN))
    deadline = time.time() + 240
    while time.time() < deadline and _last_step(run) < 3 and job(slurm, job_id)["JobState"] in ("PENDING", "RUNNING"):
        time.sleep(0.05)
    assert job(slurm, job_id)["JobState"] == "RUNNING" and 3 <= _last_step(run) < STEPS, "finished before the requeue"
    requeue = subprocess.run(
        ["scontrol", "requeue", str(job_id)], capture_output=True, text=True, env=slurm, timeout=30
    )
    assert requeue.returncode == 0, requeue.stderr
    info = wait_done(slurm, job_id, restarts=1)
    log = log_of(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "DUE TO JOB REQUEUE" in log
    saved = re.search(r"SIGTERM: saved (\S+?);", log)
    assert saved, log[-3000:]
    stopped = int(Path(saved.group(1)).name.removeprefix("step_"))
    assert 3 <= stopped < STEPS
    assert f"resumed from {saved.group(1)} at step {stopped}" in log
    assert log.count(f"2 processes, deepspeed ZeRO-2 -> {run}") == 2  # two starts in one log
    assert losses(run) == losses(ref)
    assert final_val(run) == final_val(ref)
    for rank in (0, 1):  # the bytes every rank trained on, window by window
        assert trace(run, rank) == trace(ref, rank)
