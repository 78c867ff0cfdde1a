"""lm-evaluation-harness's own command line, with the model `blt` registered and blt's tasks on the
task path: every lm_eval option works as documented by lm-eval.

    python -m blt.harness --model blt --model_args pretrained=runs/tiny,batch_size=16 --tasks blt_colours
    python -m blt.harness run --model blt --model_args pretrained=exports/tiny --tasks arc_easy --include_path my_tasks

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so `lm_eval --model blt`
needs blt imported first: this module is that. Without --include_path, blt's tasks
(blt/harness/tasks) are the include path; with one, that directory is (copy or link blt's task
files into it to have both). Task data is read offline unless HF_DATASETS_OFFLINE=0 is set.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from blt.errors import UserError, require_extra
    from blt.harness.run import TASKS_DIR

    try:
        require_extra("eval", "lm_eval")
    except UserError as e:
        sys.exit(f"python -m blt.harness: error: {e}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate

    import blt.harness.lm  # noqa: F401 - registers the model "blt"

    args = sys.argv[1:]
    if (
        args
        and args[0] not in ("ls", "list", "validate", "-h", "--help")
        and not any(a == "--include_path" or a.startswith("--include_path=") for a in args)
    ):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
