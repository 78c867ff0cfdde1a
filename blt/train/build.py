"""The steps that put a training run together, in the order `Trainer.__init__` takes them. Each
takes the config plus the runtime objects built before it and returns what it builds; none keeps
state of its own.

    device, amp_dtype = build_device(cfg, world)
    engine_class(kind).prepare(cfg, world, device, kind)      # the engine's config changes, process group
    rundir = build_run_dir(cfg, world)
    data, loader, val = build_data(cfg, world)
    patcher = build_patching(cfg, world, device, data, loader)
    model = build_initial_model(cfg, device, rundir.resume_from)
    info = describe_model(cfg, model, patcher, data)          # before ZeRO-3 partitions the weights
    engine = build_engine(cfg, world, kind, model, device, amp_dtype, rundir.resume_from)
    step, state = resume_or_calibrate(cfg, engine, loader, patcher, rundir.resume_from)
    meter, peak = build_meter(cfg, world, device, engine.amp_dtype, info)
    trace = start_run_files(cfg, world, rundir, step, {**info, **peak})   # the first write

Nothing is written before `start_run_files`: every check of the steps above has passed by then.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from blt.artifacts import build_patcher, load_model
from blt.config import Config, ConfigError, dump_config
from blt.data import Corpus, DataError, StreamLoader, prepare_data
from blt.data.entropies import EntropyStore, model_fingerprint
from blt.model import build_model
from blt.model.flops import flops_report, model_info
from blt.monitor.peak import peak_flops
from blt.patching import Patcher, mode_of
from blt.proc import log
from blt.train.compile import apply_compile
from blt.train.deepspeed_engine import DeepSpeedEngine
from blt.train.device import cpu_threads, resolve_device
from blt.train.distributed import Dist
from blt.train.engine import LocalEngine
from blt.train.meter import StepMeter
from blt.train.recompute import apply_activation_checkpointing
from blt.train.rundir import RunDir, check_resumable, describe_diff, model_diff, prepare_run_dir
from blt.train.trace import DataTrace


def engine_class(kind: str) -> type:
    """The engine of distributed.engine resolved (choose_engine): local, deepspeed or accelerate."""
    return LocalEngine if kind == "local" else DeepSpeedEngine


def entropy_patching(cfg: Config) -> bool:
    """Does this run patch by an entropy model (so it has a threshold to calibrate and record)?"""
    return cfg.model.arch == "blt" and mode_of(cfg.patching).needs_entropies


def build_device(cfg: Config, world: Dist) -> tuple[torch.device, torch.dtype | None]:
    """This process's CPU threads, its device and autocast dtype (None = fp32)."""
    torch.set_num_threads(cpu_threads(cfg, world))
    return resolve_device(cfg, world.local_rank)


def build_run_dir(cfg: Config, world: Dist) -> RunDir:
    """The run directory, checked by rank 0 and shared (nothing is created yet); a checkpoint to
    resume must fit the model config."""
    rundir = world.on_main_first(lambda: prepare_run_dir(cfg), share=True)
    if rundir.resume_from is not None:
        check_resumable(cfg, rundir.resume_from)
    return rundir


def build_data(cfg: Config, world: Dist) -> tuple[Corpus, StreamLoader, list[tuple[str, np.ndarray]]]:
    """The prepared data (rank 0 prepares files into the cache, the others open it), this rank's
    share of the training stream and each source's validation ids."""
    corpus = world.on_main_first(lambda: prepare_data(cfg.data, log=log, build=world.is_main))
    loader = StreamLoader(
        corpus.sources, cfg.data.seq_len, cfg.training.batch_size, cfg.data.seed, world.rank, world.world_size
    )
    return corpus, loader, corpus.val_tokens(cfg.eval.max_bytes)


def build_patching(cfg: Config, world: Dist, device: torch.device, corpus: Corpus, loader: StreamLoader) -> Patcher:
    """The patcher (with its entropy model, if any). With patching.entropy_cache, the loader reads
    the entropies of every training window precomputed beside each source's shards; missing ones
    are computed here first, every rank its share of the shards."""
    patcher = build_patcher(cfg, device)
    if entropy_patching(cfg) and cfg.patching.entropy_cache:
        fingerprint = model_fingerprint(patcher.model)
        stores = [
            EntropyStore(s.data, fingerprint, cfg.data.seq_len, cfg.patching.entropy_model) for s in corpus.sources
        ]
        for source, store in zip(corpus.sources, stores):
            others = store.others()
            if store.missing() and others and not corpus.cached[source.name]:
                o = others[0]
                raise DataError(
                    f"the entropies in '{source.data.root}/entropies' were computed by the entropy model "
                    f"{o['model']} (weights {o['fingerprint'][:12]}) at data.seq_len={o['seq_len']}, not by "
                    f"patching.entropy_model={cfg.patching.entropy_model} at data.seq_len="
                    f"{cfg.data.seq_len}; run `blt prepare --out {source.data.root} --entropy-model "
                    f"{cfg.patching.entropy_model} --seq-len {cfg.data.seq_len}`, or set "
                    "patching.entropy_cache=false"
                )
            if store.missing():
                log(
                    f"entropies: computing {len(store.missing())} shard(s) of source '{source.name}' on "
                    f"{world.world_size} rank(s) -> {store.dir}"
                )
                store.compute(patcher, world.rank, world.world_size, log=log)
        world.barrier()
        loader.use_entropies([store.load() for store in stores])
    return patcher


def init_weights_from(model: nn.Module, source: str, cfg: Config) -> None:
    """Fine-tuning: copy the weights of a run, checkpoint or export into `model` (built from `cfg`;
    same architecture)."""
    src = load_model(source, "cpu", patcher=False)
    src_cfg, where = src.cfg, src.where
    try:
        model.load_state_dict(src.model.state_dict())
    except RuntimeError as e:
        diff = model_diff(src_cfg, cfg)
        if diff:
            detail = describe_diff(diff, "its config.yaml", "this config")
        else:  # the same config and still no fit: say what torch found
            lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
            detail = "; ".join(lines)[:300] or type(e).__name__
        raise ConfigError(
            f"training.init_from '{where}' does not fit this model config ({detail}); "
            "use the model section of its config.yaml"
        ) from None


def build_initial_model(cfg: Config, device: torch.device, resume_from: Path | None) -> nn.Module:
    """The model on `device` with the same initial weights on every rank, or, fine-tuning a fresh
    run, the weights of training.init_from (a resume loads its checkpoint's later)."""
    torch.manual_seed(cfg.training.seed)  # the same initial weights on every rank (CPU and CUDA generators)
    with torch.device(device):  # initialised where it trains: a 4.5B model is not built on the CPU first
        model = build_model(cfg.model, cfg.patching)
    if cfg.training.init_from and resume_from is None:
        init_weights_from(model, cfg.training.init_from, cfg)
        log(f"weights from {cfg.training.init_from} (training.init_from)")
    return model


def describe_model(cfg: Config, model: nn.Module, patcher: Patcher, data: Corpus) -> dict:
    """model_info.json: architecture, parameter counts, FLOPs per byte, bytes of each split (read
    before ZeRO-3 partitions the weights)."""
    ecfg = patcher.model.cfg if patcher.model is not None else None
    return {
        **model_info(cfg, model, ecfg),
        "train_bytes": data.train_bytes,
        "val_bytes": data.val_bytes,
        "sources": loader_sources(data),
    }


def build_engine(
    cfg: Config,
    world: Dist,
    kind: str,
    model: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    resume_from: Path | None = None,
):
    """Activation checkpointing and compiling if asked, distinct dropout masks per rank, then the
    engine (its `model` and `amp_dtype` are the ones to train and evaluate with)."""
    if cfg.training.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.training.compile:
        n = apply_compile(model)
        log(f"training.compile: {n} Transformer blocks compile (torch.compile, inductor) at their first call")
    if world.world_size > 1:
        torch.manual_seed(cfg.training.seed + 1 + world.rank)  # distinct dropout masks per rank
    if kind == "local":
        return LocalEngine(model, cfg, device, amp_dtype)
    return DeepSpeedEngine(model, cfg, device, world, use_accelerate=kind == "accelerate", resume_from=resume_from)


def loader_sources(data: Corpus) -> list[dict]:
    """Each training source: name, weight, prepared directory, train bytes."""
    return [
        {"name": s.name, "weight": s.weight, "dir": str(s.data.root), "train_bytes": s.data.totals("train")[0]}
        for s in data.sources
    ]


def resume_or_calibrate(
    cfg: Config, engine, loader: StreamLoader, patcher: Patcher, resume_from: Path | None
) -> tuple[int, dict]:
    """(step, trainer state): a resume loads the checkpoint into the engine, the loader and the
    patcher's threshold; a fresh entropy-patched run without a threshold calibrates one on a
    sample of training windows. The resolved config then records the threshold used and where
    the entropy model is."""
    entropy = entropy_patching(cfg)
    step, state = 0, {}
    if resume_from is not None:
        state = engine.load(resume_from)
        loader.load_state_dict(state["data"])
        step = state["step"]
        patcher.threshold = state.get("threshold", patcher.threshold)
        log(f"resumed from {resume_from} at step {step}")
    elif entropy and patcher.threshold is None:
        th = patcher.calibrate(loader.sample(16, cfg.data.seed + 1)[:, :-1])  # (16, T) input bytes
        log(f"entropy threshold {th:.4f} nats gives mean patch size {cfg.patching.target_patch_size} bytes")
    if entropy:
        cfg.patching.threshold = patcher.threshold
        cfg.patching.entropy_model = str(Path(cfg.patching.entropy_model).resolve())
    return step, state


def build_meter(
    cfg: Config, world: Dist, device: torch.device, amp_dtype: torch.dtype | None, info: dict
) -> tuple[StepMeter, dict]:
    """The step meter (throughput, MFU against this device's peak at the measured mean patch size,
    measured by rank 0 only) and the peak for model_info.json."""
    peak, source = peak_flops(device, amp_dtype) if world.is_main else (1.0, "")

    def flops_at(patch_size: float) -> float:
        rep = flops_report(cfg.model, cfg.data.seq_len, patch_size, info["params"], patching=cfg.patching)
        return rep.flops_per_byte

    return StepMeter(flops_at, peak, world.world_size), {"peak_flops_per_device": peak, "peak_flops_source": source}


def start_run_files(cfg: Config, world: Dist, rundir: RunDir, step: int, info: dict) -> DataTrace | None:
    """The first writes, once every check has passed: the run dir, this rank's data trace (if
    logging.data_trace), and on rank 0 config.yaml and model_info.json. A failure here takes back
    what this start wrote."""
    world.on_main_first(rundir.create)
    try:
        trace = DataTrace(rundir.path, world.rank, step) if cfg.logging.data_trace else None
        if world.is_main:
            dump_config(cfg, rundir.path / "config.yaml")
            (rundir.path / "model_info.json").write_text(json.dumps(info, indent=1))
    except BaseException:
        if world.is_main:  # no step has run: all the run dir holds is this start's
            rundir.discard()
        raise
    return trace


def start_line(cfg: Config, world: Dist, engine, info: dict, data: Corpus, run_dir: Path) -> str:
    """The one line a start logs: model size and cost, data, processes and engine, run dir."""
    where = f"{world.world_size} process{'es' if world.world_size > 1 else ''}, {engine.label}"
    per_patch = f" at {info['assumed_patch_size']:g} bytes per patch" if cfg.model.arch == "blt" else ""
    with_entropy = (
        f" ({info['flops_per_byte_with_entropy']:.3g} with the entropy model)"
        if info["flops_per_byte_with_entropy"] != info["flops_per_byte"]
        else ""
    )
    return (
        f"{cfg.model.arch}: {info['params']:,} params ({info['params_non_embedding']:,} non-embedding), "
        f"{info['flops_per_byte']:.3g} train FLOPs/byte{with_entropy}{per_patch}, "
        f"{data.train_bytes:,} train / {data.val_bytes:,} val bytes"
        f"{f' in {len(data.sources)} sources' if len(data.sources) > 1 else ''}, "
        f"{where} -> {run_dir}"
    )
