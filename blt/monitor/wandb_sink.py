"""Weights & Biases, offline-first: imported only when logging.wandb.mode is not disabled, rank 0 only.

    blt train configs/tiny.yaml logging.wandb.mode=auto      # online with a key and a network, else offline
    wandb sync runs/tiny/wandb/offline-run-*                 # upload an offline run later

`auto` never waits on a network that is not there: without an API key (WANDB_API_KEY or a netrc
entry) it is offline at once, and with one it tries a 3-second TCP connection to the W&B host
before going online. A run directory keeps its W&B run id in `wandb_run_id`, so a resumed run
continues the same W&B run.
"""

from __future__ import annotations

import netrc
import os
import secrets
import socket
from pathlib import Path
from urllib.parse import urlparse

from blt.config import Config, config_to_dict


def has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str, timeout: float = 3.0) -> str:
    """`auto` -> online or offline, without hanging; other modes are kept."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled"):
        return os.environ["WANDB_MODE"]
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if not has_api_key(host):
        return "offline"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return "online"
    except OSError:
        return "offline"


def flat(record: dict) -> dict:
    """metrics.jsonl names -> dashboard names: train/loss, val/bpb, ... (numbers only); a name that
    has its section already (eval/<task>/<metric>) stays as it is."""
    out = {}
    for key, value in record.items():
        if key in ("step", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out[key if "/" in key else f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"] = value
    return out


class WandbSink:
    def __init__(self, cfg: Config, run_dir: Path, resumed: bool):
        import wandb

        w = cfg.logging.wandb
        self.mode = resolve_mode(w.mode)
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else secrets.token_hex(4)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            mode=self.mode,
            project=w.project,
            entity=w.entity,
            name=w.name or cfg.name,
            group=w.group,
            tags=list(w.tags) or None,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=config_to_dict(cfg),
        )
        id_file.write_text(run_id)
        self.wandb = wandb

    def log(self, step: int, record: dict) -> None:
        self.run.log(flat(record), step=step)

    def histogram(self, step: int, tag: str, counts: list[int]) -> None:
        import numpy as np

        edges = np.arange(len(counts) + 1) - 0.5
        self.run.log({tag: self.wandb.Histogram(np_histogram=(np.asarray(counts), edges))}, step=step)

    def image(self, step: int, tag: str, rgb, caption: str) -> None:
        self.run.log({tag: self.wandb.Image(rgb, caption=caption)}, step=step)

    def table(self, step: int, tag: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({tag: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()
