"""The harness room: downstream tasks through EleutherAI's lm-evaluation-harness (the optional
extra `blt[eval]`), on any blt model, offline and batched. Importing this package imports
neither torch nor lm_eval.

    scoring.py     Scorer: loglikelihood, rolling loglikelihood and generation in batched forwards (pure torch)
    lm.py          BltLM, the lm_eval model registered as `blt` (imports lm_eval)
    run.py         finding tasks (blt's, --include-path, lm-eval's), running them offline, flat metrics
    include.py     what an include path holds: unreadable task YAML, the Python its !function tags import
    output.py      `blt lm-eval --output`: checked before the evaluation, written atomically
    tasks/         blt's own task YAMLs and their data (make_tasks.py writes the data)
    __main__.py    `python -m blt.harness ...`: lm-eval's own command line with `blt` registered

    blt lm-eval runs/tiny --tasks blt_shakespeare_next_line,blt_shakespeare_speaker --limit 100
    python -m blt.harness --model blt --model_args pretrained=runs/tiny --tasks blt_colours --batch_size 16
"""
