"""Exports: `blt export` (engine-free safetensors dirs) reload to the same BPB and the same
generations without DeepSpeed; `--format hf` loads in transformers with our logits; `blt import-hf`
brings an HF BLT back, to evaluate or fine-tune."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from badinput import assert_user_error
from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli

ROOT = CONFIGS.parent
# a child Python in which `import deepspeed` fails, as on a machine without it
NO_DEEPSPEED = "import sys; sys.modules['deepspeed'] = None; from blt.cli import main; sys.exit(main(sys.argv[1:]))"


def without_deepspeed(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_DEEPSPEED, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
        cwd=cwd,
    )


def train(capsys, run: Path, cache_dir: Path, entropy_run: Path, *extra) -> float:
    code, _, err = run_cli(
        capsys,
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        f"patching.entropy_model={entropy_run}",
        *TINY_BLT,
        "training.steps=6",
        *extra,
    )
    assert code == 0, err
    return [m for m in read_metrics(run) if "val_bpb" in m][-1]["val_bpb"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, entropy_run):
    run = tmp_path_factory.mktemp("export") / "run"
    code = subprocess.run(
        [
            sys.executable,
            "-m",
            "blt",
            "train",
            str(CONFIGS / "tiny.yaml"),
            f"run_dir={run}",
            f"data.cache_dir={cache_dir}",
            f"patching.entropy_model={entropy_run}",
            *TINY_BLT,
            "training.steps=6",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert code.returncode == 0, code.stderr
    return run


def test_export_reloads_to_the_same_bpb_and_text_without_deepspeed(trained, tmp_path, capsys):
    out = tmp_path / "export"
    code, stdout, err = run_cli(capsys, "export", trained, out)
    assert code == 0, err
    assert json.loads(stdout)["step"] == 6
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == [
        "README.md",
        "config.yaml",
        "entropy_model/README.md",
        "entropy_model/config.yaml",
        "entropy_model/export.json",
        "entropy_model/model.safetensors",
        "export.json",
        "model.safetensors",
    ]
    assert (
        "patching:\n" in (out / "config.yaml").read_text()
        and "entropy_model: entropy_model" in (out / "config.yaml").read_text()
    )
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
    for args, words in [
        ((trained, tmp_path / "full"), "not empty"),
        ((tmp_path / "missing", tmp_path / "o1"), "not found"),
        ((trained, tmp_path / "o2", "--format", "hf"), "model.hf_compat"),
    ]:
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
    from blt.disk import umask

    # readable by whoever may read the dir's other files (safetensors alone would write 0600)
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask()
    hf = transformers.BltForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    from blt.artifacts import build_patcher, load_model
    from blt.hf import hf_patch_lengths

    loaded = load_model(run, patcher=False)
    model, cfg = loaded.model, loaded.cfg
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
    code, _, err = run_cli(
        capsys,
        "train",
        tmp_path / "imported" / "config.yaml",
        f"run_dir={ft}",
        f"training.init_from={tmp_path / 'imported'}",
        f"data.cache_dir={cache_dir}",
        "training.steps=2",
        "training.batch_size=2",
        "eval.every=0",
        "eval.max_bytes=2048",
        "logging.progress=false",
        "logging.images=false",
        "logging.samples=0",
        "patching.entropy_cache=false",
    )
    assert code == 0, err
    first = next(m for m in read_metrics(ft) if "loss" in m)
    scratch = next(m for m in read_metrics(run) if "loss" in m)
    assert first["loss"] < scratch["loss"] - 0.3  # not a fresh init: the imported weights


def small_hf_dir(path: Path) -> Path:
    """A small HF BltForCausalLM dir (static patching, random weights) written by write_hf."""
    from blt.config import config_from_dict
    from blt.hf import write_hf
    from blt.model import build_model

    local = {"dim": 32, "layers": 1, "heads": 2, "window": 16}
    cfg = config_from_dict(
        {
            "model": {
                "encoder": local,
                "decoder": local,
                "global_model": {"dim": 48, "layers": 1, "heads": 2},
                "cross_attn_heads": 2,
                "hash_buckets": 64,
                "hf_compat": True,
            },
            "patching": {"mode": "static", "split_first_byte": True},
            "data": {"seq_len": 64},
        }
    )
    write_hf(path, cfg, build_model(cfg.model).state_dict())
    return path


def test_export_to_a_bad_target_is_one_line_and_leaves_nothing(trained, tmp_path):
    (tmp_path / "some_file.txt").write_text("keep me")
    for out, words in [
        ("/proc/x", "cannot write"),
        ("some_file.txt", "is a file"),
        ("some_file.txt/sub", "is a file"),
        ("model.safetensors", "directory"),
    ]:
        assert_user_error(["export", trained, out], watch=[tmp_path, trained], cwd=tmp_path, contains=words)
    # a failure after the models are loaded (HF needs hf_compat) leaves neither the dir nor its parents
    assert_user_error(
        ["export", trained, "new/hf", "--format", "hf"], watch=[tmp_path], cwd=tmp_path, contains="model.hf_compat"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some_file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_export_under_a_read_only_dir_is_one_line(trained, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_user_error(["export", trained, ro / "x"], watch=[ro], contains="cannot write")
    finally:
        ro.chmod(0o755)


def test_export_that_fails_while_writing_leaves_nothing(trained, tmp_path, monkeypatch):
    import blt.export

    def full(cfg, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(blt.export, "dump_config", full)  # after the entropy model and the weights are written
    with pytest.raises(blt.export.ExportError, match="No space left") as e:
        blt.export.export(trained, tmp_path / "a" / "out")
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_import_hf_of_a_bad_config_json_is_one_line(tmp_path):
    good = small_hf_dir(tmp_path / "good")
    config = json.loads((good / "config.json").read_text())
    enc = config["encoder_config"]
    cases = [
        (b"{not json", "not readable JSON"),
        (json.dumps({"model_type": "llama", "hidden_size": 32}).encode(), "model_type"),
        # a missing key takes HF's default (500002 hash buckets), which the weights do not fit
        (json.dumps({k: v for k, v in config.items() if k != "encoder_hash_byte_group_vocab"}).encode(), "do not fit"),
        (json.dumps({**config, "encoder_config": {**enc, "hidden_size": "32"}}).encode(), "hidden_size"),
    ]
    for i, (text, words) in enumerate(cases):  # more: test_hf.py::test_read_errors_of_bad_fields
        bad = tmp_path / f"bad{i}"
        shutil.copytree(good, bad)
        (bad / "config.json").write_bytes(text)
        assert_user_error(["import-hf", bad, tmp_path / "out"], watch=[tmp_path], contains=words)


def test_dashboard_on_an_address_it_cannot_bind_is_one_line(tmp_path):
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"")  # found before any binding
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, words in [
            (["--host", "10.255.255.1"], "--host"),
            (["--port", "70000"], "--port"),
            (["--port", port], "pick another --port"),
        ]:
            assert_user_error(["dashboard", tmp_path, *args], watch=[tmp_path], contains=words)
