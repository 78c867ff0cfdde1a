"""DeepSpeed ZeRO 0-3 behind the engine interface (forward, backward, step, save, load), started
by any launcher or by `accelerate launch`: the one module that trains with DeepSpeed. deepspeed is
imported lazily (so `import blt` and the single-process path never pay for it) through
blt/artifacts/zero.py, which also reads ZeRO checkpoints for loading and resuming, below the trainer.
The engine owns what DeepSpeed asks of the rest: dense gradients only (`supports_sparse_grads`),
ZeRO-3's sharded weights (`partitioned`, `forwards_on_every_rank`), the accelerate config's say.

    torchrun --nproc-per-node 2 -m blt train configs/tiny.yaml distributed.zero_stage=3

The DeepSpeed config is derived from the training config (`deepspeed_config`): the global batch
is micro batch x accumulation x processes, never typed twice.

Checkpoints (one directory per step, the same layout as the single-process engine):
    step_00000100/  DeepSpeed's model/optimizer shards (one per rank), rank_<r>.pt (RNG of rank r),
                    state.json (step, every rank's data position, engine), config.yaml, and
                    model.safetensors when the full weights are at hand (ZeRO 0-2 in fp32, ZeRO 0)
All ranks write into step_X.tmp; after a barrier rank 0 renames it and only then moves the
`latest` marker, so a crash during a save leaves the previous checkpoint the newest complete one.
A checkpoint of another layout (process count, ZeRO stage, the local engine) is resumed through its
universal form (blt/train/reshard.py) with DeepSpeed's universal loader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from blt.artifacts.checkpoints import read_state_json
from blt.artifacts.files import load_pt
from blt.artifacts.zero import import_deepspeed, safe_shards
from blt.config import Config, ConfigError
from blt.proc import log
from blt.train.checkpoint import CheckpointError, finish_checkpoint, rng_state, set_rng_state, start_checkpoint
from blt.train.device import resolved_dtype
from blt.train.distributed import Dist, init_distributed
from blt.train.optim import build_optimizer
from blt.train.reshard import Layout, describe_change, load_universal, rng_file, universal_checkpoint


def deepspeed_config(cfg: Config, world_size: int, dtype: str, gpu: bool, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config for this training config, number of processes, precision (fp32,
    bf16 or fp16: training.dtype resolved for the device) and device kind; `load_universal` when
    the job resumes a checkpoint of another layout (blt/train/reshard.py)."""
    t, d = cfg.training, cfg.distributed
    bucket = d.bucket_size
    zero: dict = {
        "stage": d.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": gpu,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if d.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": bucket,
                "stage3_param_persistence_threshold": 10_000,
                "stage3_max_live_parameters": 10 * bucket,
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": d.offload_optimizer, "pin_memory": gpu}
    if d.offload_params != "none":
        zero["offload_param"] = {"device": d.offload_params, "pin_memory": gpu}
    extra = {"checkpoint": {"load_universal": True}} if load_universal else {}
    return {
        **extra,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # keep torch AdamW with offload (no 3-minute op build on CPU)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _quiet_deepspeed(device_type: str = "cpu"):
    import warnings

    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")
    deepspeed = import_deepspeed(device_type)
    # a CPU host would otherwise JIT-compile a shared-memory comm op (~2 minutes) at init
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def accelerate_overrides(cfg: Config) -> list[str]:
    """Under `accelerate launch`, the accelerate config's ZeRO stage and offload devices win (they are
    what the user chose there); returns what changed, for the log."""
    env = os.environ
    d, changed = cfg.distributed, []
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None and int(stage) != d.zero_stage:
        d.zero_stage = int(stage)
        changed.append(f"zero_stage={stage}")
    for key, attr in (
        ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "offload_optimizer"),
        ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "offload_params"),
    ):
        value = env.get(key)
        if value in ("none", "cpu") and value != getattr(d, attr):
            setattr(d, attr, value)
            changed.append(f"{attr}={value}")
    return changed


class DeepSpeedEngine:
    """A model trained by a DeepSpeed engine: ZeRO stage, offload, precision, accumulation and
    clipping from the config; torch AdamW (with the same decay groups as the local engine)."""

    supports_sparse_grads = False  # ZeRO shards dense gradients only

    @classmethod
    def prepare(cls, cfg: Config, world: Dist, device: torch.device, kind: str = "deepspeed") -> None:
        """Before the model is built: under `accelerate launch` (kind "accelerate") the accelerate
        config's ZeRO choices; dense hash-table gradients (the same weights, stored otherwise); then
        the process group. Each change to the config is logged."""
        if kind == "accelerate":
            for change in accelerate_overrides(cfg):
                log(f"distributed.{change} (from the accelerate config)")
        if cfg.model.hash_sparse_grad and not cls.supports_sparse_grads:
            log("model.hash_sparse_grad=false under DeepSpeed (ZeRO shards dense gradients only)")
            cfg.model.hash_sparse_grad = False
        init_distributed(cfg, world, device)

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        device: torch.device,
        world: Dist,
        use_accelerate: bool,
        resume_from: Path | None = None,
    ):
        if not self.supports_sparse_grads and any(isinstance(m, nn.Embedding) and m.sparse for m in model.modules()):
            # a model built without prepare(), which turns model.hash_sparse_grad off
            raise ConfigError(
                "model.hash_sparse_grad=true is not supported by DeepSpeed ZeRO; set model.hash_sparse_grad=false"
            )
        self.cfg, self.device, self.world, self.use_accelerate = cfg, device, world, use_accelerate
        self.layout = Layout("deepspeed", cfg.distributed.zero_stage, world.world_size)
        deepspeed = _quiet_deepspeed(device.type)
        gpu = device.type == "cuda"
        # DeepSpeed reads a universal checkpoint only if told so when the engine is built
        universal = resume_from is not None and self._universal_load(read_state_json(resume_from))
        ds_config = deepspeed_config(cfg, world.world_size, resolved_dtype(cfg, gpu), gpu, universal)
        optimizer = build_optimizer(model, cfg.optimizer)
        if use_accelerate:
            self.ds = self._prepare_with_accelerate(model, optimizer, ds_config)
        else:
            self.ds, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
            )
        self.model = self.ds.module
        self.ds_config = ds_config
        self._micro = 0
        # DeepSpeed holds bf16/fp16 weights itself; autocast is only for the fp32 module
        self.amp_dtype = None

    def _prepare_with_accelerate(self, model, optimizer, ds_config: dict):
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        # our derived config is complete; accelerate must not also apply its own copies of these fields
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        precision = "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "no"
        handlers = [
            InitProcessGroupKwargs(
                backend="gloo" if self.device.type == "cpu" else "nccl",
                timeout=timedelta(minutes=self.cfg.distributed.timeout_minutes),
            )
        ]
        self.accelerator = Accelerator(
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
            mixed_precision=precision,
            kwargs_handlers=handlers,
        )
        engine, _ = self.accelerator.prepare(model, optimizer)
        return engine

    def forward(self, inputs: torch.Tensor, patch_ids: torch.Tensor | None, routing: bool = False):
        return self.ds(inputs, patch_ids, routing=routing)

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch; DeepSpeed divides by the accumulation steps itself."""
        self.ds.backward(loss)
        self._micro += 1
        if self._micro < self.cfg.training.grad_accum:
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self, lr: float) -> float:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        norm = None
        if self.cfg.distributed.zero_stage == 0:  # DeepSpeed does not report it without ZeRO; grads are reduced
            grads = [p.grad.float() for p in self.model.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.ds.step()
        self._micro = 0
        if norm is None:
            norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: each rank holds a shard of the weights, gathered only inside module hooks, so
        generation runs uncached (the cached path reads the weights directly)."""
        return self.cfg.distributed.zero_stage == 3

    @property
    def forwards_on_every_rank(self) -> bool:
        """ZeRO-3: a forward gathers weights from every rank, so all ranks run the same forwards
        (rank 0's validation pictures included)."""
        return self.partitioned

    @property
    def label(self) -> str:
        """How the start-up line names this engine: "deepspeed ZeRO-2", "accelerate ZeRO-3"."""
        return f"{'accelerate' if self.use_accelerate else 'deepspeed'} ZeRO-{self.cfg.distributed.zero_stage}"

    @property
    def full_weights_local(self) -> bool:
        """Does every rank hold the full fp32 weights (so rank 0 can write model.safetensors)?"""
        d = self.cfg.distributed
        return d.zero_stage == 0 or (
            d.zero_stage < 3 and not any(self.ds_config[k]["enabled"] for k in ("bf16", "fp16"))
        )

    def save(self, run_dir: Path, step: int, state: dict, prune: bool = True) -> Path:
        world = self.world
        tmp = final = None
        if world.is_main:
            tmp, final = start_checkpoint(run_dir, step)
        tmp, final = world.broadcast_object((tmp, final))  # the directory exists for everyone now
        self.ds.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)
        torch.save(rng_state(), tmp / f"rank_{world.rank}.pt")
        data_states = world.all_gather_object(state.pop("data"))
        if world.is_main:
            if self.full_weights_local:
                from blt.disk import write_safetensors

                # ZeRO keeps parameters as views of flat buffers: copy each out
                weights = {k: v.detach().float().clone().contiguous() for k, v in self.model.state_dict().items()}
                write_safetensors(tmp / "model.safetensors", weights)
            engine = {
                "engine": "deepspeed",
                "zero_stage": self.cfg.distributed.zero_stage,
                "world_size": world.world_size,
            }
            full = dict(state, step=step, data=data_states[0], data_ranks=data_states, **engine)
            (tmp / "state.json").write_text(json.dumps(full, indent=1))
        world.barrier()  # every rank's shards are on disk
        if world.is_main:
            finish_checkpoint(tmp, final, self.cfg, prune)
        world.barrier()
        return final

    def _universal_load(self, state: dict) -> bool:
        """Does resuming this checkpoint go through its universal form and DeepSpeed's universal
        loader? (ZeRO-0 has no ZeRO optimizer to load one: it is filled like the local engine.)"""
        return Layout.of_state(state) != self.layout and self.cfg.distributed.zero_stage > 0

    def load(self, step_dir: Path) -> dict:
        """Resume: DeepSpeed's own shards on the same layout; any other layout through the
        checkpoint's universal form, converted once by rank 0 (blt/train/reshard.py)."""
        step_dir = Path(step_dir)
        state = read_state_json(step_dir)
        saved = Layout.of_state(state)
        if saved == self.layout:
            self._load_shards(step_dir)
            set_rng_state(load_pt(step_dir / f"rank_{self.world.rank}.pt"))
            state["data"] = state["data_ranks"][self.world.rank]
            return state
        if self.world.is_main:
            log(describe_change(step_dir, saved, self.layout, self.cfg))
        udir = self.world.on_main_first(lambda: universal_checkpoint(step_dir, log if self.world.is_main else None))
        if self._universal_load(state):
            settings = [{k: v for k, v in g.items() if k != "params"} for g in self.ds.optimizer.param_groups]
            self._load_shards(udir)
            # DeepSpeed's universal loaders give every group the checkpoint's settings (ZeRO-3: group 0's,
            # so norms and embeddings would get weight decay); this job's config owns them
            for group, kept in zip(self.ds.optimizer.param_groups, settings):
                group.update(kept)
            # ZeRO-3's loader hands every sub-group one shared step tensor, which torch's Adam increments
            # in place: once per sub-group and step, so the bias correction would run ahead
            for st in self.ds.optimizer.optimizer.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()
        elif isinstance(self.ds.optimizer, torch.optim.Optimizer):  # ZeRO-0 in fp32: the client optimizer
            load_universal(self.model, self.ds.optimizer, udir)
        else:
            raise CheckpointError(
                f"ZeRO-0 in {resolved_dtype(self.cfg, self.device.type == 'cuda')} cannot load a "
                f"checkpoint of {saved}; resume it with ZeRO-1 or more "
                "(distributed.zero_stage=1), or in fp32"
            )
        rng = rng_file(step_dir, saved, self.world.rank)
        if rng is not None:
            set_rng_state(load_pt(rng))
        return state

    def _load_shards(self, step_dir: Path) -> None:
        """DeepSpeed's load_checkpoint of a step dir (or a universal form), every shard read weights_only."""
        with safe_shards(step_dir):
            path, _ = self.ds.load_checkpoint(
                str(step_dir.parent),
                tag=step_dir.name,
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in '{step_dir}'")
