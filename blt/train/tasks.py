"""Downstream tasks during training (`eval.tasks`): lm-evaluation-harness tasks on the model being
trained, every `eval.tasks_every` steps and at the end, logged as `eval/<task>/<metric>` to
metrics.jsonl, TensorBoard and W&B. The harness room (blt/harness) does the scoring; this module
decides when, on which ranks, and what is logged.

    blt train configs/tiny.yaml eval.tasks=[blt_shakespeare_next_line] eval.tasks_every=200 eval.tasks_limit=100

The task names are checked before the run starts (`find_eval_tasks`). In a job of several
processes the requests are shared among the ranks and rank 0 logs; every rank runs as many
forwards (ZeRO-3 gathers weights in each forward), and partitioned weights generate uncached.
Python's, numpy's and torch's random states are the same after a task run as before it, so a run
with tasks trains exactly as one without.
"""

from __future__ import annotations

import random

import numpy as np

from blt.config import Config
from blt.patching import Patcher
from blt.train.checkpoint import rng_state, set_rng_state
from blt.train.distributed import Dist
from blt.train.metrics import MetricsLogger


def find_eval_tasks(cfg: Config):
    """The checked task names of eval.tasks (a one-line error for an unknown one, or for lm-eval
    missing), or None when there are none."""
    if not cfg.eval.tasks:
        return None
    from blt.harness.run import code_notice, find_tasks
    from blt.proc import log

    tasks = find_tasks(list(cfg.eval.tasks), list(cfg.eval.tasks_include_path), flag="eval.tasks_include_path")
    if tasks.code:
        log(f"eval: {code_notice(tasks)}")  # before the first task run imports them
    return tasks


class TaskEval:
    """The task evaluation of one run: its config, ranks, engine (whose model is scored), patcher
    and the tasks found at start-up."""

    def __init__(self, cfg: Config, world: Dist, engine, patcher: Patcher, tasks):
        self.cfg, self.world, self.engine, self.patcher, self.tasks = cfg, world, engine, patcher, tasks

    def due(self, step: int, last: bool) -> bool:
        """At the end of training, and every eval.tasks_every steps."""
        every = self.cfg.eval.tasks_every
        return last or bool(every and step % every == 0)

    def run(self, step: int, metrics: MetricsLogger) -> dict:
        """Run the tasks at `step`; returns (and rank 0 logs) {"eval/<task>/<metric>": value}."""
        from blt.harness.lm import BltLM
        from blt.harness.run import flat_metrics, run_tasks

        c, engine, model = self.cfg, self.engine, self.engine.model
        was_training = model.training
        saved = (rng_state(), random.getstate(), np.random.get_state())
        model.eval()
        try:
            lm = BltLM.from_model(
                model,
                self.patcher,
                c.data.seq_len,
                c.eval.batch_size,
                engine.amp_dtype,
                dist=self.world,
                cached=not engine.partitioned,
            )
            results = run_tasks(lm, self.tasks, c.eval.tasks_limit, c.eval.tasks_num_fewshot)
        finally:
            set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])
            if was_training:
                model.train()
        record = {f"eval/{k}": v for k, v in flat_metrics(results or {}).items()}
        metrics.log({"step": step, **record})
        return record
