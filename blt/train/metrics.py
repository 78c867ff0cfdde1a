"""Where numbers go: metrics.jsonl (one JSON object per line), the terminal progress bar, and, when
enabled, TensorBoard and W&B. Every metric passes through MetricsLogger (log, histogram, image,
table): the one place the sinks hook into. Only rank 0 of a job builds one that writes.

A resumed run first drops what a run that went on past its checkpoint wrote about the later
steps (metrics.jsonl lines, images; TensorBoard is told to hide them), so no step appears twice.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from blt.config import Config


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        enabled: bool = True,
        cfg: Config | None = None,
        resumed: bool = False,
    ):
        """enabled=False (ranks other than 0) writes nothing and shows nothing. With `cfg`, its
        logging section decides on TensorBoard and W&B; `resumed` continues the run from its
        checkpoint at `start_step` (and its W&B run)."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        abandoned = None  # the last step logged by a run that went on past the checkpoint resumed
        if enabled and resumed:
            abandoned = truncate_jsonl(self.path, start_step)
            drop_images_after(self.run_dir / "images", start_step)
        self.file = self.path.open("a", encoding="utf-8") if enabled else None
        self.bar = None
        if progress and enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
                smoothing=0.1,
            )
        self.shown: dict = {}
        self.sinks: list = []
        if enabled and cfg is not None:
            if cfg.logging.tensorboard:
                from blt.monitor.tensorboard_sink import TensorBoardSink

                board = TensorBoardSink(self.run_dir)
                if resumed:
                    hide_tensorboard_after(board.writer, start_step)
                self.sinks.append(board)
            if cfg.logging.wandb.mode != "disabled":
                from blt.monitor.wandb_sink import WandbSink

                sink = WandbSink(cfg, self.run_dir, resumed)
                self.print(
                    f"W&B run {sink.run.id} ({sink.mode})"
                    + (
                        f": upload later with `wandb sync {sink.run.dir.rsplit('/files', 1)[0]}`"
                        if sink.mode == "offline"
                        else ""
                    )
                )
                if abandoned is not None:  # W&B history cannot be rewritten; it drops steps it has seen
                    self.print(
                        f"W&B run {sink.run.id} keeps steps {start_step + 1}-{abandoned} as the stopped run "
                        f"logged them and drops their replay (metrics.jsonl and TensorBoard hold the "
                        f"resumed values)"
                    )
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
        for key, label, fmt in (
            ("loss", "loss", ".3f"),
            ("bpb", "bpb", ".3f"),
            ("val_bpb", "val_bpb", ".3f"),
            ("bytes_per_s", "B/s", ",.0f"),
        ):
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


def mean_patch_size(records: list[dict]) -> float | None:
    """A run's mean patch size over its training steps, bytes / patches, from its metrics.jsonl
    records (each training line holds its interval's avg_patch_size), or None without any."""
    steps, patches, last = 0, 0.0, 0
    for m in records:
        if "avg_patch_size" in m and "loss" in m and m["step"] > last:
            n = m["step"] - last  # steps in this logging interval
            steps, patches, last = steps + n, patches + n / m["avg_patch_size"], m["step"]
    return steps / patches if patches else None


def truncate_jsonl(path: Path, step: int) -> int | None:
    """Drop the lines of `path` (JSON objects with a "step") after `step`, and any torn line a crash
    left; returns the last step dropped, or None if nothing was. Atomic: a crash keeps the old file."""
    path = Path(path)
    if not path.is_file():
        return None
    kept, last, torn = [], None, False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            s = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            s = None
        if not isinstance(s, int):
            torn = torn or bool(line.strip())
        elif s <= step:
            kept.append(line + "\n")
        else:
            last = s if last is None else max(last, s)
    if last is None and not torn:
        return None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    return last


def drop_images_after(images: Path, step: int) -> None:
    """Remove images/<tag>_<step>.png of steps after `step`."""
    for png in Path(images).glob("*_*.png"):
        number = png.stem.rsplit("_", 1)[1]
        if number.isdigit() and int(number) > step:
            png.unlink()


def hide_tensorboard_after(writer, step: int) -> None:
    """A session start at step + 1: TensorBoard then hides every event of a later step read before
    it (what SummaryWriter(purge_step=...) writes), so the steps a stopped run logged past its
    checkpoint do not show twice."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer.file_writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
