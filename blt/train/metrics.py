"""Where numbers go: metrics.jsonl (one JSON object per line), the terminal progress bar, and, when
enabled, TensorBoard and W&B. Every metric passes through MetricsLogger (log, histogram, image,
table): the one place the sinks hook into. Only rank 0 of a job builds one that writes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from blt.config import Config


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True,
                 enabled: bool = True, cfg: Config | None = None, resumed: bool = False):
        """enabled=False (ranks other than 0) writes nothing and shows nothing. With `cfg`, its
        logging section decides on TensorBoard and W&B; `resumed` continues the run's W&B run."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.file = self.path.open("a", encoding="utf-8") if enabled else None
        self.bar = None
        if progress and enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0, smoothing=0.1)
        self.shown: dict = {}
        self.sinks: list = []
        if enabled and cfg is not None:
            if cfg.logging.tensorboard:
                from blt.monitor.tensorboard_sink import TensorBoardSink

                self.sinks.append(TensorBoardSink(self.run_dir))
            if cfg.logging.wandb.mode != "disabled":
                from blt.monitor.wandb_sink import WandbSink

                sink = WandbSink(cfg, self.run_dir, resumed)
                self.print(f"W&B run {sink.run.id} ({sink.mode})" + (
                    f": upload later with `wandb sync {sink.run.dir.rsplit('/files', 1)[0]}`"
                    if sink.mode == "offline" else ""))
                self.sinks.append(sink)

    @property
    def enabled(self) -> bool:
        return self.file is not None

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink.log(record["step"], record)
        for key, label, fmt in (("loss", "loss", ".3f"), ("bpb", "bpb", ".3f"), ("val_bpb", "val_bpb", ".3f"),
                                ("bytes_per_s", "B/s", ",.0f")):
            if key in record:
                self.shown[label] = format(record[key], fmt)
        if self.bar is not None:
            self.bar.set_postfix(self.shown, refresh=False)

    def histogram(self, step: int, tag: str, counts: list[int]) -> None:
        """counts[i] = how many times value i occurred (e.g. patches of i bytes)."""
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, f"{tag}_hist": [int(c) for c in counts]}) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink.histogram(step, f"train/{tag}", counts)

    def image(self, step: int, tag: str, rgb: np.ndarray, caption: str = "") -> Path | None:
        """An (H, W, 3) uint8 picture: run_dir/images/<tag>_<step>.png and every sink."""
        if self.file is None:
            return None
        from PIL import Image

        path = self.run_dir / "images" / f"{tag}_{step:08d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rgb).save(path)
        for sink in self.sinks:
            sink.image(step, f"val/{tag}", rgb, caption)
        return path

    def table(self, step: int, tag: str, columns: list[str], rows: list[list]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, tag: [dict(zip(columns, r)) for r in rows]}) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink.table(step, f"val/{tag}", columns, rows)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def print(self, text: str) -> None:
        if self.file is None:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
        if self.file is not None:
            self.file.close()
