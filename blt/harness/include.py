"""What an include path (`blt lm-eval --include-path DIR`, `eval.tasks_include_path`) holds, read
before lm-eval indexes it: the task YAML files that cannot be read (lm-eval skips those without a
word, so their tasks would just be "unknown") and the Python files their `!function` tags import.
An include path is code, like a Python import path: loading a task runs those files.

    found = scan(["my_tasks"])
    found.broken   # {Path("my_tasks/bad.yaml"): "line 3: mapping values are not allowed here"}
    found.code     # [Path("my_tasks/utils.py")]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# lm-eval's loader (lm_eval/tasks/_yaml_loader.py): libyaml's safe loader where there is one
_BASE = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.FullLoader
_IGNORED = {"__pycache__", ".ipynb_checkpoints"}  # directories lm-eval's index skips


class _Unreadable(ValueError):
    """A YAML file (or one it includes) lm-eval would skip; str is why, with the file and line."""


@dataclass
class Found:
    broken: dict[Path, str] = field(default_factory=dict)  # YAML file -> why it cannot be read
    code: list[Path] = field(default_factory=list)  # the Python files `!function` tags import

    def naming(self, task: str) -> dict[Path, str]:
        """The broken files whose text names `task` (a task, group or tag lm-eval lost with them)."""
        word = re.compile(rf"(?<![\w-]){re.escape(task)}(?![\w-])")
        return {
            p: why for p, why in self.broken.items() if word.search(p.read_text(encoding="utf-8", errors="replace"))
        }


def scan(dirs, trusted=()) -> Found:
    """Every *.yaml under `dirs` (as lm-eval's index walks them) and the files it includes; Python
    files under `trusted` directories (lm-eval's and blt's own tasks) are not listed as code."""
    found, code = Found(), set()
    trusted = [Path(t).resolve() for t in trusted]
    for d in dirs:
        for path in sorted(Path(d).glob("**/*.yaml")):
            if _IGNORED.isdisjoint(path.parts):
                try:
                    _read(path, code, set())
                except _Unreadable as e:
                    found.broken[path] = str(e)
    found.code = sorted(p for p in code if not any(p.resolve().is_relative_to(t) for t in trusted))
    return found


def _read(path: Path, code: set[Path], seen: set[Path]) -> None:
    """Parse `path` and what it includes, adding the Python files its `!function` tags name."""
    if path.resolve() in seen:
        raise _Unreadable(f"'{path}' is included twice (an include cycle)")
    seen.add(path.resolve())
    refs: list[str] = []

    class Loader(_BASE):
        pass

    Loader.add_constructor("!function", lambda loader, node: refs.append(loader.construct_scalar(node)) or "")
    try:
        with open(path, "rb") as f:
            cfg = yaml.load(f, Loader=Loader)  # noqa: S506 - a safe loader that knows one more tag
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise _Unreadable(f"'{path}' line {mark.line + 1}: {e.problem or e.context}") from None
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise _Unreadable(f"'{path}': {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(cfg, dict):
        raise _Unreadable(f"'{path}' holds a {type(cfg).__name__}, not a mapping of task keys")
    for ref in refs:  # `utils.fn` -> utils.py beside the YAML, as lm-eval resolves it first
        module = path.parent / (ref.rpartition(".")[0].replace(".", "/") + ".py")
        if module.is_file():
            code.add(module)
    includes = cfg.get("include") or []
    for inc in includes if isinstance(includes, list) else [includes]:
        _read(Path(inc) if Path(inc).is_absolute() else path.parent / str(inc), code, seen)
