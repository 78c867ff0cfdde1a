"""The `blt` command line.

    blt train configs/tiny.yaml [key=value ...]         # run dir: config.yaml, metrics.jsonl, checkpoints/
    blt train tiny                                      # a config shipped with blt, by name (entropy_tiny, blt_1b, ...)
    blt prepare corpus/ --out data/corpus --workers 8   # files -> shards (+ --entropy-model: entropies)
    blt eval runs/tiny [--data FILE ...]                 # one JSON line: bpb, bytes, loss, avg_patch_size
    blt generate runs/tiny --prompt TEXT --max-bytes N --seed S [--temperature T --top-k K --top-p P --stop S]
    blt patch runs/tiny --text TEXT | --file PATH        # how a text splits into patches, with entropies
    blt info configs/tiny.yaml [key=value ...]           # parameters and FLOPs per byte, no training
    blt plan configs/blt_8b.yaml --nodes 8 --procs-per-node 8   # DeepSpeed config + memory per ZeRO stage
    blt consolidate runs/tiny [--out FILE]               # ZeRO shards -> one model.safetensors
    blt consolidate runs/tiny --universal                # -> checkpoints/universal/step_N (any layout resumes it)
    blt export runs/tiny exports/tiny [--format hf]      # engine-free safetensors dir (or HF transformers dir)
    blt import-hf HF_BLT_DIR exports/blt                 # HF BLT dir -> export dir, to evaluate or fine-tune
    blt dashboard runs/tiny [--port 6006]                # TensorBoard on 127.0.0.1, offline
    blt lm-eval runs/tiny --tasks blt_shakespeare_next_line [--limit N]   # lm-evaluation-harness tasks, offline
    blt serve exports/tiny [--port 8000 --max-batch 16]  # OpenAI-compatible HTTP API on 127.0.0.1

Bad input is one line on stderr and exit status 2; a reader that leaves early (`blt generate ... | head`)
ends any verb quietly with status 141, as SIGPIPE ends Unix tools.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import select
import sys

from blt.proc import launched, library_logs_to_stderr, log


def _cmd_train(args) -> None:
    from blt.config import load_config

    cfg = load_config(args.config, args.overrides)  # before importing torch: a bad config fails at once
    from blt.train.loop import train

    result = train(cfg)
    if launched().rank == 0:
        print(json.dumps(result))


def _cmd_prepare(args) -> None:
    from blt.train.prepare_job import PrepareOptions, run
    from blt.typed import from_args

    run(from_args(PrepareOptions, args))


def _cmd_tokenizer_train(args) -> None:
    from blt.subword import TrainOptions, train
    from blt.typed import from_args

    train(from_args(TrainOptions, args))


def add_tokenizer_parser(sub) -> None:
    """`blt tokenizer train`: the flags of TrainOptions (blt/subword.py), which holds their defaults."""
    tk = sub.add_parser("tokenizer", help="subword tokenizers for the token baseline (HF tokenizers)")
    tsub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tr = tsub.add_parser("train", help="train a byte-level BPE on the inputs blt prepare reads")
    tr.add_argument("sources", nargs="*", help="files, directories, globs (txt, jsonl, json, parquet; .gz/.zst)")
    tr.add_argument("--out", required=True, help="the tokenizer directory to write (new, or empty)")
    opt = functools.partial(tr.add_argument, default=argparse.SUPPRESS)
    opt("--vocab", type=int, help="vocabulary size (256 bytes + <|endoftext|> + merges)")
    opt("--min-frequency", type=int, help="a merged pair occurs at least this often")
    opt("--text-field", help="the text column of json/jsonl/parquet (default: data.text_field's)")
    opt("--sample-by", help="plain text: document, paragraph or line (default: data.sample_by's)")
    tr.set_defaults(func=_cmd_tokenizer_train)


def add_prepare_parser(sub) -> None:
    """The flags of PrepareOptions (blt/train/prepare_job.py), which holds their defaults: a flag
    left out is absent here (SUPPRESS) and keeps the field's default, data.*'s for the data settings."""
    pr = sub.add_parser("prepare", help="files -> shards (and their entropies) for training at scale")
    pr.add_argument(
        "sources", nargs="*", help="files, directories, globs (txt, jsonl, json, parquet; .gz/.zst), or hub:NAME"
    )
    pr.add_argument("--out", required=True, help="the prepared directory (created; rerun to update it)")
    opt = functools.partial(pr.add_argument, default=argparse.SUPPRESS)
    opt("--workers", type=int, help="processes reading and packing shards")
    opt("--part", help="K/N: prepare part K of N (several machines); the last part to finish writes the manifest")
    opt("--shard-mb", type=float, help="input MB per shard")
    opt("--val-fraction", type=float, help="documents held out for validation (default: data.val_fraction's)")
    opt("--text-field", help="the text column of json/jsonl/parquet (default: data.text_field's)")
    opt("--sample-by", help="plain text: document, paragraph or line (default: data.sample_by's)")
    opt("--seed", type=int, help="which documents are held out (default: data.seed's)")
    opt("--entropy-model", help="compute float16 entropies with this byte_lm run")
    opt("--seq-len", type=int, help="the training data.seq_len the entropies are for (default: data.seq_len's)")
    opt("--batch", type=int, help="windows per entropy-model forward")
    pr.set_defaults(func=_cmd_prepare)


def _cmd_eval(args) -> None:
    import numpy as np

    from blt.artifacts import load_model
    from blt.data import encode_files, prepare_data
    from blt.evaluate import EvalOptions, evaluate
    from blt.typed import from_args

    opts = from_args(EvalOptions, args).checked()  # before the (slow) load
    loaded = load_model(opts.checkpoint, opts.device)
    model, cfg, patcher, step_dir = loaded.model, loaded.cfg, loaded.patcher, loaded.where
    if opts.data:
        tokens = encode_files(opts.data, cfg.data.text_field, cfg.data.sample_by)
        source = opts.data
    else:
        val = prepare_data(cfg.data, log=log).val_tokens(opts.max_bytes)
        tokens = np.concatenate([t[0 : len(t)] for _, t in val])
        source = "validation split of the run's data config"
    seq_len = opts.seq_len or cfg.data.seq_len
    result = evaluate(model, patcher, tokens, seq_len, opts.batch_size, opts.max_bytes, opts.device)
    print(json.dumps({**result, "seq_len": seq_len, "checkpoint": str(step_dir), "data": source}))


def _cmd_generate(args) -> None:
    from blt.device import check_device
    from blt.errors import UserError
    from blt.generation import Generator, stream_text
    from blt.generation.sampling import check_sampling
    from blt.typed import PosFloat, check_option

    check_sampling(args.max_bytes, args.temperature, args.top_k, args.top_p, args.seed, flag=True)
    if args.compile and args.no_cache:
        raise UserError("--compile compiles the cached path's one-byte steps; drop --no-cache or --compile")
    if args.kv_cache_mb is not None:
        check_option("kv_cache_mb", args.kv_cache_mb, PosFloat, flag=True)
        if args.compile:
            raise UserError("--compile runs contiguous KV caches, not paged ones; drop --compile or --kv-cache-mb")
    device = check_device(args.device, "--device")
    kv = dict(kv_cache_mb=args.kv_cache_mb, budget_name="--kv-cache-mb")
    gen = Generator.load(args.checkpoint, device, compile=args.compile, **kv)
    # argv arrives as str with surrogate escapes for bytes that are not UTF-8: os.fsencode gives them back
    prompts = [os.fsencode(p) for p in args.prompt or [""]]
    stops = [os.fsencode(s.replace("\\n", "\n").replace("\\t", "\t")) for s in args.stop or []]
    opts = dict(
        max_bytes=args.max_bytes,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=stops,
        cache=not args.no_cache,
    )
    if len(prompts) == 1 and not args.json:  # stream prompt and bytes as UTF-8, never half a character

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        stream_text(itertools.chain(prompts[0], (byte for _, byte in gen.stream(prompts, **opts))), write)
        write("\n")
    else:
        outs = gen.generate(prompts, **opts)
        for p, o in zip(prompts, outs):
            texts = {"prompt": p.decode("utf-8", errors="replace"), "text": o.decode("utf-8", errors="replace")}
            print(json.dumps(texts, ensure_ascii=False))
    if args.stats:
        print(json.dumps(gen.stats), file=sys.stderr)


def _cmd_patch(args) -> None:
    import torch

    from blt.artifacts import load_model
    from blt.data.documents import read_input
    from blt.tokens import decode, encode

    text = read_input(args.file) if args.file is not None else args.text  # a bad file fails before the load
    loaded = load_model(args.checkpoint, "cpu")
    cfg, patcher = loaded.cfg, loaded.patcher
    ids = torch.from_numpy(encode(text, bos=True, eos=False).astype("int64"))  # (T,)
    window = cfg.data.seq_len  # a longer text is patched in the windows training reads
    starts, signal = patcher.explain_windows(loaded.model, ids, window)
    about = patcher.signal  # what decided each byte's start: its name, the mode's rule
    key = about.key
    bounds = torch.nonzero(starts).flatten().tolist() + [len(ids)]
    patches = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        raw = decode(ids[a:b])
        patches.append(
            {
                "text": raw.decode("utf-8", errors="backslashreplace"),
                "bytes": b - a,
                key: [round(float(e), 3) for e in signal[a:b]] if signal is not None else None,
            }
        )
    if args.json:
        print(
            json.dumps(
                {"mode": cfg.patching.mode, "threshold": patcher.threshold, "window": window, "patches": patches}
            )
        )
        return
    th = f", {about.rule}" if about.rule else ""
    windows = (
        f"; in {-(-len(ids) // window)} windows of data.seq_len={window} bytes, each starting a patch, "
        "as training reads text"
        if len(ids) > window
        else ""
    )
    print(
        f"{len(patches)} patches, mean {sum(p['bytes'] for p in patches) / len(patches):.2f} bytes "
        f"({cfg.patching.mode}{th}); BOS is the first patch{windows}"
    )
    print("|" + "|".join(p["text"].replace("\n", "\\n") for p in patches) + "|")
    if signal is not None:
        for p in patches:
            values = " ".join(f"{e:.2f}" if e != float("inf") else "inf" for e in p[key])
            print(f"{p['text']!r:>24}  {values}")


def _cmd_info(args) -> None:
    from pathlib import Path

    from blt.config import load_config
    from blt.model import build_model
    from blt.model.flops import model_info

    run = Path(args.config)
    try:
        is_run = run.is_dir()
    except OSError:  # a name too long for the file system: load_config says so in one line
        is_run = False
    if is_run:  # a run dir: its config, and FLOPs at the mean patch size it measured in training
        cfg = load_config(run / "config.yaml", args.overrides)
        print(
            json.dumps(
                model_info(cfg, build_model(cfg.model, cfg.patching), measured_patch_size=_measured_patch_size(run))
            )
        )
        return
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(model_info(cfg, build_model(cfg.model, cfg.patching))))


def _measured_patch_size(run) -> float | None:
    """A run dir's mean patch size over its training steps (from metrics.jsonl), or None."""
    from blt.train.metrics import mean_patch_size

    path = run / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return mean_patch_size([json.loads(line) for line in lines])


def _cmd_plan(args) -> None:
    from blt.config import load_config
    from blt.typed import PosFloat, PosInt, check_option

    for name, tp in (("nodes", PosInt), ("procs_per_node", PosInt), ("gpu_mem_gb", PosFloat)):  # before the config
        check_option(name, getattr(args, name), tp, flag=True)
    cfg = load_config(args.config, args.overrides)
    from blt.train.plan import format_plan, make_plan

    plan = make_plan(cfg, args.nodes, args.procs_per_node, gpu=not args.cpu)
    print(format_plan(plan, args.gpu_mem_gb, cfg.distributed.zero_stage))


def _cmd_consolidate(args) -> None:
    from pathlib import Path

    from blt.artifacts.checkpoints import CheckpointError, find_checkpoint
    from blt.artifacts.zero import consolidate_zero, is_zero_checkpoint
    from blt.disk import write_safetensors

    step_dir = find_checkpoint(args.checkpoint)
    if args.universal:
        from blt.proc import log
        from blt.train.reshard import universal_checkpoint

        if args.out:
            raise CheckpointError("--universal writes beside the checkpoint, where a resume finds it; drop --out")
        print(json.dumps({"checkpoint": str(step_dir), "universal": str(universal_checkpoint(step_dir, log))}))
        return
    if not is_zero_checkpoint(step_dir):
        raise CheckpointError(f"'{step_dir}' holds no ZeRO shards; its model.safetensors is already the whole model")
    out = Path(args.out) if args.out else step_dir / "model.safetensors"
    write_safetensors(out, consolidate_zero(step_dir))
    print(json.dumps({"checkpoint": str(step_dir), "weights": str(out)}))


def _cmd_export(args) -> None:
    from blt.export import export

    print(json.dumps(export(args.checkpoint, args.out, args.format)))


def _cmd_import_hf(args) -> None:
    from blt.export import import_hf

    print(json.dumps(import_hf(args.src, args.out)))


def _cmd_serve(args) -> None:
    from blt.serve.server import ServeOptions, serve
    from blt.typed import from_args

    serve(from_args(ServeOptions, args))


def _cmd_lm_eval(args) -> None:
    from blt.device import check_device
    from blt.typed import NonNegInt, PosInt, check_option

    check_option("limit", args.limit, PosInt, optional=True, flag=True)  # before anything slow
    check_option("batch_size", args.batch_size, PosInt, flag=True)
    check_option("num_fewshot", args.num_fewshot, NonNegInt, optional=True, flag=True)
    device = check_device(args.device, "--device")
    from blt.errors import require_extra
    from blt.harness.output import results_file
    from blt.harness.run import evaluate_model

    require_extra("eval", "lm_eval")
    with results_file(args.output) as write:  # a bad --output fails here, not after the evaluation
        results, table = evaluate_model(
            args.checkpoint,
            args.tasks.split(","),
            args.include_path or [],
            args.limit,
            args.num_fewshot,
            args.batch_size,
            device,
            args.dtype,
        )
        from lm_eval.utils import make_table

        print(make_table(results), file=sys.stderr)
        write(results)
    print(json.dumps({"model": args.checkpoint, "tasks": table, "limit": args.limit, "num_fewshot": args.num_fewshot}))


def _cmd_dashboard(args) -> None:
    from blt.monitor.dashboard import serve

    serve(args.run, args.port, args.host)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, `blt VERB: error: ...`, as every other bad input (the verbs'
    parsers are of this class too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


CONFIG_HELP = "a YAML file, or the name of a config shipped with blt (tiny, entropy_tiny, blt_1b, ...)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="blt", description="Byte Latent Transformer trainer")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help=CONFIG_HELP)
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.steps=100")
    t.set_defaults(func=_cmd_train)

    add_prepare_parser(sub)
    add_tokenizer_parser(sub)

    e = sub.add_parser("eval", help="bits per byte of a checkpoint on held-out text")
    e.add_argument("checkpoint", help="run dir or checkpoint dir")
    opt = functools.partial(e.add_argument, default=argparse.SUPPRESS)  # defaults: EvalOptions' (blt/evaluate.py)
    opt("--data", nargs="+", help="text/jsonl/parquet files or globs (default: the run's validation split)")
    opt("--batch-size", type=int)
    opt("--max-bytes", type=int)
    opt("--device")
    opt("--seq-len", type=int, help="bytes per scored window (default: the model's data.seq_len)")
    e.set_defaults(func=_cmd_eval)

    g = sub.add_parser("generate", help="sample bytes from a checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", action="append", help="prompt text; repeat for a batch of prompts (JSON lines out)")
    g.add_argument("--max-bytes", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop after this string (included; \\n and \\t work); repeatable")
    g.add_argument("--no-cache", action="store_true", help="re-run the whole context for every byte (reference)")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the one-byte steps (tens of seconds of compiling first; in fp32 the same bytes)",
    )
    g.add_argument("--kv-cache-mb", type=float, default=None, help="paged KV caches of this many MB in all")
    g.add_argument("--json", action="store_true", help="print {prompt, text} JSON lines instead of streaming")
    g.add_argument("--stats", action="store_true", help="print bytes/s and global-model calls to stderr")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=_cmd_generate)

    pa = sub.add_parser("patch", help="show how a text splits into patches")
    pa.add_argument("checkpoint")
    what = pa.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the text to patch")
    what.add_argument(
        "--file",
        help="patch this file's bytes (a text longer than the model's data.seq_len is "
        "patched in windows of that many bytes, as training reads it)",
    )
    pa.add_argument("--json", action="store_true")
    pa.set_defaults(func=_cmd_patch)

    i = sub.add_parser(
        "info",
        help="parameter count and FLOPs per byte of a config, or of a run dir (at the mean patch size it measured)",
    )
    i.add_argument("config", help=f"{CONFIG_HELP}, or a run dir")
    i.add_argument("overrides", nargs="*")
    i.set_defaults(func=_cmd_info)

    pl = sub.add_parser("plan", help="world size, DeepSpeed config and memory per ZeRO stage, no allocation")
    pl.add_argument("config", help=CONFIG_HELP)
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--nodes", type=int, default=1)
    pl.add_argument("--procs-per-node", type=int, default=1, help="processes (GPUs) per node")
    pl.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU (H100: 80, H200: 141)")
    pl.add_argument("--cpu", action="store_true", help="plan for CPU processes (fp32 by default)")
    pl.set_defaults(func=_cmd_plan)

    c = sub.add_parser("consolidate", help="merge a ZeRO checkpoint's shards into one model.safetensors")
    c.add_argument("checkpoint", help="run dir or checkpoint step dir")
    c.add_argument("--out", help="file to write (default: model.safetensors in the step dir)")
    c.add_argument(
        "--universal",
        action="store_true",
        help="write the checkpoint's universal form instead (weights and optimizer state for any process "
        "count or ZeRO stage), as a resume on another layout does",
    )
    c.set_defaults(func=_cmd_consolidate)

    x = sub.add_parser("export", help="write an engine-free model dir (or an HF transformers dir with --format hf)")
    x.add_argument("checkpoint", help="run dir, checkpoint step dir (any ZeRO stage) or export dir")
    x.add_argument("out", help="new directory to write")
    x.add_argument("--format", choices=["blt", "hf"], default="blt")
    x.set_defaults(func=_cmd_export)

    ih = sub.add_parser("import-hf", help="convert an HF BLT dir (config.json + safetensors) into an export dir")
    ih.add_argument("src")
    ih.add_argument("out")
    ih.set_defaults(func=_cmd_import_hf)

    le = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a model, offline (the eval extra)")
    le.add_argument("checkpoint", help="run dir, checkpoint dir (any ZeRO stage) or export dir")
    le.add_argument("--tasks", required=True, help="comma-separated task, group or tag names (blt's: blt_*)")
    le.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    le.add_argument("--batch-size", type=int, default=16, help="rows per forward")
    le.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    le.add_argument("--include-path", action="append", help="a directory of task YAML files; repeatable")
    le.add_argument("--output", help="write lm-eval's full results (JSON) to this file (replaced if it exists)")
    le.add_argument("--device", default="cpu")
    le.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16: autocast on GPU")
    le.set_defaults(func=_cmd_lm_eval)

    d = sub.add_parser("dashboard", help="serve a run's TensorBoard on 127.0.0.1 (no internet needed)")
    d.add_argument("run", help="run dir (or a folder of run dirs)")
    d.add_argument("--port", type=int, default=6006)
    d.add_argument("--host", default="127.0.0.1")
    d.set_defaults(func=_cmd_dashboard)

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (the serve extra)")
    s.add_argument("checkpoint", help="run dir, checkpoint dir or export dir")
    opt = functools.partial(s.add_argument, default=argparse.SUPPRESS)  # defaults: ServeOptions' (blt/serve/server.py)
    opt("--host", help="address to bind (default: this machine only)")
    opt("--port", type=int, help="TCP port (0: any free one)")
    opt("--max-batch", type=int, help="sequences generated together, at most")
    opt("--max-queue", type=int, help="sequences waiting for the batch; more: HTTP 429")
    opt("--max-tokens", type=int, help="the most bytes one request may ask for")
    opt("--device", help="cpu, cuda, cuda:N, mps or auto")
    opt("--api-key", help="require 'Authorization: Bearer KEY' (or set BLT_API_KEY)")
    opt("--name", help="the model's name in the API (default: the MODEL dir's name)")
    opt("--drain", type=float, help="seconds Ctrl-C lets running requests finish")
    opt("--threads", type=int, help="CPU threads for the model (default on CPU: one fewer than the cores)")
    opt("--kv-cache-mb", type=float, help="paged KV caches of this many MB in all (default: the context per row)")
    s.set_defaults(func=_cmd_serve)
    return p


def say_error(line: str) -> None:
    """The error line on stderr in one write, so the same line from every rank of a job never
    interleaves with another's (a pipe keeps writes under 4 KiB whole)."""
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), (line.replace("\n", " ") + "\n").encode("utf-8", "backslashreplace"))
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured in a test)
        print(line, file=sys.stderr)


PIPE_CLOSED = 141  # the status a shell gives a tool ended by SIGPIPE (128 + 13), as `yes | head` gives `yes`


def _stdout_closed() -> bool:
    """Is stdout a pipe whose reader has gone (`blt generate ... | head -c 10` after head exits)?"""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no real file descriptor (captured in a test)
        return False


def _drop_stdout() -> None:
    """Send what stdout still holds to /dev/null, so the flush at exit does not fail again
    (the recipe of Python's signal docs, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    library_logs_to_stderr()  # stdout carries results only
    argv = list(sys.argv[1:] if argv is None else argv)
    for a in [a for a in argv if a.startswith(("--local_rank=", "--local-rank="))]:  # old-style launchers
        os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        argv.remove(a)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow the options
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            print(
                f"blt {args.command}: error: unrecognized arguments: {' '.join(extra)} "
                f"(see `blt {args.command} --help`)",
                file=sys.stderr,
            )
            return 2
        args.overrides = list(args.overrides) + extra
    from blt.errors import USER_ERRORS

    try:
        args.func(args)
        sys.stdout.flush()  # a reader gone (`| head`) shows here at the latest, not at exit
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        _drop_stdout()
        return PIPE_CLOSED
    except USER_ERRORS as e:
        place = launched()
        where = f" (rank {place.rank})" if place.world_size > 1 else ""
        say_error(f"blt {args.command}{where}: error: {e}")
        return 2
    except KeyboardInterrupt:
        print(f"blt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    """The `blt` command and `python -m blt`. A process of a multi-process job leaves with
    os._exit once its output is flushed (by then its files are closed and its checkpoints
    complete), skipping interpreter teardown: DeepSpeed keeps references to gloo process groups
    past destroy_process_group, and gloo objects freed during teardown can abort a process that
    has finished its work (pytorch/pytorch#179291)."""
    code = main()
    if launched().world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
