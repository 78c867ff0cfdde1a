"""The launch plan of a job, computed without allocating the model or touching a GPU: world size,
the DeepSpeed config blt would derive, parameter counts, and per-GPU memory for each ZeRO stage.

    blt plan configs/blt_8b.yaml --nodes 8 --procs-per-node 8            # 64 x H100 (80 GB)
    DRY_RUN=1 NNODES=8 NGPU=8 launch/slurm.sbatch configs/blt_8b.yaml    # the same, from a launcher

Memory model (per GPU, bytes per parameter as in the ZeRO paper): with bf16/fp16, weights 2 +
gradients 2 + optimizer 12 (fp32 master, Adam m and v); with fp32, 4 + 4 + 8. ZeRO-1 shards the
optimizer over the N processes, ZeRO-2 also the gradients, ZeRO-3 also the weights; offload moves
optimizer states (and with ZeRO-3 weights) to CPU memory. Activations are an estimate: ~17 saved
values per position per layer and dimension (flash attention, SwiGLU), one block input per layer
with activation checkpointing, plus the fp32 logits. Runtime overhead (CUDA context, allocator
fragmentation, communication buffers) is not counted: keep a few GB of headroom.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from blt.config import Config
from blt.model.flops import assumed_patch_size, kv_cache_bytes
from blt.tokens import VOCAB_SIZE
from blt.train.deepspeed_engine import deepspeed_config  # pure: deepspeed itself is not imported
from blt.train.device import resolved_dtype

GiB = 1024**3


@dataclass
class StageMemory:
    stage: int
    weights: float  # bytes per GPU
    grads: float
    optimizer: float
    activations: float
    cpu_offloaded: float  # bytes per process kept in CPU memory instead

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def count_params(cfg: Config) -> tuple[int, int]:
    """(all, non-embedding) parameter counts, from a model built on the meta device (no memory)."""
    from blt.model import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.patching)
    total = sum(p.numel() for p in model.parameters())
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return total, total - embed


def activation_bytes(cfg: Config, dtype: str) -> float:
    """Estimated activation memory of one micro-batch kept for backward."""
    m, t = cfg.model, cfg.training
    elem = 4 if dtype == "fp32" else 2
    B, T = t.batch_size, cfg.data.seq_len
    per_layer = 2 if t.activation_checkpointing else 17  # saved values per position and dimension
    if m.arch == "byte_lm":
        stacks = [(B * T, m.lm)]
    else:
        patches = B * T / assumed_patch_size(m, cfg.patching)
        stacks = [(B * T, m.encoder), (patches, m.global_model), (B * T, m.decoder)]
    total = sum(n * s.layers * s.dim * per_layer * elem for n, s in stacks)
    if t.activation_checkpointing:  # the one block being recomputed holds full activations
        total += max(n * s.dim * 17 * elem for n, s in stacks)
    return total + B * T * VOCAB_SIZE * 4 * 2  # fp32 logits and their gradient


def stage_memory(
    params: int, world: int, stage: int, dtype: str, offload_optimizer: bool, offload_params: bool, activations: float
) -> StageMemory:
    w, g, o = (4, 4, 8) if dtype == "fp32" else (2, 2, 12)
    weights, grads, optim = params * w, params * g, params * o
    if stage >= 1:
        optim /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    cpu = 0.0
    if offload_optimizer and stage >= 1:
        cpu, optim = cpu + optim, 0.0
    if offload_params and stage == 3:
        cpu, weights = cpu + weights, 0.0
    return StageMemory(stage, weights, grads, optim, activations, cpu)


def make_plan(cfg: Config, nodes: int, procs_per_node: int, gpu: bool = True) -> dict:
    """The plan of `cfg` on nodes x procs_per_node processes (GPUs, or CPU processes with gpu=False)."""
    world = nodes * procs_per_node
    dtype = resolved_dtype(cfg, gpu)
    total, non_embed = count_params(cfg)
    act = activation_bytes(cfg, dtype)
    d = cfg.distributed
    stages = [
        stage_memory(total, world, s, dtype, d.offload_optimizer != "none", d.offload_params != "none", act)
        for s in range(4)
    ]
    return {
        "nodes": nodes,
        "procs_per_node": procs_per_node,
        "world_size": world,
        "dtype": dtype,
        "params": total,
        "params_non_embedding": non_embed,
        "bytes_per_step": world * cfg.training.batch_size * cfg.training.grad_accum * cfg.data.seq_len,
        "gpu": gpu,
        "deepspeed_config": deepspeed_config(cfg, world, dtype, gpu),
        "stages": stages,
        "kv_cache": kv_cache_bytes(cfg.model, cfg.patching, cfg.data.seq_len, 4 if dtype == "fp32" else 2),
    }


def format_plan(plan: dict, gpu_mem_gb: float, chosen_stage: int) -> str:
    lines = [
        f"world size {plan['world_size']} = {plan['nodes']} node(s) x {plan['procs_per_node']} process(es); "
        f"{plan['dtype']}; {plan['bytes_per_step']:,} bytes per optimizer step",
        f"parameters {plan['params']:,} ({plan['params_non_embedding']:,} non-embedding)",
        "derived DeepSpeed config:",
        json.dumps(plan["deepspeed_config"], indent=1),
        (
            f"memory per GPU (GiB; budget {gpu_mem_gb:g} GB, runtime overhead not counted):"
            if plan["gpu"]
            else f"memory per process (GiB; budget {gpu_mem_gb:g} GB, runtime overhead not counted):"
        ),
        f"  {'ZeRO':<6}{'weights':>9}{'grads':>9}{'optim':>9}{'activ.':>9}{'total':>9}{'CPU/proc':>10}  fits",
    ]
    for s in plan["stages"]:
        fits = "yes" if s.total < gpu_mem_gb * 1e9 else "NO"
        mark = " <- distributed.zero_stage" if s.stage == chosen_stage else ""
        lines.append(
            f"  {s.stage:<6}{s.weights / GiB:>9.2f}{s.grads / GiB:>9.2f}{s.optimizer / GiB:>9.2f}"
            f"{s.activations / GiB:>9.2f}{s.total / GiB:>9.2f}{s.cpu_offloaded / GiB:>10.2f}  {fits}{mark}"
        )
    kv = plan["kv_cache"]
    parts = ", ".join(f"{name} {b / 2**20:.2f}" for name, b in kv.items())
    lines.append(
        f"generation KV cache per sequence of data.seq_len bytes ({plan['dtype']}, MiB): {parts}; "
        f"total {sum(kv.values()) / 2**20:.2f} (the global model's at the assumed patch size)"
    )
    return "\n".join(lines)
