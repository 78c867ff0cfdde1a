"""Engine choice, DeepSpeed config derivation, the launch plan, activation checkpointing and sharded
evaluation: the single-process side of distributed training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blt.config import ConfigError, load_config
from blt.evaluate import evaluate
from blt.model import build_model
from blt.train.deepspeed_engine import deepspeed_config
from blt.train.distributed import Dist, choose_engine
from blt.train.plan import count_params, make_plan

from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli


def tiny(*extra):
    return load_config(CONFIGS / "tiny.yaml", [*TINY_BLT, "patching.mode=static", *extra])


def test_engine_choice_follows_the_launcher():
    cfg = tiny()
    assert choose_engine(cfg, Dist()) == "local"
    assert choose_engine(cfg, Dist(rank=1, world_size=4)) == "deepspeed"
    with pytest.raises(ConfigError, match="distributed.engine=deepspeed"):
        choose_engine(tiny("distributed.engine=local"), Dist(world_size=2))


def test_deepspeed_config_is_derived_from_the_training_config():
    cfg = tiny(
        "training.batch_size=3",
        "training.grad_accum=5",
        "optimizer.grad_clip=0.5",
        "distributed.zero_stage=3",
        "distributed.offload_optimizer=cpu",
        "distributed.offload_params=cpu",
    )
    ds = deepspeed_config(cfg, world_size=16, dtype="bf16", gpu=True)
    assert ds["train_batch_size"] == 3 * 5 * 16
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 5)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize(
    "bad,message",
    [
        ("distributed.zero_stage=4", "zero_stage must be 0, 1, 2 or 3"),
        ("distributed.offload_params=cpu", "offload_params needs distributed.zero_stage=3"),
        ("distributed.engine=fsdp", "distributed.engine"),
    ],
)
def test_bad_distributed_settings_are_one_line_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        tiny(bad)


def test_fp16_without_deepspeed_is_refused(tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={tmp_path / 'r'}",
        *TINY_BLT,
        "patching.mode=static",
        "training.dtype=fp16",
        "training.steps=1",
    )
    assert code == 2 and "fp16" in err and "deepspeed" in err and "Traceback" not in err


def test_plan_counts_parameters_without_allocating_them():
    cfg = tiny()
    assert count_params(cfg)[0] == sum(p.numel() for p in build_model(cfg.model).parameters())
    big = load_config(CONFIGS / "blt_8b.yaml")
    small, large = make_plan(big, 1, 8), make_plan(big, 8, 8)
    assert large["stages"][3].total < small["stages"][3].total  # ZeRO-3 shards over more GPUs
    assert large["stages"][0].total == small["stages"][0].total  # plain data parallel does not
    offload = make_plan(load_config(CONFIGS / "blt_8b.yaml", ["distributed.offload_optimizer=cpu"]), 8, 8)
    assert offload["stages"][2].optimizer == 0 and offload["stages"][2].cpu_offloaded > 0


def test_plan_reports_the_kv_cache_that_cached_generation_allocates():
    """blt plan's generation KV cache per sequence: the byte-level stacks' equal the caches of an
    incremental BLT of data.seq_len bytes, the global model's is per patch, and kv_heads divides it."""
    from blt.generation.incremental import IncrementalBLT

    cfg = tiny()
    kv = make_plan(cfg, 1, 1, gpu=False)["kv_cache"]  # fp32 on CPU
    inc = IncrementalBLT(build_model(cfg.model, cfg.patching), 1, cfg.data.seq_len)
    assert kv["encoder"] == 2 * inc.enc_cache.k.numel() * 4 and kv["decoder"] == 2 * inc.dec_cache.k.numel() * 4
    assert kv["global_model"] == 2 * inc.glob_cache.k.numel() * 4 / cfg.patching.patch_size
    heads = cfg.model.global_model.heads
    mqa = make_plan(tiny("model.global_model.kv_heads=1"), 1, 1, gpu=False)["kv_cache"]
    assert mqa["global_model"] * heads == kv["global_model"] and mqa["encoder"] == kv["encoder"]


def test_plan_cli(capsys):
    code, out, err = run_cli(
        capsys, "plan", CONFIGS / "blt_1b.yaml", "--nodes", 2, "--procs-per-node", 8, "training.grad_accum=4"
    )
    assert code == 0, err
    assert "world size 16" in out and '"gradient_accumulation_steps": 4' in out
    assert "generation KV cache per sequence" in out
    code, _, err = run_cli(capsys, "plan", CONFIGS / "blt_1b.yaml", "--nodes", 0)
    assert code == 2 and "--nodes" in err


def test_activation_checkpointing_trains_identically(tmp_path, capsys, cache_dir):
    runs = {}
    for flag in ("false", "true"):
        run = tmp_path / flag
        code, _, err = run_cli(
            capsys,
            "train",
            CONFIGS / "tiny.yaml",
            f"run_dir={run}",
            f"data.cache_dir={cache_dir}",
            *TINY_BLT,
            "patching.mode=static",
            "model.dropout=0.1",
            "training.steps=3",
            f"training.activation_checkpointing={flag}",
        )
        assert code == 0, err
        runs[flag] = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-6)


def test_sharded_evaluation_equals_one_process():
    """Each rank scores a share of the batches; the summed counts give the one-process BPB."""
    from blt.config import PatchingConfig
    from blt.patching import Patcher

    cfg = tiny()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    patcher = Patcher(PatchingConfig(mode="static", patch_size=4))
    tokens = np.random.default_rng(0).integers(4, 260, 5000).astype(np.uint16)
    whole = evaluate(model, patcher, tokens, 64, 4)
    parts = []
    for rank in range(3):  # 20 batches over 3 ranks: uneven shares, padded rounds
        evaluate(model, patcher, tokens, 64, 4, rank=rank, world_size=3, reduce=lambda s: parts.append(s) or s)
    summed = [sum(col) for col in zip(*parts)]
    assert summed[1] == whole["bytes"]
    assert summed[0] / summed[1] == pytest.approx(whole["loss"], rel=1e-6)


def test_consolidate_refuses_a_single_process_checkpoint(tmp_path, capsys, cache_dir):
    run = tmp_path / "r"
    code, _, err = run_cli(
        capsys,
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        *TINY_BLT,
        "patching.mode=static",
        "training.steps=1",
    )
    assert code == 0, err
    code, _, err = run_cli(capsys, "consolidate", run)
    assert code == 2 and "no ZeRO shards" in err
