"""The universal form of a checkpoint (blt/train/reshard.py), on one process: what a resume on
another layout reads. The multi-process resumes through it are in test_distributed.py."""

from __future__ import annotations

import shutil

import pytest
import torch

from blt.artifacts.checkpoints import CheckpointError, checkpoint_config, find_checkpoint, load_weights
from blt.artifacts.files import load_pt
from blt.model import build_model
from blt.train.optim import Optimizers, build_optimizer
from blt.train.reshard import load_universal, universal_checkpoint, universal_dir

from badinput import assert_user_error
from conftest import CONFIGS, TINY_BLT, run_cli


def _built(step_dir):
    cfg = checkpoint_config(step_dir)
    model = build_model(cfg.model)
    return model, build_optimizer(model, cfg.optimizer)


def _adam_state(model, optimizer) -> dict[str, dict]:
    parts = optimizer.parts if isinstance(optimizer, Optimizers) else [optimizer]
    state = {id(p): st for opt in parts for p, st in opt.state.items()}
    return {n: state[id(p)] for n, p in model.named_parameters() if id(p) in state}


def test_universal_form_holds_the_weights_and_adam_state_of_a_local_checkpoint(static_run, tmp_path):
    """Weights, both Adam moments and the step count of every parameter (the hash tables' lazy
    SparseAdam included) come back exactly as the local engine's own files hold them."""
    run = tmp_path / "run"
    shutil.copytree(static_run, run)
    step_dir = find_checkpoint(run)
    udir = universal_checkpoint(step_dir)
    assert udir == run / "checkpoints" / "universal" / step_dir.name and not (step_dir / "universal").exists()

    model, optimizer = _built(step_dir)
    assert isinstance(optimizer, Optimizers)  # tiny.yaml: sparse hash-table gradients
    assert load_universal(model, optimizer, udir) == 2
    ref_model, ref_optimizer = _built(step_dir)
    load_weights(ref_model, step_dir)
    ref_optimizer.load_state_dict(load_pt(step_dir / "optimizer.pt"))

    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name
    got, want = _adam_state(model, optimizer), _adam_state(ref_model, ref_optimizer)
    assert set(got) == set(want) == {n for n, _ in model.named_parameters()}
    for name in want:
        assert float(got[name]["step"]) == float(want[name]["step"]) == 2.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got[name][key], want[name][key]), (name, key)


def test_a_half_written_conversion_is_redone_and_never_read(static_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(static_run, run)
    step_dir = find_checkpoint(run)
    partial = universal_dir(step_dir).with_name(step_dir.name + ".tmp")
    (partial / "zero" / "local_decoder.lm_head.weight").mkdir(parents=True)
    (partial / "zero" / "local_decoder.lm_head.weight" / "fp32.pt").write_bytes(b"cut off")

    code, out, err = run_cli(capsys, "consolidate", run, "--universal")
    assert code == 0, err
    assert not partial.exists()
    model, optimizer = _built(step_dir)
    assert load_universal(model, optimizer, universal_dir(step_dir)) == 2


def test_a_universal_form_of_another_model_is_refused_in_one_line(static_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(static_run, run)
    step_dir = find_checkpoint(run)
    udir = universal_checkpoint(step_dir)
    cfg = checkpoint_config(step_dir)
    cfg.model.decoder.dim *= 2
    model = build_model(cfg.model)
    with pytest.raises(CheckpointError, match="resume with the model config it was trained with"):
        load_universal(model, build_optimizer(model, cfg.optimizer), udir)


def test_resuming_with_another_model_config_is_refused_in_one_line(static_run, tmp_path, cache_dir):
    """Layouts can change between a checkpoint and its resume; the model cannot."""
    run = tmp_path / "run"
    shutil.copytree(static_run, run)
    line = assert_user_error(
        [
            "train",
            CONFIGS / "tiny.yaml",
            f"run_dir={run}",
            f"data.cache_dir={cache_dir}",
            "patching.mode=static",
            *TINY_BLT,
            "training.steps=4",
            "model.decoder.layers=2",
        ],
        watch=[run],
        contains="another model config (model.decoder.layers: 1 in the checkpoint, 2 in the config)",
        progress=("data: ",),
    )
    assert "blt train: error:" in line


def test_a_damaged_optimizer_file_stops_the_conversion_in_one_line(static_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(static_run, run)
    step_dir = find_checkpoint(run)
    (step_dir / "optimizer.pt").write_bytes((step_dir / "optimizer.pt").read_bytes()[:100])
    assert_user_error(["consolidate", run, "--universal"], watch=[step_dir], contains="optimizer.pt")
    assert not (run / "checkpoints" / "universal").exists()


def test_the_universal_form_is_made_once_and_again_for_a_checkpoint_saved_anew(static_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(static_run, run)
    step_dir = find_checkpoint(run)
    said: list[str] = []
    universal_checkpoint(step_dir, said.append)
    universal_checkpoint(step_dir, said.append)  # cached
    assert len(said) == 1 and "converted" in said[0]
    state = step_dir / "state.json"  # the same step saved again (by a run resumed from an earlier one)
    state.write_text(state.read_text().replace('"step": 2', '"step": 2, "again": true'))
    universal_checkpoint(step_dir, said.append)
    assert len(said) == 2
