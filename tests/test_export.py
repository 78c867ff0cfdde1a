"""Exports: `blt export` (engine-free safetensors dirs) reload to the same BPB and the same
generations without DeepSpeed; `--format hf` loads in transformers with our logits; `blt import-hf`
brings an HF BLT back, to evaluate or fine-tune."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli

ROOT = CONFIGS.parent
# a child Python in which `import deepspeed` fails, as on a machine without it
NO_DEEPSPEED = ("import sys; sys.modules['deepspeed'] = None; from blt.cli import main; "
                "sys.exit(main(sys.argv[1:]))")


def without_deepspeed(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_DEEPSPEED, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, cwd=cwd)


def train(capsys, run: Path, cache_dir: Path, entropy_run: Path, *extra) -> float:
    code, _, err = run_cli(capsys, "train", CONFIGS / "tiny.yaml", f"run_dir={run}", f"data.cache_dir={cache_dir}",
                           f"patching.entropy_model={entropy_run}", *TINY_BLT, "training.steps=6", *extra)
    assert code == 0, err
    return [m for m in read_metrics(run) if "val_bpb" in m][-1]["val_bpb"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, entropy_run):
    run = tmp_path_factory.mktemp("export") / "run"
    code = subprocess.run([sys.executable, "-m", "blt", "train", str(CONFIGS / "tiny.yaml"), f"run_dir={run}",
                           f"data.cache_dir={cache_dir}", f"patching.entropy_model={entropy_run}", *TINY_BLT,
                           "training.steps=6"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert code.returncode == 0, code.stderr
    return run


def test_export_reloads_to_the_same_bpb_and_text_without_deepspeed(trained, tmp_path, capsys):
    out = tmp_path / "export"
    code, stdout, err = run_cli(capsys, "export", trained, out)
    assert code == 0, err
    assert json.loads(stdout)["step"] == 6
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["README.md", "config.yaml", "entropy_model/README.md", "entropy_model/config.yaml",
                     "entropy_model/export.json", "entropy_model/model.safetensors", "export.json", "model.safetensors"]
    assert "patching:\n" in (out / "config.yaml").read_text() and "entropy_model: entropy_model" in (
        out / "config.yaml").read_text()
    card = (out / "README.md").read_text()
    assert "validation bits per byte" in card and "training steps: 6" in card
    moved = tmp_path / "elsewhere" / "model"  # self-contained: its entropy model travels with it
    shutil.copytree(out, moved)
    val_bpb = [m for m in read_metrics(trained) if "val_bpb" in m][-1]["val_bpb"]
    done = without_deepspeed("eval", "elsewhere/model", "--max-bytes", 2048, cwd=tmp_path)  # a relative path
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bpb"] == pytest.approx(val_bpb, abs=1e-5)  # the run's last validation
    gen = ["generate", "--prompt", "ROMEO.", "--max-bytes", 40, "--temperature", 0]
    from_export = without_deepspeed(gen[0], moved, *gen[1:])
    assert from_export.returncode == 0, from_export.stderr
    code, from_run, err = run_cli(capsys, gen[0], trained, *gen[1:])
    assert code == 0, err
    assert from_export.stdout == from_run and len(from_run) > len("ROMEO.") + 10


def test_export_refuses_bad_input_with_one_line(trained, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    for args, words in [((trained, tmp_path / "full"), "not empty"),
                        ((tmp_path / "missing", tmp_path / "o1"), "not found"),
                        ((trained, tmp_path / "o2", "--format", "hf"), "model.hf_compat")]:
        code, _, err = run_cli(capsys, "export", *args)
        assert code == 2 and words in err and err.count("\n") == 1, err
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_hf_export_loads_in_transformers_and_imports_back(tmp_path, capsys, cache_dir, entropy_run):
    """An hf_compat BLT with entropy patching -> HF dir (transformers: our logits) -> import-hf ->
    the same BPB; then fine-tuning starts from the imported weights."""
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    train(capsys, run, cache_dir, entropy_run, "model.hf_compat=true", "patching.split_first_byte=true")
    code, _, err = run_cli(capsys, "export", run, tmp_path / "hf", "--format", "hf")
    assert code == 0, err
    hf = transformers.BltForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    from blt.hf import hf_patch_lengths
    from blt.train.checkpoint import load_model_from_checkpoint
    from blt.train.loop import build_patcher

    model, cfg, _ = load_model_from_checkpoint(run)
    ids = torch.tensor([[1] + [b + 4 for b in b"ROMEO. What say you, friar?"]])
    pid = build_patcher(cfg, "cpu")(ids)
    with torch.no_grad():
        ours = model(ids, pid)
        theirs = hf(ids, patch_lengths=hf_patch_lengths(pid), use_cache=False).logits
    assert (ours - theirs).abs().max() <= 1e-4
    code, _, err = run_cli(capsys, "import-hf", tmp_path / "hf", tmp_path / "imported")
    assert code == 0, err
    bpb = {}
    for name, path in [("run", run), ("imported", tmp_path / "imported")]:
        code, out, err = run_cli(capsys, "eval", path, "--max-bytes", 2048)
        assert code == 0, err
        bpb[name] = json.loads(out)["bpb"]
    assert bpb["imported"] == pytest.approx(bpb["run"], abs=1e-5)
    # fine-tune the import with its own config.yaml: step 0 starts from its weights
    ft = tmp_path / "ft"
    code, _, err = run_cli(capsys, "train", tmp_path / "imported" / "config.yaml", f"run_dir={ft}",
                           f"training.init_from={tmp_path / 'imported'}", f"data.cache_dir={cache_dir}",
                           "training.steps=2", "training.batch_size=2", "eval.every=0", "eval.max_bytes=2048",
                           "logging.progress=false", "logging.images=false", "logging.samples=0",
                           "patching.entropy_cache=false")
    assert code == 0, err
    first = next(m for m in read_metrics(ft) if "loss" in m)
    scratch = next(m for m in read_metrics(run) if "loss" in m)
    assert first["loss"] < scratch["loss"] - 0.3  # not a fresh init: the imported weights
