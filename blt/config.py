"""One typed config tree for every `blt` job: defaults < YAML < `a.b=c` overrides.

    cfg = load_config("configs/tiny.yaml", ["training.steps=50", "model.global_model.layers=2"])
    cfg = load_config("tiny")   # a config shipped with blt, by name (shipped_configs() lists them)

Unknown keys, wrong types and values out of range raise ConfigError with a one-line message
naming the key. A field's range sits beside its declaration (`lr: PosFloat`, a `Range` in
`Annotated`) and blt/typed.py checks it; every float must also be finite. `check_config` holds the
checks that relate several fields.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from blt.errors import ConfigError
from blt.typed import Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt, Range, Seed, build

# ----------------------------------------------------------------------------- model


@dataclass
class SparseAttentionConfig:
    """DeepSpeed SparsityConfig-style settings (same names); see blt/model/sparse_patterns.py."""

    pattern: Literal[
        "none", "dense", "local", "strided", "fixed", "bigbird", "longformer", "variable", "block_causal"
    ] = "none"  # none = plain causal attention (with `window` if set)
    backend: Literal["auto", "gather", "flex", "dense"] = "auto"  # auto = flex on GPU, gather (exact, trains) on CPU
    block: PosInt = 64  # block size in positions (bytes or patches)
    attention: Literal["unidirectional", "bidirectional"] = "unidirectional"  # a causal LM needs unidirectional
    different_layout_per_head: bool = False  # random/global choices differ per head
    window: PosInt = 256  # local: token window
    dilation: PosInt = 2  # strided: every dilation-th block within the window
    num_local_blocks: PosInt = 4  # fixed: blocks per local window
    num_global_blocks: NonNegInt = 1  # fixed: summary blocks per window; bigbird: leading global blocks
    num_different_global_patterns: PosInt = 1  # fixed: head groups with different summary offsets
    num_random_blocks: NonNegInt = 1  # bigbird, variable: random key blocks per query block
    num_sliding_window_blocks: PosInt = 3  # bigbird, longformer, strided: window width in blocks
    global_block_indices: list[NonNegInt] = field(default_factory=lambda: [0])  # longformer, variable
    global_block_end_indices: list[PosInt] | None = None  # longformer, variable: global ranges [start, end)
    local_window_blocks: list[PosInt] = field(default_factory=lambda: [4])  # variable: window sizes, last repeats
    horizontal_global_attention: bool = False  # fixed, variable: global blocks also attend everywhere
    seed: Seed = 0  # random blocks


@dataclass
class RopeScalingConfig:
    """Llama 3's RoPE frequency scaling (rope_type llama3): off while factor is null."""

    factor: PosFloat | None = None  # long wavelengths are divided by it (Llama 3.1: 8)
    low_freq_factor: PosFloat = 1.0  # wavelengths above original / low_freq_factor are scaled fully
    high_freq_factor: PosFloat = 4.0  # below original / high_freq_factor they are kept; between: smoothed
    original_max_position_embeddings: PosInt = 8192  # the context the model was pretrained at


@dataclass
class TransformerConfig:
    dim: PosInt = 128  # hidden size
    layers: NonNegInt = 2  # number of Transformer blocks
    heads: PosInt = 4  # attention heads (dim must divide by heads)
    kv_heads: PosInt | None = None  # key/value heads (grouped-query attention; 1 = multi-query); None = heads
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm of every query and key head before RoPE (Qwen3)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # Llama 3's (factor null: off)
    position: Literal["rope", "alibi", "none"] = "rope"  # rotary positions, ALiBi's per-head distance bias, or none
    window: PosInt | None = None  # causal sliding-window length in positions; None = full causal
    ffn_mult: PosFloat = 2.6667  # SwiGLU hidden = ffn_mult * dim, rounded up to a multiple of 16
    sparse: SparseAttentionConfig = field(default_factory=SparseAttentionConfig)  # block-sparse self-attention


@dataclass
class ModelConfig:
    arch: Literal["blt", "byte_lm"] = "blt"  # blt = encoder/global/decoder; byte_lm = plain byte Transformer
    encoder: TransformerConfig = field(default_factory=lambda: TransformerConfig(dim=128, layers=1, window=512))
    global_model: TransformerConfig = field(default_factory=lambda: TransformerConfig(dim=256, layers=4))
    decoder: TransformerConfig = field(default_factory=lambda: TransformerConfig(dim=128, layers=2, window=512))
    lm: TransformerConfig = field(default_factory=lambda: TransformerConfig(dim=128, layers=4))  # byte_lm only
    cross_attn_k: PosInt = 2  # patch queries per patch in the encoder pooling (and keys per patch in the decoder)
    cross_attn_heads: PosInt = 4  # heads of the encoder/decoder cross-attention
    cross_attn_all_layers_decoder: bool = (
        False  # decoder cross-attends to patches before every layer (BLT-1B), not just the first
    )
    hash_ngram_sizes: list[PosInt] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])  # hash n-gram sizes (bytes)
    hash_buckets: NonNegInt = 50002  # buckets per (n-gram size, hash function) table; 0 disables hash embeddings
    hash_functions: NonNegInt = 1  # hash functions per n-gram size; 0 disables hash embeddings
    hash_sparse_grad: bool = False  # hash tables get sparse gradients and a lazy SparseAdam (fast for big tables)
    rope_theta: PosFloat = 10000.0  # RoPE base
    norm_eps: PosFloat = 1e-5  # RMSNorm epsilon
    init_std: PosFloat = 0.02  # std of the normal init of Linear/Embedding weights
    dropout: Fraction = 0.0  # residual and embedding dropout in every Transformer (training only)
    tie_embeddings: bool = False  # byte_lm only: share input embedding and output head
    hf_compat: bool = (
        False  # blt: HF transformers' BltModel conventions (see README), so `blt export --format hf` works
    )


# ----------------------------------------------------------------------------- patching


@dataclass
class PatchingConfig:
    mode: str = "static"  # how bytes are cut into patches: static, space, entropy or learned (blt/patching/registry.py)
    patch_size: PosInt = 4  # static: bytes per patch
    threshold: float | None = None  # entropy: boundary threshold (nats); None = derive from target_patch_size
    threshold_mode: Literal["global", "monotonic"] = "global"  # H_t > th, or H_t - H_{t-1} > th
    target_patch_size: Annotated[float, Range(ge=1)] = (
        4.5  # entropy (threshold=None), learned: the mean patch size aimed at
    )
    max_patch_length: PosInt | None = 16  # every mode: cut a patch that reaches this many bytes
    entropy_model: str | None = None  # entropy: run dir or checkpoint of a byte_lm trained by `blt train`
    entropy_cache: bool = True  # entropy: precompute entropies for the dataset once (else compute per batch)
    split_first_byte: bool = False  # byte 1 always starts a patch, so the first byte is a patch of its own (HF/BLT)
    ratio_loss_weight: NonNegFloat = 0.03  # learned: weight of the ratio loss towards target_patch_size (H-Net's alpha)


# ----------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    name: str = ""  # names the source in logs: data/bytes/<name>, val/bpb/<name>
    path: list[str] | str = field(
        default_factory=list
    )  # a dir made by `blt prepare`, or files/globs (prepared into the cache); one or a list
    weight: NonNegFloat = 1.0  # sampling weight; weights are normalised over the sources


SampleBy = Literal["document", "paragraph", "line"]  # also `blt prepare --sample-by`'s
SeqLen = Annotated[int, Range(ge=2)]  # also `blt prepare --seq-len`'s


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(
        default_factory=list
    )  # a weighted mixture; instead of train, val and hub_dataset
    train: list[str] = field(
        default_factory=list
    )  # files/globs (txt, jsonl(.gz/.zst), json, parquet) or a prepared dir; [] = bundled Shakespeare
    val: list[str] = field(default_factory=list)  # held-out files/globs; [] = split val_fraction of train documents
    val_fraction: Fraction = 0.05  # share of documents held out when val is empty (deterministic by seed)
    hub_dataset: str | None = None  # a HF hub dataset name (needs a network); used instead of train
    text_field: str = "text"  # column holding text in json/jsonl/parquet/hub data
    sample_by: SampleBy = "document"  # what one plain-text document is
    seq_len: SeqLen = 1024  # bytes per training sequence
    cache_dir: str | None = None  # where files are prepared into shards; None = ~/.cache/blt
    workers: NonNegInt = 0  # processes preparing files into the cache; 0 = one per CPU core
    seed: Seed = 0  # data order and split seed


# ----------------------------------------------------------------------------- optimisation


@dataclass
class OptimizerConfig:
    lr: PosFloat = 3e-3  # peak learning rate
    betas: list[Fraction] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: PosFloat = 1e-8  # AdamW epsilon
    weight_decay: NonNegFloat = 0.1  # applied to matrices only (not norms, biases, embeddings)
    grad_clip: NonNegFloat = 1.0  # max global grad norm; 0 disables


@dataclass
class ScheduleConfig:
    warmup_steps: NonNegInt = 100  # linear warmup from 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # shape after warmup
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1  # final lr = min_lr_ratio * lr


@dataclass
class TrainingConfig:
    steps: NonNegInt = 1000  # optimizer steps
    batch_size: PosInt = 8  # sequences per micro-batch (per process)
    grad_accum: PosInt = 1  # micro-batches per optimizer step
    seed: Seed = 0  # model init seed
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 on GPU, fp32 on CPU; fp16 needs DeepSpeed
    threads: NonNegInt = 0  # torch CPU threads per process; 0 = OMP_NUM_THREADS, else the cores / local processes
    activation_checkpointing: bool = False  # recompute every Transformer block in backward (less memory)
    compile: bool = False  # torch.compile each Transformer block (inductor; paid once per process at the start)
    max_minutes: PosFloat | None = None  # stop (and checkpoint) after this wall time
    init_from: str | None = None  # fine-tune: start from these weights (run, checkpoint or export dir), fresh optimizer


@dataclass
class EvalConfig:
    every: NonNegInt = 200  # validate every N steps (and at the end); 0 = only at the end
    max_bytes: PosInt | None = None  # cap on validation bytes per evaluation; None = whole split
    batch_size: PosInt = 8  # sequences per evaluation batch (task requests too)
    tasks: list[str] = field(
        default_factory=list
    )  # lm-eval tasks to run while training, logged as eval/<task>/<metric> (blt[eval])
    tasks_every: NonNegInt = 0  # run eval.tasks every N steps (and at the end); 0 = only at the end
    tasks_limit: PosInt | None = None  # documents per task per run; None = all
    tasks_num_fewshot: NonNegInt | None = None  # few-shot examples per prompt; None = each task's default
    tasks_include_path: list[str] = field(default_factory=list)  # more directories of task YAML files


@dataclass
class WandbConfig:
    mode: Literal["disabled", "auto", "offline", "online"] = (
        "disabled"  # auto = online with an API key and a network, else offline
    )
    project: str = "blt"  # W&B project
    entity: str | None = None  # W&B team or user; None = the key's default
    name: str | None = None  # run name; None = the config's name
    group: str | None = None  # groups runs in the W&B UI (e.g. one sweep)
    tags: list[str] = field(default_factory=list)  # W&B tags


@dataclass
class LoggingConfig:
    every: PosInt = 10  # write a metrics.jsonl line every N steps
    progress: bool = True  # show a progress bar with ETA, loss, BPB and bytes/s
    tensorboard: bool = True  # TensorBoard event files in run_dir/tensorboard (`blt dashboard RUN_DIR`)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases (imported only when enabled)
    images: bool = True  # at each validation: a validation snippet's entropies and patch boundaries as an image
    samples: NonNegInt = 2  # at each validation: this many generated samples (0 = none)
    sample_bytes: PosInt = 128  # bytes generated per sample
    data_trace: bool = False  # each rank writes the windows of every step to data_trace/rank_R.jsonl (audit)


@dataclass
class CheckpointConfig:
    every: PosInt = 500  # save every N steps (and at the end)
    keep_last: PosInt = 2  # checkpoints kept (older ones are deleted)
    resume: str = "auto"  # auto = continue from the newest checkpoint in run_dir; none; or a checkpoint path


@dataclass
class DistributedConfig:
    engine: Literal["auto", "local", "deepspeed", "accelerate"] = "auto"  # auto = deepspeed when launched as >1 process
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3 (1: optimizer states, 2: + grads, 3: + params sharded)
    offload_optimizer: Literal["none", "cpu"] = "none"  # ZeRO 1-3: keep optimizer states in CPU memory
    offload_params: Literal["none", "cpu"] = "none"  # ZeRO 3: keep parameters in CPU memory
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # collective backend; auto = nccl on GPU, gloo on CPU
    timeout_minutes: PosFloat = 10.0  # a collective stuck this long (a lost peer) fails the job
    bucket_size: PosInt = 200_000_000  # ZeRO reduce / all-gather bucket in elements (larger = fewer, bigger messages)


@dataclass
class Config:
    name: str = "blt"  # run name
    run_dir: str | None = None  # where config.yaml, metrics.jsonl, checkpoints/ go; None = runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir if self.run_dir else f"runs/{self.name}")


# ----------------------------------------------------------------------------- loading and checking


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """`a.b=c` -> {"a": {"b": c}} with c parsed as YAML (so 3, 1e-3, true, null, [3,4] work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. training.steps=100)")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: a date such as 2024-13-01
        value = raw
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def config_from_dict(values: dict) -> Config:
    return build(Config, values)


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with blt, by name: {"tiny": .../tiny.yaml, ...}. Installed, they are the
    package data blt/configs/ (pyproject.toml maps the top-level configs/ there); in a checkout,
    configs/ beside blt/."""
    here = Path(__file__).resolve().parent
    folder = here / "configs" if (here / "configs").is_dir() else here.parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_file(path: str | Path) -> Path:
    """The YAML file a CONFIG argument names: a path that exists, as given; a bare name (no '/',
    no .yaml) that is not a file is a shipped config, `tiny` -> .../configs/tiny.yaml."""
    text = str(path)
    try:
        exists = Path(text).exists()
    except OSError as e:  # a name too long for the file system
        raise ConfigError(f"config file '{text}' cannot be read: {e.strerror or e}") from None
    if exists or "/" in text or os.sep in text or text.endswith((".yaml", ".yml")):
        return Path(path)
    shipped = shipped_configs()
    if text not in shipped:
        raise ConfigError(
            f"config '{text}' is neither a file nor a shipped config (shipped: {', '.join(shipped)}; "
            "or pass the path of a YAML file)"
        )
    return shipped[text]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < YAML file (a path, or a shipped config's name) < overrides; validated, then cross-checked."""
    values: dict = {}
    if path is not None:
        path = p = config_file(path)
        if not p.is_file():
            what = "is a directory" if p.is_dir() else "not found"
            raise ConfigError(
                f"config file '{p}' {what} (pass a YAML file, or a shipped config's name: "
                f"{', '.join(shipped_configs())})"
            )
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file '{p}' is not a UTF-8 text file (byte {e.start} is "
                f"0x{e.object[e.start]:02x}); pass a YAML file such as configs/tiny.yaml"
            ) from None
        except OSError as e:
            raise ConfigError(f"config file '{p}' cannot be read: {e.strerror or e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(
                f"config file '{p}' is not valid YAML{where}: {problem or str(e).splitlines()[0]}"
            ) from None
        except (ValueError, RecursionError) as e:  # a date such as 2024-13-01; nesting too deep
            raise ConfigError(f"config file '{p}' is not valid YAML: {type(e).__name__}: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
        values = loaded
    for o in overrides:
        values = _deep_merge(values, parse_override(o))
    cfg = config_from_dict(values)
    ent = cfg.patching.entropy_model
    if path is not None and ent and not Path(ent).is_absolute():
        beside = Path(path).parent / ent  # an export's config.yaml names its own entropy_model/ dir
        if beside.exists():  # a relative path beside the config file wins; else it is relative to cwd
            cfg.patching.entropy_model = str(beside.resolve())
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Every field's type and range (as load_config checks them, also for a Config built in Python),
    then the checks that relate several fields; each failure is a one-line ConfigError."""
    config_from_dict(config_to_dict(cfg))
    m = cfg.model
    for name in ("encoder", "global_model", "decoder", "lm"):
        t: TransformerConfig = getattr(m, name)
        if t.dim % t.heads:
            raise ConfigError(
                f"model.{name}.dim ({t.dim}) must be a positive multiple of model.{name}.heads ({t.heads})"
            )
        if (t.dim // t.heads) % 2 and t.position == "rope":
            raise ConfigError(f"model.{name}: head size dim/heads = {t.dim // t.heads} must be even for RoPE")
        rs = t.rope_scaling
        if rs.factor is not None and t.position != "rope":
            raise ConfigError(
                f"model.{name}.rope_scaling scales RoPE, but model.{name}.position is {t.position}; "
                f"unset rope_scaling.factor or set position=rope"
            )
        if t.position != "rope" and m.hf_compat and name != "lm":
            raise ConfigError(
                f"model.{name}.position={t.position} with model.hf_compat=true: HF's BLT has RoPE only; "
                f"set model.{name}.position=rope or model.hf_compat=false"
            )
        if rs.factor is not None and rs.high_freq_factor <= rs.low_freq_factor:
            raise ConfigError(
                f"model.{name}.rope_scaling.high_freq_factor ({rs.high_freq_factor}) must be above "
                f"low_freq_factor ({rs.low_freq_factor}), as in Llama 3 (1 and 4)"
            )
        if t.kv_heads is not None and t.heads % t.kv_heads:
            raise ConfigError(
                f"model.{name}.kv_heads ({t.kv_heads}) must divide model.{name}.heads ({t.heads}): every "
                f"key/value head serves heads/kv_heads query heads (1 = multi-query, {t.heads} = multi-head)"
            )
        sp = t.sparse
        if sp.attention != "unidirectional" or sp.pattern == "block_causal":
            raise ConfigError(
                f"model.{name}.sparse: a language model needs causal attention; "
                f"pattern={sp.pattern} attention={sp.attention} lets bytes see the future "
                "(use attention=unidirectional and a pattern other than block_causal)"
            )
        if sp.pattern != "none" and t.window is not None:
            raise ConfigError(
                f"model.{name}: set window=null with a sparse pattern (use sparse.pattern=local "
                "and sparse.window for a sliding window)"
            )
        if sp.pattern == "fixed" and sp.num_different_global_patterns * sp.num_global_blocks > sp.num_local_blocks:
            raise ConfigError(
                f"model.{name}.sparse: num_different_global_patterns x num_global_blocks "
                f"({sp.num_different_global_patterns} x {sp.num_global_blocks}) must be <= "
                f"num_local_blocks ({sp.num_local_blocks}): the summary blocks sit inside a window"
            )
        ends = sp.global_block_end_indices
        if (
            sp.pattern in ("longformer", "variable")
            and ends is not None
            and (
                len(ends) != len(sp.global_block_indices) or any(e <= s for s, e in zip(sp.global_block_indices, ends))
            )
        ):
            raise ConfigError(
                f"model.{name}.sparse: global_block_end_indices {ends} must pair with "
                f"global_block_indices {sp.global_block_indices}, each end > its start"
            )
    if m.arch == "blt":
        if m.encoder.dim != m.decoder.dim:
            raise ConfigError(
                f"model.decoder.dim ({m.decoder.dim}) must equal model.encoder.dim ({m.encoder.dim}): "
                "the decoder starts from the encoder's byte states"
            )
        if m.encoder.dim % m.cross_attn_heads:
            raise ConfigError(f"model.cross_attn_heads ({m.cross_attn_heads}) must divide model.encoder.dim")
    if m.hf_compat and m.arch == "blt" and not cfg.patching.split_first_byte:
        raise ConfigError(
            "model.hf_compat=true needs patching.split_first_byte=true (HF's decoder reads the patch "
            "that ends at each byte, which is causal only when the first byte is a patch of its own)"
        )
    check_sources(cfg.data)
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas must be a list of two floats, got {cfg.optimizer.betas}")
    d = cfg.distributed
    if d.zero_stage not in (0, 1, 2, 3):  # not a Range: this message names the stages
        raise ConfigError(f"distributed.zero_stage must be 0, 1, 2 or 3, got {d.zero_stage}")
    if d.offload_params != "none" and d.zero_stage != 3:
        raise ConfigError("distributed.offload_params needs distributed.zero_stage=3")
    if d.offload_optimizer != "none" and d.zero_stage == 0:
        raise ConfigError("distributed.offload_optimizer needs distributed.zero_stage >= 1")
    # last, as it imports torch: a config that fails the checks above fails before that
    from blt.patching.registry import check_patching

    check_patching(cfg.patching, cfg.model)


def check_sources(d: DataConfig) -> None:
    """data.sources: named, unique, each with a path, not mixed with data.train/val/hub_dataset,
    and some weight above zero."""
    if not d.sources:
        return
    if d.train or d.val or d.hub_dataset:
        raise ConfigError(
            "data.sources replaces data.train, data.val and data.hub_dataset; set one or the other "
            "(a single source: data.sources=[{name: NAME, path: [FILES]}])"
        )
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        if isinstance(s.path, str):  # path: DIR, as people write one path
            s.path = [s.path]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name):
            raise ConfigError(
                f"data.sources[{i}].name {s.name!r} must be a non-empty name of letters, digits, "
                "'_', '.' or '-' (it names the source's metrics)"
            )
        if names.count(s.name) > 1:
            raise ConfigError(f"data.sources: the name {s.name!r} is used twice; give every source its own name")
        if not s.path:
            raise ConfigError(f"data.sources[{i}].path is empty; give a prepared directory or files/globs")
    if sum(s.weight for s in d.sources) <= 0:
        raise ConfigError("data.sources: every weight is 0; give at least one source a weight above 0")


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
