"""Monitoring read back through each tool's own reader: an offline W&B run (`wandb leet inspect`),
TensorBoard event files (TensorBoard's EventAccumulator), the local dashboard's HTTP API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from blt.config import load_config
from blt.model.flops import flops_report
from blt.monitor.wandb_sink import resolve_mode
from blt.net import free_port

from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli

WANDB = str(Path(sys.executable).parent / "wandb")
LOGGING_ON = [
    "logging.wandb.mode=offline",
    "logging.tensorboard=true",
    "logging.images=true",
    "logging.samples=1",
    "logging.sample_bytes=16",
    "logging.every=1",
    "eval.every=2",
    "patching.mode=learned",
    "logging.wandb.tags=[test,tiny]",
    "logging.wandb.group=monitoring",
]


def train_args(run: Path, cache_dir: Path, *extra) -> list:
    return [
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        *TINY_BLT,
        *LOGGING_ON,
        *extra,
    ]


def wandb_runs(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*"))


def inspect(run_dir: Path, summary: bool) -> list[dict]:
    out = subprocess.run(
        [WANDB, "leet", "inspect", *(["--summary"] if summary else []), "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    if summary:
        return [json.loads(out.stdout)]
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, cache_dir) -> Path:
    run = tmp_path_factory.mktemp("monitored") / "run"
    code = __import__("blt.cli", fromlist=["main"]).main(
        [str(a) for a in train_args(run, cache_dir, "training.steps=4")]
    )
    assert code == 0
    return run


def test_offline_wandb_run_holds_metrics_config_image_and_samples(logged_run):
    (wb,) = wandb_runs(logged_run)
    summary = inspect(wb, summary=True)[0]
    assert summary["project"] == "blt" and summary["state"] == "finished"
    assert summary["run_id"] == (logged_run / "wandb_run_id").read_text()
    config = summary["config"]
    assert config["model"]["global_model"]["dim"] == 48 and config["training"]["steps"] == 4
    s = summary["summary"]
    for key in (
        "train/loss",
        "train/bpb",
        "train/bytes_per_s",
        "train/mfu",
        "train/time_fwd_bwd_s",
        "train/peak_mem_gb",
        "val/bpb",
        "train/avg_patch_size",
        "train/ratio_loss",
        "train/boundary_rate",
    ):
        assert key in s, key
    assert s["val/patches"]["_type"] == "image-file" and s["val/patches"]["width"] > 100
    assert s["val/samples"]["_type"] == "table-file" and s["val/samples"]["nrows"] == 1
    assert s["train/patch_size"]["_type"] == "histogram"
    # every logged step is in the history, with the numbers metrics.jsonl holds
    history = {
        r["history"]["step"]["num"]: r["history"]["item"]
        for r in inspect(wb, summary=False)
        if r.get("type") == "history"
    }
    losses = {m["step"]: m["loss"] for m in read_metrics(logged_run) if "loss" in m}
    assert {step: history[step]["train/loss"] for step in losses} == pytest.approx(losses)
    run_record = next(r["run"] for r in inspect(wb, summary=False) if r.get("type") == "run")
    assert run_record["tags"] == ["test", "tiny"] and run_record["run_group"] == "monitoring"


def test_tensorboard_scalars_read_back(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((logged_run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    losses = {m["step"]: m["loss"] for m in read_metrics(logged_run) if "loss" in m}
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in acc.Scalars("val/bpb")] == [2, 4]
    # learned patching: how the compression settles, step by step
    for key in ("ratio_loss", "boundary_rate", "avg_patch_size"):
        logged = {m["step"]: m[key] for m in read_metrics(logged_run) if key in m and "loss" in m}
        assert {e.step: e.value for e in acc.Scalars(f"train/{key}")} == pytest.approx(logged, rel=1e-6)
    assert "val/patches" in acc.Tags()["images"] and "train/patch_size" in acc.Tags()["histograms"]
    # the same picture is a file beside the run, for a look without any dashboard
    assert sorted(p.name for p in (logged_run / "images").iterdir()) == ["patches_00000002.png", "patches_00000004.png"]


def test_throughput_mfu_and_step_time_split(logged_run):
    line = [m for m in read_metrics(logged_run) if "loss" in m][-1]
    assert line["bytes_per_s"] > 0 and line["patches_per_s"] > 0
    assert 0 < line["mfu"] < 1 and line["tflops"] > 0 and line["peak_mem_gb"] > 0
    # learned patching: FLOPs (so MFU) at the mean patch size the interval measured, not the target
    cfg = load_config(logged_run / "config.yaml")
    at = flops_report(cfg.model, cfg.data.seq_len, line["avg_patch_size"], 0, patching=cfg.patching).flops_per_byte
    assert line["tflops"] * 1e12 == pytest.approx(at * line["bytes_per_s"], rel=1e-9)
    parts = line["time_data_s"] + line["time_fwd_bwd_s"] + line["time_optimizer_s"]
    assert 0 < parts <= line["step_time_s"] * 1.01
    info = json.loads((logged_run / "model_info.json").read_text())
    assert info["peak_flops_per_device"] > 1e9 and "measured" in info["peak_flops_source"]
    hist = [m["patch_size_hist"] for m in read_metrics(logged_run) if "patch_size_hist" in m][-1]
    sizes = sum(i * c for i, c in enumerate(hist)) / sum(hist)  # the histogram of the same step
    assert sizes == pytest.approx(line["avg_patch_size"]) and len(hist) - 1 <= cfg.patching.max_patch_length
    samples = [m["samples"] for m in read_metrics(logged_run) if "samples" in m][-1]
    assert samples[0]["prompt"] and set(samples[0]) == {"prompt", "output", "settings"}


def test_resumed_run_continues_the_same_wandb_run(tmp_path, capsys, cache_dir):
    run = tmp_path / "resumed"
    code, _, err = run_cli(capsys, *train_args(run, cache_dir, "training.steps=2"))
    assert code == 0, err
    code, _, err = run_cli(capsys, *train_args(run, cache_dir, "training.steps=4"))
    assert code == 0, err
    first, second = wandb_runs(run)
    ids = {inspect(d, summary=True)[0]["run_id"] for d in (first, second)}
    assert ids == {(run / "wandb_run_id").read_text()}


def test_wandb_auto_mode_goes_offline_without_waiting(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    t0 = time.time()
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # a key, but no W&B server reachable
    assert resolve_mode("auto", timeout=2.0) == "offline"
    assert time.time() - t0 < 5
    assert resolve_mode("online") == "online" and resolve_mode("disabled") == "disabled"


def test_dashboard_serves_the_scalars_on_localhost(logged_run):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "blt", "dashboard", str(logged_run), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(CONFIGS.parent)},
    )
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag=train/loss"
        deadline, data = time.time() + 60, None
        while time.time() < deadline and data is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    data = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        assert data is not None, proc.stderr.read() if proc.poll() is not None else "no answer"
        losses = {m["step"]: m["loss"] for m in read_metrics(logged_run) if "loss" in m}
        assert {step: value for _, step, value in data} == pytest.approx(losses, rel=1e-6)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out


def test_dashboard_without_event_files_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "dashboard", tmp_path)
    assert code == 2 and "no TensorBoard event files" in err


@pytest.mark.slow
def test_only_rank_zero_logs_in_a_two_process_run(tmp_path, cache_dir):
    from test_distributed import launch

    run = tmp_path / "two"
    args = [
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        *TINY_BLT,
        *LOGGING_ON,
        "training.batch_size=2",
        "training.steps=4",
        "model.hash_sparse_grad=false",
        "distributed.zero_stage=3",
    ]
    done = launch("torchrun.sh", args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(wandb_runs(run)) == 1
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(list((run / "images").iterdir())) == 2  # one picture per validation, from rank 0
    assert done.stderr.count("W&B run ") == 1
    summary = inspect(wandb_runs(run)[0], summary=True)[0]["summary"]
    assert "val/patches" in summary and "val/samples" in summary
    # the logged loss is the mean over both ranks' batches, once per step
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2, 3, 4]
