"""Where numbers go: metrics.jsonl (one JSON object per line) and the terminal progress bar.
Every metric passes through MetricsLogger.log, the one place other sinks can hook into."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True,
                 enabled: bool = True):
        """enabled=False (ranks other than 0) writes nothing and shows nothing."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = self.path.open("a", encoding="utf-8") if enabled else None
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0, smoothing=0.1)
        self.shown: dict = {}

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, label, fmt in (("loss", "loss", ".3f"), ("bpb", "bpb", ".3f"), ("val_bpb", "val_bpb", ".3f"),
                                ("bytes_per_s", "B/s", ",.0f")):
            if key in record:
                self.shown[label] = format(record[key], fmt)
        if self.bar is not None:
            self.bar.set_postfix(self.shown, refresh=False)

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
        if self.file is not None:
            self.file.close()
