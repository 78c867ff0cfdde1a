"""Reading export directories (`blt export` writes them, blt/export.py): safetensors and JSON
only, so an export loads without DeepSpeed and never unpickles.

    exports/tiny/   model.safetensors, config.yaml, export.json, README.md, entropy_model/ (an export too)
"""

from __future__ import annotations

import json
from pathlib import Path

from blt.artifacts.checkpoints import checkpoint_config
from blt.artifacts.files import fit_weights, read_safetensors
from blt.errors import UserError
from blt.model import build_model

FORMAT = "blt-export"


class ExportError(UserError):
    """An export that cannot be written or read; one-line message."""


def is_export(path: str | Path) -> bool:
    return (Path(path) / "export.json").is_file()


def read_export_json(path: str | Path) -> dict:
    """An export's export.json, checked to be ours; one-line ExportError otherwise."""
    where = Path(path) / "export.json"
    try:
        info = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"'{where}' is unreadable or not JSON ({type(e).__name__}); re-export the model") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ExportError(f"'{Path(path)}' is a {got!r} export, not {FORMAT}")
    return info


def load_export(path: str | Path, device: str = "cpu"):
    """(model, cfg, export.json) of an export dir; weights from safetensors only."""
    path = Path(path)
    info = read_export_json(path)
    cfg = checkpoint_config(path)  # load_config finds patching.entropy_model beside config.yaml
    model = build_model(cfg.model, cfg.patching)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"export '{path}' has no model.safetensors; re-export the model")
    fit_weights(model, read_safetensors(weights), path)
    return model.to(device).eval(), cfg, info
