"""Exports: engine-free model directories that load without DeepSpeed and never unpickle.

    blt export runs/tiny exports/tiny                  # any checkpoint: single process or ZeRO-1/2/3
    blt export runs/tiny exports/tiny-hf --format hf   # transformers.BltForCausalLM.from_pretrained loads it
    blt import-hf path/to/blt-1b exports/blt-1b        # an HF BLT directory -> this format (fine-tune it here)

    exports/tiny/
        model.safetensors    the consolidated weights
        config.yaml          the resolved training config (model, patching with its threshold, data)
        entropy_model/       the entropy model, itself an export (entropy patching only)
        export.json          format, source checkpoint, step, validation BPB
        README.md            a short model card

`blt eval`, `blt generate`, `blt patch`, `Generator.load` and `patching.entropy_model` accept an
export directory wherever they accept a run or checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from blt.config import Config, dump_config
from blt.errors import UserError

FORMAT = "blt-export"


class ExportError(UserError):
    """An export that cannot be written or read; one-line message."""


def is_export(path: str | Path) -> bool:
    return (Path(path) / "export.json").is_file()


def _load_source(source: str | Path, device: str = "cpu"):
    """(model, cfg, meta) from a run, checkpoint or export; ZeRO shards are consolidated."""
    from blt.train.checkpoint import load_model_from_checkpoint

    model, cfg, step_dir = load_model_from_checkpoint(source, device)
    if is_export(step_dir):
        meta = json.loads((Path(step_dir) / "export.json").read_text())
    else:
        state = json.loads((Path(step_dir) / "state.json").read_text())
        meta = {"source": str(Path(step_dir).resolve()), "step": state.get("step"),
                "val": state.get("last_val") or {}, "threshold": state.get("threshold")}
    return model, cfg, meta


def _empty_dir(out: str | Path) -> Path:
    """`out` as a Path, refused before any work if it already holds files (nothing is overwritten)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory '{out}' is not empty; pick a new one or remove it")
    return out


def export(source: str | Path, out: str | Path, fmt: str = "blt") -> dict:
    """Write `source` (run dir, checkpoint or export) as an export dir (fmt blt) or an HF dir (fmt hf)."""
    if fmt not in ("blt", "hf"):
        raise ExportError(f"unknown export format '{fmt}' (use blt or hf)")
    out = _empty_dir(out)
    model, cfg, meta = _load_source(source)
    entropy = cfg.model.arch == "blt" and cfg.patching.mode == "entropy"
    emodel, ecfg, _ = _load_source(cfg.patching.entropy_model) if entropy else (None, None, None)
    if fmt == "hf":
        from blt.hf import write_hf

        out.mkdir(parents=True, exist_ok=True)
        write_hf(out, cfg, _plain_state(model), ecfg, _plain_state(emodel) if emodel is not None else None,
                 cfg.patching.threshold if cfg.patching.threshold is not None else meta.get("threshold"))
        return {"format": "hf", "out": str(out), **{k: meta.get(k) for k in ("source", "step")}}
    write_export(out, model, cfg, meta, emodel, ecfg)
    return {"format": FORMAT, "out": str(out), **{k: meta.get(k) for k in ("source", "step")}}


def _plain_state(model) -> dict:
    """State dict with contiguous, unshared tensors (safetensors refuses shared storage)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def write_export(out: Path, model, cfg: Config, meta: dict, emodel=None, ecfg: Config | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if emodel is not None:
        write_export(out / "entropy_model", emodel, ecfg, {"source": cfg.patching.entropy_model})
        cfg.patching.entropy_model = "entropy_model"  # relative to the export dir; resolved on load
    save_model(model, str(out / "model.safetensors"))
    dump_config(cfg, out / "config.yaml")
    params = sum(p.numel() for p in model.parameters())
    info = {"format": FORMAT, "version": 1, "arch": cfg.model.arch, "params": params, **meta}
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(cfg, info))


def model_card(cfg: Config, info: dict) -> str:
    val = info.get("val") or {}
    bpb = f"{val['bpb']:.4f}" if "bpb" in val else "not measured"
    data = ", ".join(cfg.data.train) if cfg.data.train else "the bundled Tiny Shakespeare"
    p = cfg.patching
    patching = (f"entropy (threshold {p.threshold:.4f} nats, model in entropy_model/)" if p.mode == "entropy" and
                p.threshold is not None else f"{p.mode}" + (f" ({p.patch_size} bytes)" if p.mode == "static" else ""))
    if cfg.model.arch == "byte_lm":
        patching = "none (byte LM)"
    return f"""# {cfg.name or "blt model"}

A byte-level {"BLT (Byte Latent Transformer)" if cfg.model.arch == "blt" else "Transformer language model"}
exported by `blt export`. {info["params"]:,} parameters.

- trained on: {data}
- training steps: {info.get("step", "unknown")}; context {cfg.data.seq_len} bytes
- validation bits per byte: {bpb}
- patching: {patching}
- source checkpoint: {info.get("source", "unknown")}

Load it without DeepSpeed:

    blt generate THIS_DIR --prompt "Hello" --max-bytes 200
    blt eval THIS_DIR --data held_out.txt

    from blt.generate import Generator
    Generator.load("THIS_DIR").generate(["Hello"], max_bytes=200)
"""


def load_export(path: str | Path, device: str = "cpu"):
    """(model, cfg, path) of an export dir; weights from safetensors only."""
    from blt.train.checkpoint import checkpoint_config
    from blt.model import build_model

    path = Path(path)
    info = json.loads((path / "export.json").read_text())
    if info.get("format") != FORMAT:
        raise ExportError(f"'{path}' is a {info.get('format')!r} export, not {FORMAT}")
    cfg = checkpoint_config(path)  # load_config finds patching.entropy_model beside config.yaml
    model = build_model(cfg.model)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except (RuntimeError, FileNotFoundError) as e:
        raise ExportError(f"export '{path}' does not match its config: {str(e).strip().splitlines()[0]}") from None
    return model.to(device).eval(), cfg, path


def import_hf(src: str | Path, out: str | Path) -> dict:
    """An HF BLT directory (config.json + safetensors) -> an export dir of this format."""
    from blt.hf import read_hf
    from blt.model import build_model

    out = _empty_dir(out)
    cfg, state, ecfg, estate = read_hf(Path(src))
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())  # keep bf16 weights bf16
    with torch.device("meta"):  # no random init: every weight comes from the HF files
        model = build_model(cfg.model).to(dtype)
        emodel = build_model(ecfg.model).to(dtype) if ecfg is not None else None
    model.load_state_dict(state, strict=True, assign=True)
    if emodel is not None:
        emodel.load_state_dict(estate, strict=True, assign=True)
    write_export(out, model, cfg, {"source": str(Path(src).resolve()), "imported_from": "hf"}, emodel, ecfg)
    return {"format": FORMAT, "out": str(out), "source": str(src)}
