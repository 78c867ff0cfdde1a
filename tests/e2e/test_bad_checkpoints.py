"""Damaged or mismatched checkpoints and exports: every loader says in one line which file is
wrong and that it was not loaded, never a traceback from safetensors, json or torch, and changes
nothing on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_pickle_safety import plant

from blt.train.reshard import universal_checkpoint, universal_dir

from badinput import assert_user_error, run_blt
from conftest import CONFIGS, TINY_BLT

STEP = Path("checkpoints") / "step_00000002"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def junk(path: Path) -> None:
    path.write_bytes(b"this is not a tensor file\n" * 40)


def json_junk(path: Path) -> None:
    path.write_text('{"step": 2, "data": ')


def byte_lm_weights(entropy_run: Path):
    def put(path: Path) -> None:  # a byte LM's weights where a BLT's belong
        shutil.copy(entropy_run / "checkpoints" / "step_00000008" / "model.safetensors", path)

    return put


def zero_junk(path: Path) -> None:  # junk ZeRO shards instead of model.safetensors
    step = path.parent
    path.unlink()
    (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    junk(step / "mp_rank_00_model_states.pt")


# (id, file in the step dir, how it is damaged, words the error must contain)
DAMAGE = [
    ("truncated_safetensors", "model.safetensors", truncate, "model.safetensors"),
    ("not_safetensors", "model.safetensors", junk, "not a readable safetensors file"),
    ("byte_lm_weights_in_blt", "model.safetensors", "byte_lm", "do not fit"),
    ("junk_zero_shard", "model.safetensors", zero_junk, "mp_rank_00_model_states.pt"),
    ("bad_config_yaml", "config.yaml", lambda p: p.write_text("model: [unclosed\n"), "config.yaml"),
]
# what `blt train` (resuming) reads besides the weights
RESUME_DAMAGE = DAMAGE[:2] + [
    ("junk_optimizer", "optimizer.pt", junk, "optimizer.pt"),
    ("truncated_rng", "rng.pt", truncate, "rng.pt"),
    ("corrupt_state_json", "state.json", json_junk, "state.json"),
]


def damaged(static_run: Path, tmp_path: Path, entropy_run: Path, name: str, how) -> Path:
    run = tmp_path / "run"
    shutil.copytree(static_run, run)
    how = byte_lm_weights(entropy_run) if how == "byte_lm" else how
    how(run / STEP / name)
    return run


VERBS = {"eval": [], "generate": ["--max-bytes", "4"], "patch": ["--text", "hi"], "export": ["OUT"]}
# eval meets every kind of damage; the other loaders (one code path) a damaged file of each format
CASES = [("eval", d) for d in DAMAGE] + [(v, d) for v in VERBS if v != "eval" for d in (DAMAGE[0], DAMAGE[3])]


@pytest.mark.parametrize("verb,damage", CASES, ids=[f"{v}-{d[0]}" for v, d in CASES])
def test_loaders_name_the_damaged_file(static_run, entropy_run, tmp_path, verb, damage):
    _, name, how, words = damage
    run = damaged(static_run, tmp_path, entropy_run, name, how)
    extra = [tmp_path / "out" if a == "OUT" else a for a in VERBS[verb]]
    assert_user_error([verb, run, *extra], watch=[run], contains=words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,name,how,words", RESUME_DAMAGE, ids=[d[0] for d in RESUME_DAMAGE])
def test_resume_names_the_damaged_file(static_run, entropy_run, tmp_path, cache_dir, case, name, how, words):
    run = damaged(static_run, tmp_path, entropy_run, name, how)
    line = assert_user_error(
        [
            "train",
            CONFIGS / "tiny.yaml",
            f"run_dir={run}",
            f"data.cache_dir={cache_dir}",
            "patching.mode=static",
            *TINY_BLT,
            "training.steps=4",
        ],
        watch=[run],
        contains=words,
        progress=("data: ",),
    )
    assert "blt train: error:" in line


def test_damaged_export_is_named(static_run, tmp_path):
    out = tmp_path / "export"
    assert run_blt("export", static_run, out).returncode == 0
    for name, how, words in [
        ("model.safetensors", truncate, "model.safetensors"),
        ("export.json", json_junk, "export.json"),
    ]:
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(out, broken)
        how(broken / name)
        assert_user_error(["eval", broken], watch=[broken], contains=words)


def wrong_shape(param: Path, marker: Path) -> None:
    torch.save({"param": torch.zeros(3, 3), "cat_dim": 0}, param / "fp32.pt")


# A universal form blt made, then damaged in one parameter's files: (id, how, what the log names)
UNIVERSAL_DAMAGE = [
    ("wrong_shape", wrong_shape, "fp32.pt holds (3, 3), but the model's local_decoder.lm_head.weight is (260, 32)"),
    ("truncated", lambda param, marker: truncate(param / "fp32.pt"), "fp32.pt is truncated or not a torch file"),
    ("missing_parameter", lambda param, marker: shutil.rmtree(param), "fp32.pt is missing"),
    (
        "malicious_pickle",
        lambda param, marker: plant(param / "exp_avg.pt", marker, wrap=lambda p: {"param": p}),
        "exp_avg.pt holds objects other than tensors",
    ),
]


@pytest.mark.parametrize("case,how,words", UNIVERSAL_DAMAGE, ids=[d[0] for d in UNIVERSAL_DAMAGE])
def test_a_damaged_universal_form_is_made_again(static_run, tmp_path, cache_dir, case, how, words):
    """A resume under DeepSpeed (one process: a new layout for the local checkpoint) through a
    damaged universal form: the damage is found before DeepSpeed reads a file, the form is converted
    again from the checkpoint (which is fine) and training goes on. No traceback, no advice to load
    unguarded (weights_only=False), the payload never runs, and stdout holds only the result line
    (DeepSpeed logs "MPU is not provided" on its own handler, sent to stderr)."""
    run = tmp_path / "run"
    shutil.copytree(static_run, run)
    step_dir = run / STEP
    universal_checkpoint(step_dir)
    marker = tmp_path / "PAYLOAD_RAN"
    how(universal_dir(step_dir) / "zero" / "local_decoder.lm_head.weight", marker)
    done = run_blt(
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        "patching.mode=static",
        *TINY_BLT,
        "training.steps=4",
        "distributed.engine=deepspeed",
        "distributed.zero_stage=1",
    )
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert f"is damaged (zero/local_decoder.lm_head.weight/{words}" in err, err
    assert f"converting {step_dir.name} again" in err
    assert "MPU is not provided" in err and "Traceback" not in err and "weights_only" not in err
    assert not marker.exists()
    assert [json.loads(line)["step"] for line in done.stdout.decode().splitlines()] == [4]


def test_a_universal_form_blt_did_not_write_is_left_alone(static_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(static_run, run)
    mine = universal_dir(run / STEP)
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("a universal checkpoint made by hand")
    assert_user_error(["consolidate", run, "--universal"], watch=[run], contains="holds files blt did not write")
