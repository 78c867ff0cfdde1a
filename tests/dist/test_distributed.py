"""Multi-process training through the real launchers in launch/ (2 CPU processes over gloo):
ZeRO 0-3 against one process, resume on the same and on another layout, a two-"node" job, a
killed rank, consolidation, dry runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blt.artifacts.checkpoints import checkpoint_config
from blt.model import build_model
from blt.net import free_port

from badinput import kill_midway
from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli

ROOT = CONFIGS.parent
slow = pytest.mark.slow


def dist_args(run: Path, cache_dir: Path, entropy_run: Path, *extra) -> list[str]:
    """The tiny BLT with entropy patching; 2 sequences per process, so 2 processes = one with 4."""
    return [
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        f"patching.entropy_model={entropy_run}",
        *TINY_BLT,
        "training.batch_size=2",
        "training.steps=8",
        "checkpoint.every=4",
        "logging.data_trace=true",
        "model.hash_sparse_grad=false",
        *extra,
    ]


def launch(
    script: str, args: list[str], env: dict | None = None, timeout: float = 300, wait: bool = True
) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    cmd = ["bash", str(ROOT / "launch" / script), str(CONFIGS / "tiny.yaml"), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def losses(run: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (redone after a crash) keeps its last value."""
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


def trace(run: Path, rank: int) -> list[dict]:
    return [json.loads(ln) for ln in (run / "data_trace" / f"rank_{rank}.jsonl").read_text().splitlines()]


def final_val(run: Path) -> float:
    return [m for m in read_metrics(run) if "val_bpb" in m][-1]["val_bpb"]


def train_alone(run: Path, cache_dir: Path, entropy_run: Path, *extra) -> None:
    """One process with the global batch (4 sequences): what 2 processes of 2 are compared with."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "blt",
            "train",
            str(CONFIGS / "tiny.yaml"),
            *dist_args(run, cache_dir, entropy_run, "training.batch_size=4", *extra),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir, entropy_run) -> Path:
    """The reference: one process with the global batch (4 sequences)."""
    run = tmp_path_factory.mktemp("single") / "run"
    train_alone(run, cache_dir, entropy_run)
    return run


# stage -> the launcher that runs it, so every launcher trains for real once
LAUNCHERS = {
    0: ("torchrun.sh", {}),
    1: ("deepspeed.sh", {}),
    2: ("torchrun.sh", {}),
    3: ("accelerate.sh", {"ACCEL_CONFIG": str(ROOT / "launch" / "accelerate" / "zero3.yaml")}),
}
_runs: dict[int, Path] = {}


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory, cache_dir, entropy_run):
    """zero_run(stage) -> a finished 2-process run dir (each stage trained once per module)."""

    def get(stage: int) -> Path:
        if stage not in _runs:
            script, env = LAUNCHERS[stage]
            run = tmp_path_factory.mktemp(f"zero{stage}") / "run"
            # under accelerate the stage comes from its config file (the blt config's default is 2)
            extra = [] if script == "accelerate.sh" else [f"distributed.zero_stage={stage}"]
            done = launch(script, dist_args(run, cache_dir, entropy_run, *extra), env)
            assert done.returncode == 0, done.stderr[-3000:]
            _runs[stage] = run
        return _runs[stage]

    return get


@slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process(stage, zero_run, single):
    """Same global batch: 2 processes under ZeRO-`stage` follow one process's loss curve."""
    run = zero_run(stage)
    ref, got = losses(single), losses(run)
    assert sorted(got) == list(range(1, 9))
    tol = 1e-4 if stage == 3 else 1e-5
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=tol), (stage, step)
    assert final_val(run) == pytest.approx(final_val(single), abs=tol)
    # together the ranks read exactly the windows the single process read, step by step
    merged = [a["windows"] + b["windows"] for a, b in zip(trace(run, 0), trace(run, 1))]
    assert merged == [t["windows"] for t in trace(single, 0)]
    state = json.loads((run / "checkpoints" / "step_00000008" / "state.json").read_text())
    assert (state["engine"], state["zero_stage"], state["world_size"]) == ("deepspeed", stage, 2)
    assert len(state["data_ranks"]) == 2


@slow
def test_compiled_blocks_under_zero3_match_single_process(single, tmp_path, cache_dir, entropy_run):
    """training.compile with ZeRO-3's gathered weights: the same curve as one eager process."""
    run = tmp_path / "compiled"
    done = launch(
        "torchrun.sh", dist_args(run, cache_dir, entropy_run, "distributed.zero_stage=3", "training.compile=true")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ref, got = losses(single), losses(run)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-4), step


@slow
def test_learned_patching_under_zero3_matches_single_process(tmp_path, cache_dir, entropy_run):
    """The router's probabilities come out of the model under ZeRO-3's gathered weights: 2
    processes follow one process's curve, ratio loss and mean patch size included."""
    learned = ["patching.mode=learned", "patching.target_patch_size=4.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_alone(one, cache_dir, entropy_run, *learned)
    done = launch("torchrun.sh", dist_args(two, cache_dir, entropy_run, "distributed.zero_stage=3", *learned))
    assert done.returncode == 0, done.stderr[-3000:]
    ref = {m["step"]: m for m in read_metrics(one) if "loss" in m}
    got = {m["step"]: m for m in read_metrics(two) if "loss" in m}
    assert sorted(got) == list(range(1, 9))
    # step 1, same weights and data: the same patches and loss; the ratio loss is each process's
    # own (F x G over its rows, not over the global batch), so it differs by about 1e-3
    for key in ("loss", "boundary_rate", "avg_patch_size"):
        assert got[1][key] == pytest.approx(ref[1][key], abs=1e-6), key
    assert got[1]["ratio_loss"] == pytest.approx(ref[1]["ratio_loss"], abs=3e-3)
    # later, a boundary whose probability sits at 0.5 may fall either way: the curves stay together
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], abs=5e-3), step
        assert got[step]["avg_patch_size"] == pytest.approx(ref[step]["avg_patch_size"], rel=0.05), step
    assert final_val(two) == pytest.approx(final_val(one), abs=1e-2)


@slow
def test_grouped_query_alibi_model_under_zero3_matches_single_process(tmp_path, cache_dir, entropy_run):
    """Grouped- and multi-query attention with ALiBi and with no positions, under ZeRO-3's
    partitioned k/v projections: 2 processes follow one process's curve."""
    options = [
        "training.steps=4",
        "model.global_model.kv_heads=2",
        "model.global_model.position=alibi",
        "model.encoder.kv_heads=1",
        "model.decoder.position=none",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    train_alone(one, cache_dir, entropy_run, *options)
    done = launch("torchrun.sh", dist_args(two, cache_dir, entropy_run, "distributed.zero_stage=3", *options))
    assert done.returncode == 0, done.stderr[-3000:]
    ref, got = losses(one), losses(two)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-4), step
    assert final_val(two) == pytest.approx(final_val(one), abs=1e-4)


@slow
def test_zero3_resume_continues_exactly(zero_run, tmp_path, cache_dir, entropy_run):
    """Resume a ZeRO-3 run from its step-4 checkpoint: steps 5-8 repeat the uninterrupted losses."""
    full = zero_run(3)
    run = tmp_path / "resumed"
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    done = launch("torchrun.sh", dist_args(run, cache_dir, entropy_run, "distributed.zero_stage=3"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 4" in done.stderr
    assert losses(run) == losses(full)
    assert trace(run, 1) == trace(full, 1)


@slow
def test_consolidated_zero3_checkpoint_gives_the_same_bpb(zero_run, tmp_path, capsys):
    run = zero_run(3)
    step_dir = run / "checkpoints" / "step_00000008"
    assert not (step_dir / "model.safetensors").exists()  # ZeRO-3 keeps only shards
    out_file = tmp_path / "consolidated.safetensors"
    code, out, err = run_cli(capsys, "consolidate", run, "--out", out_file)
    assert code == 0, err
    assert json.loads(out)["weights"] == str(out_file)
    # blt eval (one process, no process group) consolidates on load and scores the same bytes
    code, out, err = run_cli(capsys, "eval", run, "--max-bytes", 2048)
    assert code == 0, err
    assert json.loads(out)["bpb"] == pytest.approx(final_val(run), abs=1e-5)
    from safetensors.torch import load_file

    from blt.artifacts import load_model

    model = load_model(run, patcher=False).model
    weights = load_file(out_file)
    assert set(weights) == set(model.state_dict())
    assert all((weights[k] == v).all() for k, v in model.state_dict().items())


@slow
def test_export_of_a_zero3_checkpoint_gives_the_same_bpb_without_deepspeed(zero_run, tmp_path, capsys):
    """`blt export` consolidates ZeRO-3 shards into an engine-free dir that evaluates without deepspeed."""
    run = zero_run(3)
    code, out, err = run_cli(capsys, "export", run, tmp_path / "export")
    assert code == 0, err
    assert not list((tmp_path / "export").rglob("*.pt"))  # safetensors only
    hide = "import sys; sys.modules['deepspeed'] = None; from blt.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", hide, "eval", str(tmp_path / "export"), "--max-bytes", "2048"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bpb"] == pytest.approx(final_val(run), abs=1e-5)


def train_one_process(run: Path, cache_dir: Path, entropy_run: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "blt",
            "train",
            str(CONFIGS / "tiny.yaml"),
            *dist_args(run, cache_dir, entropy_run, "training.batch_size=4", *extra),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )


def windows_per_step(run: Path, ranks: int) -> dict[int, list[int]]:
    """step -> the windows all ranks trained on in it, sorted (with accumulation a rank's micro-batches
    interleave with the others', so only the set per step is layout-free)."""
    out: dict[int, list[int]] = {}
    for rank in range(ranks):
        for t in trace(run, rank):
            out.setdefault(t["step"], []).extend(t["windows"])
    return {step: sorted(w) for step, w in out.items()}


def assert_continues(run: Path, ref: Path, first: int, ranks: int, tol: float = 1e-5) -> None:
    """Steps first..8 of `run` have the uninterrupted reference's losses and read its windows."""
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(first, 9))
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=tol), step
    expected = windows_per_step(ref, 1)
    assert windows_per_step(run, ranks) == {s: expected[s] for s in range(first, 9)}


def resume_on_two(run: Path, source: Path, cache_dir: Path, entropy_run: Path, says: str, *extra) -> None:
    """A 2-process job (torchrun) resuming the checkpoint `source`; its log must say `says`."""
    done = launch("torchrun.sh", dist_args(run, cache_dir, entropy_run, *extra, f"checkpoint.resume={source}"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert says in done.stderr
    # stdout is the result line alone: DeepSpeed's "MPU is not provided" warning goes to stderr
    assert [json.loads(line)["step"] for line in done.stdout.splitlines()] == [8], done.stdout


def universal_step(step_dir: Path) -> float:
    """The Adam step count in a checkpoint's universal form (made by `blt consolidate --universal`)."""
    out = subprocess.run(
        [sys.executable, "-m", "blt", "consolidate", str(step_dir), "--universal"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    udir = Path(json.loads(out.stdout)["universal"])
    return {float(torch.load(f, weights_only=True)) for f in udir.glob("zero/*/step.pt")}.pop()


@slow
def test_zero2_checkpoint_resumes_on_one_process_then_on_zero3(zero_run, single, tmp_path, cache_dir, entropy_run):
    """A job changes shape twice: ZeRO-2 on 2 processes -> 1 process (local engine) -> ZeRO-3 on 2
    processes with micro-batch 1 x 2 accumulation steps. Each part continues one uninterrupted
    process's losses (DeepSpeed's universal checkpoint: fp32 weights and Adam moments) and its data
    stream, and Adam's step count goes on."""
    shutil.copytree(zero_run(2), tmp_path / "zero2")  # the conversion writes beside the checkpoint
    source = tmp_path / "zero2" / "checkpoints" / "step_00000004"
    one = tmp_path / "one_process"
    done = train_one_process(one, cache_dir, entropy_run, "checkpoint.every=2", f"checkpoint.resume={source}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming a checkpoint of deepspeed ZeRO-2 with 2 processes as local with 1 process" in done.stderr
    assert_continues(one, single, 5, 1)
    optimizer = torch.load(one / "checkpoints" / "step_00000008" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {8.0}

    three = tmp_path / "zero3"
    resume_on_two(
        three,
        one / "checkpoints" / "step_00000006",
        cache_dir,
        entropy_run,
        "as deepspeed ZeRO-3 with 2 processes; the same global batch",
        "distributed.zero_stage=3",
        "training.batch_size=1",
        "training.grad_accum=2",
    )
    assert_continues(three, single, 7, 2)
    assert universal_step(three / "checkpoints" / "step_00000008") == 8.0


@slow
def test_zero3_checkpoint_resumes_on_zero1(zero_run, single, tmp_path, cache_dir, entropy_run):
    run = tmp_path / "zero1"
    shutil.copytree(zero_run(3), tmp_path / "zero3")
    source = tmp_path / "zero3" / "checkpoints" / "step_00000004"
    resume_on_two(
        run,
        source,
        cache_dir,
        entropy_run,
        "resuming a checkpoint of deepspeed ZeRO-3 with 2 processes as deepspeed ZeRO-1",
        "distributed.zero_stage=1",
    )
    assert_continues(run, single, 5, 2)
    assert universal_step(run / "checkpoints" / "step_00000008") == 8.0


@slow
def test_a_conversion_killed_midway_leaves_the_checkpoint_usable(zero_run, single, tmp_path, cache_dir, entropy_run):
    """kill -9 during the universal conversion: the checkpoint is as it was, nothing half-written is
    read, and the next resume on another layout converts again and continues exactly."""
    run = tmp_path / "copy"
    shutil.copytree(zero_run(2), run)
    step_dir = run / "checkpoints" / "step_00000004"
    before = {p.name: p.stat().st_size for p in step_dir.iterdir()}
    forms = run / "checkpoints" / "universal"
    partial = forms / "step_00000004.tmp"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the conversion takes well under a second: killed once it has written something
    kill_midway(
        ["consolidate", step_dir, "--universal"],
        lambda: partial.is_dir() and any(partial.rglob("*.pt")),
        forms,
        env=env,
    )
    assert partial.is_dir() and not (forms / "step_00000004").exists()
    assert {p.name: p.stat().st_size for p in step_dir.iterdir()} == before

    one = tmp_path / "one_process"
    done = train_one_process(one, cache_dir, entropy_run, f"checkpoint.resume={step_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "converted step_00000004" in done.stderr
    assert not partial.exists()
    assert_continues(one, single, 5, 1)


@slow
def test_two_conversions_at_once_take_turns(zero_run, single, tmp_path, cache_dir, entropy_run):
    """Two `blt consolidate --universal` of one ZeRO checkpoint started together, 3 times (before the
    lock every round lost one of them to the other deleting their shared step_N.tmp, and some left
    an incomplete form behind a valid marker): both succeed, one converts and the other uses its
    conversion, every file of the form is there, and a resume on one process reads it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for round_ in range(3):
        run = tmp_path / f"round_{round_}"
        shutil.copytree(zero_run(2), run)
        step_dir = run / "checkpoints" / "step_00000004"
        jobs = [
            subprocess.Popen(
                [sys.executable, "-m", "blt", "consolidate", str(step_dir), "--universal"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(2)
        ]
        done = [(job.wait(timeout=300), *job.communicate()) for job in jobs]
        assert [code for code, _, _ in done] == [0, 0], [err for _, _, err in done]
        assert sum("converted step_00000004" in err for _, _, err in done) == 1
        udir = run / "checkpoints" / "universal" / "step_00000004"
        cfg = checkpoint_config(step_dir)
        names = [n for n, _ in build_model(cfg.model, cfg.patching).named_parameters()]
        want = {f"zero/{n}/{k}.pt" for n in names for k in ("fp32", "exp_avg", "exp_avg_sq", "step")}
        want |= {
            "zero/optimizer_state.pt",
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
            "blt.json",
        }
        assert {str(p.relative_to(udir)) for p in udir.rglob("*") if p.is_file()} == want
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
            "latest",
            "step_00000004",
            "step_00000008",
            "universal",
            "zero_to_fp32.py",
            "zero_to_torch.py",
        ]

    one = tmp_path / "one_process"
    done = train_one_process(one, cache_dir, entropy_run, f"checkpoint.resume={step_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "converted" not in done.stderr  # the form the racing conversions left is complete
    assert_continues(one, single, 5, 1)


@slow
def test_two_node_job_on_one_machine(zero_run, tmp_path, cache_dir, entropy_run):
    """Two launcher invocations, --nnodes 2, node ranks 0 and 1, one process each, localhost rendezvous."""
    run = tmp_path / "two_nodes"
    port = str(free_port())
    nodes = [
        launch(
            "torchrun.sh",
            dist_args(run, cache_dir, entropy_run, "distributed.zero_stage=2"),
            {"NNODES": "2", "NODE_RANK": str(r), "NGPU": "1", "MASTER_PORT": port},
            wait=False,
        )
        for r in (0, 1)
    ]
    results = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, results):
        assert p.returncode == 0, err[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000008"
    # the same world (2 processes x 2 sequences) as the one-node ZeRO-2 run: the same curve
    assert losses(run) == pytest.approx(losses(zero_run(2)), abs=1e-6)


def _last_step(run: Path) -> int:
    """The newest logged step of a running job (0 before the first; a half-written line is skipped)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    steps = [0]
    for ln in lines:
        try:
            steps.append(json.loads(ln).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps)


def _worker_pid(run: Path, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"blt" in cmd
            and f"run_dir={run}".encode() in cmd
            and f"RANK={rank}".encode() in env
            and b"train" in cmd
            and b"torch.distributed.run" not in cmd
        ):
            return int(proc.name)
    return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@slow
def test_killed_rank_fails_fast_and_resume_replays_the_exact_stream(tmp_path, cache_dir, entropy_run):
    """kill -9 one rank: the job ends with a clear error within seconds; rerunning resumes from the last
    complete checkpoint, and the bytes every rank trained on equal an uninterrupted run's."""
    # long enough (~4 s) that the kill lands mid-run even on a loaded machine
    slower = [
        "data.seq_len=256",
        "training.steps=80",
        "checkpoint.every=10",
        "model.dropout=0.1",
        "distributed.timeout_minutes=2",
    ]
    ref = tmp_path / "uninterrupted"
    done = launch("torchrun.sh", dist_args(ref, cache_dir, entropy_run, *slower))
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "crashed"
    args = dist_args(run, cache_dir, entropy_run, *slower)
    job = launch("torchrun.sh", args, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and _last_step(run) < 12:
        time.sleep(0.05)
    pid, survivor = _worker_pid(run, 1), _worker_pid(run, 0)
    assert pid is not None and survivor is not None and job.poll() is None, "the job finished before it could be killed"
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    # torchrun stops the other workers with SIGTERM once it sees the death, at any moment of the
    # survivor's wind-down (a race CI lost once): send it over and over until the survivor is gone
    while _alive(survivor) and time.time() - killed < 60:
        os.kill(survivor, signal.SIGTERM)
        time.sleep(0.02)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.time() - killed < 60
    assert "lost another process" in err and "rerun the same command" in err
    crashed_at = max(losses(run))
    resume_from = int((run / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 10 <= resume_from < 80 and resume_from <= crashed_at

    done = launch("torchrun.sh", args)  # the same command again: resume=auto
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {resume_from}" in done.stderr
    for rank in (0, 1):
        assert trace(run, rank) == trace(ref, rank)
    assert losses(run) == losses(ref)


@pytest.mark.parametrize(
    "script,env",
    [
        ("torchrun.sh", {"NNODES": "8", "NGPU": "8"}),
        ("slurm.sbatch", {"NNODES": "8", "NGPU": "8"}),
        ("deepspeed.sh", {"HOSTFILE": str(ROOT / "launch" / "hostfile.example")}),
        ("accelerate.sh", {"NNODES": "8", "NGPU": "8", "ACCEL_CONFIG": str(ROOT / "launch/accelerate/zero3.yaml")}),
    ],
)
def test_launcher_dry_run_plans_the_8b_preset_on_64_gpus(script, env):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "DRY_RUN": "1", **env}
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / script), str(CONFIGS / "blt_8b.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "world size 64 = 8 node(s) x 8 process(es); bf16" in text
    ds = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert ds["train_batch_size"] == 64 * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    assert ds["bf16"]["enabled"]
    rows = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit() and ln.strip().split()[0] in "0123"]
    totals = {int(r[0]): float(r[5]) for r in rows}
    assert totals[0] > totals[1] > totals[2] > totals[3]  # each stage shards more
    assert totals[0] > 80 and totals[3] < 80  # the 8B preset needs sharding to fit an H100
    if script == "accelerate.sh":  # the accelerate config's stage is the one marked
        assert "<- distributed.zero_stage" in [ln for ln in text.splitlines() if ln.strip().startswith("3 ")][0]
    assert "would run" in text


@slow
def test_preempted_job_checkpoints_on_every_rank_and_resumes(tmp_path, cache_dir, entropy_run):
    """SIGTERM to the launcher (what SLURM does at a time limit): the ranks agree on a step, save it
    together and stop; the same command continues from that step."""
    run = tmp_path / "preempted"
    args = dist_args(run, cache_dir, entropy_run, "training.steps=100000", "checkpoint.every=100000")
    job = launch("torchrun.sh", args, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and _last_step(run) < 3:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert "SIGTERM: saved" in err
    stopped = json.loads((run / "checkpoints" / (run / "checkpoints/latest").read_text() / "state.json").read_text())
    assert stopped["step"] >= 3 and len(stopped["data_ranks"]) == 2
    args[args.index("training.steps=100000")] = f"training.steps={stopped['step'] + 2}"
    done = launch("torchrun.sh", args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {stopped['step']}" in done.stderr
    assert max(losses(run)) == stopped["step"] + 2


@slow
def test_zero3_with_offload_accumulation_and_recompute_matches_single_process(single, tmp_path, cache_dir, entropy_run):
    """The memory-saving options change where numbers live, not what they are: ZeRO-3 with optimizer
    and parameter offload, 2 micro-batches of 1 per step and activation checkpointing."""
    run = tmp_path / "options"
    done = launch(
        "torchrun.sh",
        dist_args(
            run,
            cache_dir,
            entropy_run,
            "distributed.zero_stage=3",
            "distributed.offload_optimizer=cpu",
            "distributed.offload_params=cpu",
            "training.batch_size=1",
            "training.grad_accum=2",
            "training.activation_checkpointing=true",
        ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ref, got = losses(single), losses(run)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-4), step
