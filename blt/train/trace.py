"""logging.data_trace: which training windows each rank read at each optimizer step.

    run_dir/data_trace/rank_<r>.jsonl     {"step": 3, "windows": [812, 77, ...]} per step

A resume first drops the lines after its checkpoint, so the file always lists exactly the windows
the current weights were trained on, in order.
"""

from __future__ import annotations

import json
from pathlib import Path

from blt.train.metrics import truncate_jsonl


class DataTrace:
    """logging.data_trace: each rank appends `{"step", "windows"}` per optimizer step to
    run_dir/data_trace/rank_<r>.jsonl; a resume first drops the lines after its checkpoint, so the
    file always lists exactly the windows the current weights were trained on, in order."""

    def __init__(self, run_dir: Path, rank: int, resumed_step: int):
        path = Path(run_dir) / "data_trace" / f"rank_{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(path, resumed_step)
        self.file = path.open("a")

    def write(self, step: int, windows: list[int]) -> None:
        """The windows (indices into the training split) this rank trained on in `step`."""
        self.file.write(json.dumps({"step": step, "windows": [int(w) for w in windows]}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
