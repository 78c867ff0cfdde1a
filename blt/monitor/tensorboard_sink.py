"""TensorBoard event files in run_dir/tensorboard, rank 0 only; `blt dashboard RUN_DIR` serves them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blt.monitor.wandb_sink import flat


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), flush_secs=10)

    def log(self, step: int, record: dict) -> None:
        for tag, value in flat(record).items():
            self.writer.add_scalar(tag, value, step)

    def histogram(self, step: int, tag: str, counts: list[int]) -> None:
        values = np.repeat(np.arange(len(counts)), counts)
        if len(values):
            self.writer.add_histogram(tag, values, step, bins=np.arange(len(counts) + 1) - 0.5)

    def image(self, step: int, tag: str, rgb: np.ndarray, caption: str) -> None:
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def table(self, step: int, tag: str, columns: list[str], rows: list[list]) -> None:
        def cell(v) -> str:
            return str(v).replace("|", "\\|").replace("\n", "⏎")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text(tag, "\n".join(lines), step)

    def close(self) -> None:
        self.writer.close()
