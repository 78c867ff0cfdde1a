"""No work is lost or overwritten by `blt train`: a failure after a step saves that step and the
same command resumes from it; nothing is written into a directory that is not this run's; a
failed start leaves nothing behind; the errors name what to change."""

from __future__ import annotations

import json
import os
import stat

import pytest

from blt.train.engine import LocalEngine

from badinput import assert_user_error
from conftest import CONFIGS, TINY_BLT, TINY_LM, read_metrics, run_cli


def tiny(run, cache_dir, *extra):
    return [
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        *TINY_BLT,
        "patching.mode=static",
        "logging.tensorboard=false",
        *extra,
    ]


def one_line(code, err, *words) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("blt train")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def train_steps(run, key="loss") -> list[int]:
    return [m["step"] for m in read_metrics(run) if key in m]


def fail_on_call(monkeypatch, n: int, exc: BaseException) -> None:
    """The n-th backward pass of the local engine raises `exc` (a crash in the middle of a step)."""
    calls, backward = [0], LocalEngine.backward

    def flaky(self, loss):
        calls[0] += 1
        if calls[0] == n:
            raise exc
        backward(self, loss)

    monkeypatch.setattr(LocalEngine, "backward", flaky)


def step_dir(run, step: int):
    return run / "checkpoints" / f"step_{step:08d}"


# ----------------------------------------------------------------------------- failures after a step


def test_divergence_saves_the_last_finite_step_and_points_before_it(tmp_path, capsys, cache_dir):
    from blt.artifacts import load_model

    run = tmp_path / "run"
    common = ["checkpoint.every=2", "checkpoint.keep_last=1"]
    assert run_cli(capsys, *tiny(run, cache_dir, *common, "training.steps=2"))[0] == 0
    # continue with a learning rate that blows the weights up: step 3's update makes step 4's loss nan
    diverge = tiny(run, cache_dir, *common, "training.steps=6", "optimizer.lr=1e6")
    code, _, err = run_cli(capsys, *diverge)
    line = one_line(
        code, err, "at step 4", "lower optimizer.lr", f"checkpoint.resume={step_dir(run, 2)}", str(step_dir(run, 3))
    )
    state = json.loads((step_dir(run, 3) / "state.json").read_text())
    assert state["step"] == 3 and state["data"]["position"] == 3 * 4  # 3 batches of 4 windows: no more, no less
    model = load_model(step_dir(run, 3), patcher=False).model
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert step_dir(run, 2).is_dir()  # keep_last=1, but a save after a failure deletes nothing
    # resuming that step is exact: the same loss at the same step, and nothing new is written
    code, _, err = run_cli(capsys, *diverge)
    assert one_line(code, err) == line
    # what the message says to do: resume from before the divergence with a sane lr
    code, _, err = run_cli(
        capsys, *tiny(run, cache_dir, *common, "training.steps=6", f"checkpoint.resume={step_dir(run, 2)}")
    )
    assert code == 0, err
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]


def test_a_crash_mid_step_saves_the_step_before_and_the_rerun_continues_exactly(
    tmp_path, capsys, cache_dir, monkeypatch
):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    common = ["training.steps=4", "checkpoint.every=100", "model.dropout=0.1"]
    assert run_cli(capsys, *tiny(full, cache_dir, *common))[0] == 0
    fail_on_call(monkeypatch, 3, RuntimeError("CUDA out of memory (simulated)"))
    with pytest.raises(RuntimeError, match="simulated"):
        run_cli(capsys, *tiny(crashed, cache_dir, *common))
    err = capsys.readouterr().err
    assert f"saved {step_dir(crashed, 2)}" in err and "rerun the same command" in err
    assert json.loads((step_dir(crashed, 2) / "state.json").read_text())["data"]["position"] == 2 * 4
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *tiny(crashed, cache_dir, *common))
    assert code == 0 and "at step 2" in err, err
    a = {m["step"]: m["loss"] for m in read_metrics(full) if "loss" in m}
    b = {m["step"]: m["loss"] for m in read_metrics(crashed) if "loss" in m}
    assert list(b) == [1, 2, 3, 4] and a == b  # the same batches and dropout masks as the uninterrupted run


def test_a_failed_final_validation_is_saved_and_done_by_the_rerun(tmp_path, capsys, cache_dir, monkeypatch):
    run = tmp_path / "run"
    args = tiny(run, cache_dir, "training.steps=2", "checkpoint.every=100")

    def broken(*a, **k):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr("blt.train.validation.evaluate", broken)
    with pytest.raises(OSError, match="simulated"):
        run_cli(capsys, *args)
    assert f"saved {step_dir(run, 2)}" in capsys.readouterr().err
    monkeypatch.undo()
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["bpb"] > 0
    assert train_steps(run) == [1, 2] and train_steps(run, "val_bpb") == [2]


def test_a_double_ctrl_c_then_resume_logs_every_step_once(tmp_path, capsys, cache_dir, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = tiny(
        run, cache_dir, "training.steps=5", "checkpoint.every=2", "logging.tensorboard=true", "logging.data_trace=true"
    )
    fail_on_call(monkeypatch, 4, KeyboardInterrupt())  # the second Ctrl-C: stop at once, inside step 4
    assert run_cli(capsys, *args)[0] == 130
    assert train_steps(run) == [1, 2, 3]  # step 3 is logged, but only step 2 was saved
    monkeypatch.undo()
    assert run_cli(capsys, *args)[0] == 0
    assert train_steps(run) == [1, 2, 3, 4, 5]
    assert train_steps(run, "patch_size_hist") == [1, 2, 3, 4, 5]
    trace = [json.loads(ln)["step"] for ln in (run / "data_trace" / "rank_0.jsonl").read_text().splitlines()]
    assert trace == [1, 2, 3, 4, 5]
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert [e.value for e in board.Scalars("train/loss")][2] == pytest.approx(
        [m["loss"] for m in read_metrics(run) if "loss" in m][2]
    )  # step 3 as the resumed run logged it


# ----------------------------------------------------------------------------- never writing over others


def test_train_refuses_an_export_and_leaves_it_byte_identical(tmp_path, capsys, cache_dir, entropy_run):
    export = tmp_path / "export"
    assert run_cli(capsys, "export", entropy_run, export)[0] == 0
    assert_user_error(
        ["train", CONFIGS / "entropy_tiny.yaml", f"run_dir={export}", f"data.cache_dir={cache_dir}", *TINY_LM],
        watch=[export],
        contains="is an export",
    )


def test_train_refuses_a_directory_of_other_files(tmp_path, cache_dir):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "notes.txt").write_text("do not lose me\n")
    assert_user_error(tiny(mine, cache_dir, "training.steps=1"), watch=[mine], contains="holds no blt run")


def test_train_refuses_a_run_that_stopped_before_its_first_checkpoint(tmp_path, capsys, cache_dir, monkeypatch):
    run = tmp_path / "run"
    fail_on_call(monkeypatch, 3, KeyboardInterrupt())
    assert run_cli(capsys, *tiny(run, cache_dir, "training.steps=5", "checkpoint.every=100"))[0] == 130
    assert train_steps(run) == [1, 2] and not (run / "checkpoints").exists()
    for resume in ("auto", "none"):
        assert_user_error(
            tiny(run, cache_dir, "training.steps=5", f"checkpoint.resume={resume}"),
            watch=[run],
            contains="stopped before its first checkpoint",
        )


# ----------------------------------------------------------------------------- messages and leftovers


def test_a_resume_with_another_model_config_names_the_keys(cache_dir, entropy_run):
    line = assert_user_error(
        [
            "train",
            CONFIGS / "entropy_tiny.yaml",
            f"run_dir={entropy_run}",
            f"data.cache_dir={cache_dir}",
            *TINY_LM,
            "model.lm.dim=64",
            "model.lm.layers=2",
        ],
        watch=[entropy_run],
        contains="model.lm.dim: 32 in the checkpoint, 64 in the config",
    )
    assert "model.lm.layers: 1 in the checkpoint, 2 in the config" in line and len(line) < 400


def test_init_from_another_model_config_names_the_keys(tmp_path, cache_dir, entropy_run):
    run = tmp_path / "finetune"
    assert_user_error(
        [
            "train",
            CONFIGS / "entropy_tiny.yaml",
            f"run_dir={run}",
            f"data.cache_dir={cache_dir}",
            *TINY_LM,
            "model.lm.dim=64",
            f"training.init_from={entropy_run}",
        ],
        watch=[tmp_path],
        contains="model.lm.dim: 32 in its config.yaml, 64 in this config",
        progress=("data: ",),
    )
    assert not run.exists()


@pytest.mark.parametrize(
    "value, says",
    [
        ("Auto", "checkpoint.resume must be auto | none | PATH, got 'Auto'"),
        ("{tmp}/gone/step_00000004", "{tmp}/gone/step_00000004' does not exist"),
    ],
)
def test_a_bad_checkpoint_resume_lists_the_options(tmp_path, cache_dir, value, says):
    run = tmp_path / "run"
    line = assert_user_error(
        tiny(run, cache_dir, f"checkpoint.resume={value.format(tmp=tmp_path)}"),
        watch=[tmp_path],
        contains=says.format(tmp=tmp_path),
    )
    assert "auto | none | PATH" in line and not run.exists()


@pytest.mark.parametrize("case", ["missing data", "bad entropy model", "late config check", "no checkpoint"])
def test_an_early_failure_leaves_no_run_dir(tmp_path, cache_dir, case):
    run = tmp_path / "runs" / "new"
    (tmp_path / "empty_run").mkdir()
    extra = {
        "missing data": [f"data.train=[{tmp_path / 'missing.txt'}]"],
        "bad entropy model": ["patching.mode=entropy", f"patching.entropy_model={tmp_path / 'nope'}"],
        "late config check": ["training.dtype=fp16", "training.device=cpu"],
        "no checkpoint": [f"checkpoint.resume={tmp_path / 'empty_run'}"],
    }[case]
    assert_user_error(tiny(run, cache_dir, "training.steps=1", *extra), watch=[tmp_path], progress=("data: ",))
    assert not (tmp_path / "runs").exists()


def test_a_start_that_fails_in_its_first_step_takes_back_what_it_wrote(tmp_path, capsys, cache_dir, monkeypatch):
    new, empty = tmp_path / "runs" / "new", tmp_path / "empty"
    empty.mkdir()
    for run in (new, empty):
        fail_on_call(monkeypatch, 1, RuntimeError("out of memory (simulated)"))
        with pytest.raises(RuntimeError, match="simulated"):
            run_cli(capsys, *tiny(run, cache_dir, "training.steps=2", "logging.tensorboard=true"))
        monkeypatch.undo()
    assert not (tmp_path / "runs").exists()  # created by the start, removed with it
    assert empty.is_dir() and not any(empty.iterdir())  # there before: kept, and as empty as it was


def test_an_unwritable_cache_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(
        [
            "train",
            CONFIGS / "byte_baseline_tiny.yaml",
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={blocker / 'cache'}",
            f"data.train=[{CONFIGS / 'tiny.yaml'}]",
        ],
        watch=[tmp_path],
        contains=f"data.cache_dir '{blocker / 'cache'}' is not writable",
    )


# ----------------------------------------------------------------------------- files a team can read


def test_safetensors_files_get_the_mode_of_any_other_file(tmp_path, capsys, cache_dir, entropy_run):
    import torch

    from blt.disk import write_safetensors

    old = os.umask(0o022)
    try:
        export = tmp_path / "export"
        assert run_cli(capsys, "export", entropy_run, export)[0] == 0
        assert stat.S_IMODE((export / "model.safetensors").stat().st_mode) == 0o644
        assert stat.S_IMODE((export / "config.yaml").stat().st_mode) == 0o644
        os.umask(0o027)
        run = tmp_path / "run"
        assert run_cli(capsys, *tiny(run, cache_dir, "training.steps=1"))[0] == 0
        assert stat.S_IMODE((step_dir(run, 1) / "model.safetensors").stat().st_mode) == 0o640
        write_safetensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
        assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_a_save_never_prunes_the_checkpoint_it_just_wrote(tmp_path):
    import torch

    from blt.config import Config
    from blt.train.checkpoint import save_checkpoint

    cfg = Config()
    cfg.checkpoint.keep_last = 1
    abandoned = step_dir(tmp_path, 50)  # left by steps a run resumed from an earlier checkpoint gave up
    abandoned.mkdir(parents=True)
    (abandoned / "state.json").write_text('{"step": 50}')
    saved = save_checkpoint(tmp_path, 20, torch.nn.Linear(2, 2), None, {}, cfg)
    assert saved == step_dir(tmp_path, 20) and (saved / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text() == saved.name
    assert json.loads((saved / "state.json").read_text())["step"] == 20


@pytest.mark.slow
def test_a_diverging_job_saves_on_every_rank_together(tmp_path, cache_dir):
    """2 processes (ZeRO-2 over gloo) see the same non-finite loss after their all-reduce: both skip
    the update, write one checkpoint of the last step together and stop with the same line."""
    import subprocess
    import sys

    from blt.net import free_port

    run = tmp_path / "job"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(CONFIGS.parent),
    }
    args = [
        str(a)
        for a in tiny(
            run, cache_dir, "training.batch_size=2", "training.steps=4", "optimizer.lr=1e6", "checkpoint.every=100"
        )[2:]
    ]
    done = subprocess.run(
        ["bash", str(CONFIGS.parent / "launch" / "torchrun.sh"), str(CONFIGS / "tiny.yaml"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    # each rank says it once (counted in the text: two processes share the one stderr pipe)
    assert done.returncode != 0, done.stderr[-3000:]
    assert [done.stderr.count(f"(rank {r}): error: loss became nan at step 2") for r in (0, 1)] == [1, 1], done.stderr[
        -3000:
    ]
    state = json.loads((step_dir(run, 1) / "state.json").read_text())
    assert (state["step"], state["world_size"]) == (1, 2) and [d["position"] for d in state["data_ranks"]] == [4, 4]
