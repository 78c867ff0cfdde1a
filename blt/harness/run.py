"""Running lm-eval tasks on a blt model, offline: what `blt lm-eval` and the trainer's `eval.tasks`
call. Tasks are found in blt's own task directory (blt/harness/tasks), then in `include_path`
directories, then among lm-eval's built-in tasks (indexing those takes ~10 s, so it happens only
when a name is not found before); their data is read offline.

    tasks = find_tasks(["blt_shakespeare_next_line"], include_path=["my_tasks"])   # checked names
    results = run_tasks(BltLM.from_model(model, patcher, 512), tasks, limit=100)
    flat_metrics(results)   # {"blt_shakespeare_next_line/acc": 0.41, ...}
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blt.errors import UserError, require_extra

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
NETWORK_ERRORS = (
    "offline",
    "connection",
    "couldn't reach",
    "could not reach",
    "resolve",
    "hub",
    "internet",
    "max retries",
    "not find",
    "doesn't exist on the hub",
    "repository not found",
)


class TaskError(UserError):
    """An unknown task, or a task whose data cannot be read here; one line naming the fix."""


@contextlib.contextmanager
def offline():
    """HF datasets and the hub offline (unless HF_DATASETS_OFFLINE=0 is set: a machine with a
    network may fetch task data), with lm-eval's and their progress bars and logs quiet."""
    allowed = os.environ.get("HF_DATASETS_OFFLINE") == "0"
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    if not allowed:
        os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import datasets

    old = (
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
        datasets.utils.are_progress_bars_disabled(),
    )
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = not allowed
    datasets.disable_progress_bars()
    quiet = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    import lm_eval.api.task
    import lm_eval.evaluator
    from tqdm import tqdm

    # lm-eval draws a progress bar per task and asks `git describe` (whose "fatal: not a git
    # repository" reaches the terminal outside a repository) for the results' git_hash
    patched = [
        (lm_eval.api.task, "tqdm", functools.partial(tqdm, disable=True)),
        (lm_eval.evaluator, "get_git_commit_hash", _git_hash),
    ]
    originals = [getattr(m, name) for m, name, _ in patched]
    for m, name, new in patched:
        setattr(m, name, new)
    try:
        yield
    finally:
        for (m, name, _), orig in zip(patched, originals):
            setattr(m, name, orig)
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = old[0], old[1]
        if not old[2]:
            datasets.enable_progress_bars()
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass
class Tasks:
    """Task names checked to exist, and the lm-eval TaskManager that knows them."""

    names: list[str]
    manager: Any
    where: list[str] = field(default_factory=list)  # the directories searched, for messages
    flag: str = "--include-path"  # how the caller spells the include path, for messages
    code: list[Path] = field(default_factory=list)  # the include paths' Python files `!function` tags import

    @property
    def fewshot_flag(self) -> str:
        """How the same caller spells num_fewshot."""
        return "--num-fewshot" if self.flag.startswith("--") else "eval.tasks_num_fewshot"


def find_tasks(names: list[str], include_path: list[str] | tuple = (), flag: str = "--include-path") -> Tasks:
    """Every name a task, group or tag of blt's tasks, the include paths or lm-eval's own; `flag`
    is how the caller spells the include path (--include-path, eval.tasks_include_path)."""
    require_extra("eval", "lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from blt.harness import include

    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise TaskError("no task given: name at least one (blt's own: " + ", ".join(blt_task_names()) + ")")
    for p in include_path:
        if not Path(p).is_dir():
            raise TaskError(f"{flag} '{p}' is not a directory of task YAML files")
    paths = [str(TASKS_DIR), *map(str, include_path)]
    where = [f"blt's tasks ({TASKS_DIR})", *(f"'{p}'" for p in include_path)]
    found = include.scan(include_path, trusted=[TASKS_DIR, *lm_eval.__path__])
    with offline():
        manager = TaskManager(include_path=paths, include_defaults=False)
        missing = [n for n in names if n not in manager.all_tasks]
        lost = [(n, why) for n in missing for why in found.naming(n).values()]
        if lost:  # a task in a YAML file lm-eval skipped: that file's error, not "unknown task"
            raise TaskError(f"task '{lost[0][0]}' cannot be read: {lost[0][1]}; fix that file")
        if missing:  # then lm-eval's built-in tasks (slow to index)
            manager = TaskManager(include_path=paths)
            where.append(f"lm-eval's {len(manager.all_tasks)} built-in tasks")
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        close = difflib.get_close_matches(missing[0], manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        broken = list(found.broken.values())
        note = (
            f"; {flag} holds {len(broken)} unreadable YAML file(s), which lm-eval skips: {broken[0]}" if broken else ""
        )
        raise TaskError(
            f"unknown task {', '.join(repr(m) for m in missing)}{hint}; looked in {', '.join(where)}"
            f"{note}; add a directory of task YAML files with {flag}"
        )
    return Tasks(names, manager, where, flag, found.code)


def code_notice(tasks: Tasks) -> str:
    """The line naming the include paths' Python files that loading the tasks will import."""
    return (
        f"{tasks.flag} runs Python: {', '.join(map(str, tasks.code))} (imported by the task YAML files' !function tags)"
    )


def blt_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_tasks(tasks: Tasks) -> list:
    """The Task (or Group) objects, their data read offline; a task whose data needs the network
    is one line saying so and how to give it a local copy."""
    objects = []
    for name in tasks.names:
        try:
            with offline():
                loaded = tasks.manager.load([name])
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; say which task and why
            first = next((s for s in str(e).splitlines() if s.strip()), type(e).__name__)[:200]
            if any(w in str(e).lower() for w in NETWORK_ERRORS):
                raise TaskError(
                    f"task '{name}' needs data from the network, and blt lm-eval runs offline ({first}); point the "
                    f"task at a local copy (dataset_path: json, dataset_kwargs: {{data_files: ...}} in a task YAML "
                    f"in {tasks.flag}; see the README) or set HF_DATASETS_OFFLINE=0 on a machine with a "
                    "network"
                ) from None
            raise TaskError(f"task '{name}' could not be loaded: {type(e).__name__}: {first}") from None
        groups = loaded.get("groups", {})
        objects += [groups[name]] if name in groups else list(loaded["tasks"].values())
    return objects


def check_fewshot(tasks: Tasks, objects: list, num_fewshot: int | None) -> None:
    """Every task has the few-shot examples it will be asked for (`num_fewshot`, or its YAML's),
    else one line naming the flag and how many there are (not random.sample's "Sample larger than
    population" from inside lm-eval)."""
    for task in tasks.manager.load(objects)["tasks"].values():
        own = task.get_config("num_fewshot")
        n = own if num_fewshot is None or own == 0 else num_fewshot  # lm-eval keeps a YAML's 0
        if not n:
            continue
        sampler = getattr(task, "sampler", None)
        pool = len(sampler.fewshot_docs()) if sampler is not None else 0
        cfg = getattr(task, "fewshot_cfg", None)
        if cfg is not None and cfg.split is not None and cfg.split == task.config.test_split:
            pool -= 1  # the document being asked about is never its own example
        if n > pool:
            said = f"{tasks.fewshot_flag} {n}" if n == num_fewshot else f"num_fewshot: {n} in its YAML"
            raise TaskError(
                f"{said} asks task '{task.task_name}' for more few-shot examples than it has "
                f"({max(pool, 0)}); give {tasks.fewshot_flag} {max(pool, 0)} or fewer"
            )


def run_tasks(
    lm,
    tasks: Tasks,
    limit: int | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 0,
    log_samples: bool = False,
    objects: list | None = None,
) -> dict | None:
    """lm_eval.simple_evaluate on `lm` (a BltLM) over `tasks` (or their already loaded `objects`);
    the results dict on rank 0, None on other ranks. Python's, numpy's and torch's random states
    are left alone (a training run's stay exact)."""
    from lm_eval import simple_evaluate

    objects = load_tasks(tasks) if objects is None else objects
    check_fewshot(tasks, objects, num_fewshot)
    with offline():
        return simple_evaluate(
            model=lm,
            tasks=objects,
            task_manager=tasks.manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )


def flat_metrics(results: dict) -> dict[str, float]:
    """lm-eval's results -> {"<task>/<metric>": value}: numbers only, filters dropped from the
    names ("acc,none" -> "acc") and standard errors left out."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if (
                "_stderr" in metric
                or metric == "sample_len"
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
            ):
                continue
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            out[f"{task}/{name}"] = float(value)
    return out


def evaluate_model(
    model: str,
    names: list[str],
    include_path: list[str] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[dict, dict]:
    """`blt lm-eval`: the tasks checked and their data read first (fast failures), then the model
    loaded and evaluated. Returns (lm-eval's full results, {task: {metric: value}}). The include
    paths' Python files are named on stderr before loading the tasks imports them."""
    from blt.harness.lm import BltLM

    tasks = find_tasks(names, include_path)
    if tasks.code:
        print(f"blt lm-eval: {code_notice(tasks)}", file=sys.stderr, flush=True)
    objects = load_tasks(tasks)
    check_fewshot(tasks, objects, num_fewshot)
    lm = BltLM(pretrained=model, device=device, batch_size=batch_size, dtype=dtype)
    results = run_tasks(lm, tasks, limit, num_fewshot, bootstrap_iters=100000, objects=objects)
    table: dict[str, dict] = {}
    for key, value in flat_metrics(results).items():
        task, _, metric = key.partition("/")
        table.setdefault(task, {})[metric] = value
    return results, table
