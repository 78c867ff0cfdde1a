"""Exports: engine-free model directories that load without DeepSpeed and never unpickle.

    blt export runs/tiny exports/tiny                  # any checkpoint: single process or ZeRO-1/2/3
    blt export runs/tiny-hf exports/tiny-hf --format hf   # a configs/tiny_hf.yaml run -> BltForCausalLM dir
    blt import-hf path/to/blt-1b exports/blt-1b        # an HF BLT directory -> this format (fine-tune it here)

    exports/tiny/
        model.safetensors    the consolidated weights
        config.yaml          the resolved training config (model, patching with its threshold, data)
        entropy_model/       the entropy model, itself an export (entropy patching only)
        export.json          format, source checkpoint, step, validation BPB
        README.md            a short model card

`blt eval`, `blt generate`, `blt patch`, `Generator.load` and `patching.entropy_model` accept an
export directory wherever they accept a run or checkpoint. An export is written into a hidden
sibling directory and renamed when complete, so one that fails leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from blt.artifacts import load_model
from blt.artifacts.exports import FORMAT, ExportError
from blt.config import Config, dump_config
from blt.disk import write_safetensors
from blt.patching import mode_of

WEIGHT_FILES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # names of a file, not of an export dir


def _empty_dir(out: str | Path) -> Path:
    """`out` as a Path, refused before any work if it is a file or already holds files (nothing is overwritten)."""
    out = Path(out)
    try:
        above = next((p for p in out.absolute().parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ExportError(f"'{above}' is a file, so '{out}' cannot be a directory; give a new directory path")
        if out.exists() and not out.is_dir():
            raise ExportError(f"'{out}' is a file, and an export is a directory; give a new directory path")
        if out.is_dir() and any(out.iterdir()):
            raise ExportError(f"output directory '{out}' is not empty; pick a new one or remove it")
    except OSError as e:
        raise ExportError(f"cannot look into '{out}' ({e.strerror}); give a new directory you can write") from None
    if not out.exists() and out.suffix.lower() in WEIGHT_FILES:
        raise ExportError(
            f"'{out}' is a {out.suffix} file name, and an export is a directory; give a directory "
            "path (for one weights file of a ZeRO checkpoint: blt consolidate RUN --out FILE)"
        )
    return out.resolve() if out.is_symlink() else out


@contextlib.contextmanager
def _staged(out: Path):
    """A new hidden sibling directory of `out` to write into, renamed to `out` when the block ends;
    when anything fails it is removed, with the parent directories made for it. An unwritable place
    is refused at once, before any loading."""
    made = [p for p in out.absolute().parents if not p.exists()]  # innermost first
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"

    def clean() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:
            with contextlib.suppress(OSError):
                parent.rmdir()

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        clean()
        raise ExportError(f"cannot write '{out}' ({e.strerror}); give a new directory in a writable place") from None
    try:
        yield tmp
        os.replace(tmp, out)  # also over an empty directory
    except OSError as e:
        clean()
        where = f" ('{e.filename}')" if e.filename else ""
        raise ExportError(f"writing '{out}' failed: {e.strerror or e}{where}; nothing was left behind") from None
    except BaseException:
        clean()
        raise


def export(source: str | Path, out: str | Path, fmt: str = "blt") -> dict:
    """Write `source` (run dir, checkpoint or export) as an export dir (fmt blt) or an HF dir (fmt hf)."""
    if fmt not in ("blt", "hf"):
        raise ExportError(f"unknown export format '{fmt}' (use blt or hf)")
    out = _empty_dir(out)
    with _staged(out) as tmp:
        src = load_model(source, patcher=False)
        model, cfg, meta = src.model, src.cfg, src.meta
        entropy = cfg.model.arch == "blt" and mode_of(cfg.patching).needs_entropies
        ent = load_model(cfg.patching.entropy_model, patcher=False) if entropy else None
        emodel, ecfg = (ent.model, ent.cfg) if ent is not None else (None, None)
        if fmt == "hf":
            from blt.hf import write_hf

            write_hf(
                tmp,
                cfg,
                _plain_state(model),
                ecfg,
                _plain_state(emodel) if emodel is not None else None,
                cfg.patching.threshold if cfg.patching.threshold is not None else meta.get("threshold"),
            )
        else:
            write_export(tmp, model, cfg, meta, emodel, ecfg)
    return {"format": "hf" if fmt == "hf" else FORMAT, "out": str(out), **{k: meta.get(k) for k in ("source", "step")}}


def _plain_state(model) -> dict:
    """State dict with contiguous, unshared tensors (safetensors refuses shared storage)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def write_export(out: Path, model, cfg: Config, meta: dict, emodel=None, ecfg: Config | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if emodel is not None:
        write_export(out / "entropy_model", emodel, ecfg, {"source": cfg.patching.entropy_model})
        cfg.patching.entropy_model = "entropy_model"  # relative to the export dir; resolved on load
    write_safetensors(out / "model.safetensors", model)
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
    patching = mode_of(p).describe(p)
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

    from blt.generation import Generator
    Generator.load("THIS_DIR").generate(["Hello"], max_bytes=200)
"""


def import_hf(src: str | Path, out: str | Path) -> dict:
    """An HF BLT directory (config.json + safetensors) -> an export dir of this format."""
    from blt.hf import BLT_NAMES, PATCHER_NAMES, fit_hf_weights, read_hf
    from blt.model import build_model

    out = _empty_dir(out)
    with _staged(out) as tmp:
        cfg, state, ecfg, estate = read_hf(Path(src))
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)  # bf16 stays bf16
        with torch.device("meta"):  # no random init: every weight comes from the HF files
            model = build_model(cfg.model, cfg.patching).to(dtype)
            emodel = build_model(ecfg.model).to(dtype) if ecfg is not None else None
        fit_hf_weights(model, state, BLT_NAMES, src)
        if emodel is not None:
            fit_hf_weights(emodel, estate, PATCHER_NAMES, src)
        write_export(tmp, model, cfg, {"source": str(Path(src).resolve()), "imported_from": "hf"}, emodel, ecfg)
    return {"format": FORMAT, "out": str(out), "source": str(src)}
