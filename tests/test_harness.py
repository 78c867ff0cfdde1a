"""Downstream tasks through lm-evaluation-harness (blt/harness): the scores against the model's own
full forward for every patching mode, `blt eval`'s bits per byte, batch-size invariance, a
learnable local task end to end through lm_eval.simple_evaluate (trained: above chance; random
init: at chance), generation's stop strings and byte limit, `blt lm-eval`, the in-training task
eval in metrics.jsonl and TensorBoard, and the bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from blt.artifacts import load_model
from blt.config import config_from_dict
from blt.data import BUNDLED_DIR
from blt.generation import Generator
from blt.harness.lm import BltLM
from blt.harness.run import (
    TASKS_DIR,
    TaskError,
    blt_task_names,
    check_fewshot,
    find_tasks,
    flat_metrics,
    load_tasks,
    run_tasks,
)
from blt.harness.scoring import BatchTooLargeError, Scorer, continuation_pieces
from blt.model import build_model
from blt.patching import Patcher
from blt.tokens import BOS_ID, EOS_ID, OFFSET

from badinput import assert_user_error, run_blt
from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli

COLOURS = TASKS_DIR / "data" / "colours_train.jsonl"
FACTS = {
    json.loads(ln)["object"]: json.loads(ln)["colour"]
    for ln in (TASKS_DIR / "data" / "colours_test.jsonl").read_text().splitlines()
}
# random tiny models (as tests/test_generate.py); a large init spreads the logits, so greedy choices are clear-cut
BLT = {
    "encoder": {"dim": 32, "layers": 1, "heads": 2, "window": 8},
    "global_model": {"dim": 64, "layers": 2, "heads": 2},
    "decoder": {"dim": 32, "layers": 2, "heads": 2, "window": 8},
    "cross_attn_k": 2,
    "cross_attn_heads": 2,
    "hash_ngram_sizes": [3, 4],
    "hash_buckets": 64,
    "init_std": 0.3,
}
MODES = [
    ("static", False),
    ("space", False),
    ("entropy", False),
    ("static", True),
    ("entropy", True),
    ("learned", False),
]
REQUESTS = [
    (b"The cat sat on", b" the mat"),
    (b"", b"hello"),
    (b"ab", b"c"),
    (b"x" * 70, b" y z"),
    ("caf\u00e9 ".encode(), "cr\u00e8me".encode()),
]


def random_scorer(mode: str, hf: bool = False, batch_size: int = 16, context: int = 96) -> Scorer:
    torch.manual_seed(0)
    lm = build_model(
        config_from_dict(
            {"model": {"arch": "byte_lm", "lm": {"dim": 32, "layers": 2, "heads": 2}, "init_std": 0.3}}
        ).model
    ).eval()
    cfg = config_from_dict(
        {
            "model": {**BLT, "hf_compat": hf},
            "patching": {
                "mode": mode,
                "patch_size": 3,
                "max_patch_length": 6,
                "threshold": None if mode == "learned" else 4.0,
                "split_first_byte": hf,
                "entropy_model": "unused",
            },
        }
    )
    model = build_model(cfg.model, cfg.patching).eval()
    return Scorer(model, Patcher(cfg.patching, lm if mode == "entropy" else None), context, batch_size)


def close(value: float):
    """Equal as float32 sums of the same terms in another order are (how a CPU's kernels add varies):
    1e-5 absolute, or 1e-6 relative for a log-likelihood of tens of nats."""
    return pytest.approx(value, rel=1e-6, abs=1e-5)


def full_forward(scorer: Scorer, context: bytes, continuation: bytes) -> tuple[float, bool]:
    """The reference: the whole text in one unpadded forward, its last `context` bytes if longer."""
    ids = torch.tensor([[BOS_ID] + [b + OFFSET for b in context + continuation]])[:, -scorer.context :]
    with torch.no_grad():
        logits = scorer.patcher.forward(scorer.model, ids)[0][0].float()  # (T, V)
    logp = torch.log_softmax(logits, -1)
    n, T = len(continuation), ids.shape[1]
    allowed = logits.clone()
    allowed[:, :OFFSET] = float("-inf")
    allowed[:, EOS_ID] = logits[:, EOS_ID]
    total = sum(float(logp[t - 1, ids[0, t]]) for t in range(T - n, T))
    return total, all(int(allowed[t - 1].argmax()) == int(ids[0, t]) for t in range(T - n, T))


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="session")
def colours_run(tmp_path_factory, cache_dir):
    """A tiny static-patching BLT trained 300 steps on blt_colours' facts, with the task run in
    training at steps 150 and 300 (~15 s)."""
    from blt.cli import main

    run = tmp_path_factory.mktemp("colours") / "run"
    code = main(
        [
            "train",
            str(CONFIGS / "tiny.yaml"),
            f"run_dir={run}",
            f"data.cache_dir={cache_dir}",
            "patching.mode=static",
            *TINY_BLT,
            "training.steps=300",
            f"data.train=[{COLOURS}]",
            f"data.val=[{COLOURS}]",
            "eval.tasks=[blt_colours]",
            "eval.tasks_every=150",
        ]
    )
    assert code == 0
    return run


# ----------------------------------------------------------------------------- scores


@pytest.mark.parametrize("mode,hf", MODES)
def test_loglikelihood_is_the_full_forward_sum_and_greedy_its_argmax(mode, hf):
    scorer = random_scorer(mode, hf)
    gen = Generator(scorer.model, scorer.patcher, scorer.context)
    greedy = gen.generate([b"The cat", b"ab"], max_bytes=6, temperature=0)  # continuations greedy decoding makes
    requests = REQUESTS + [(b"The cat", greedy[0]), (b"ab", greedy[1])]
    got = scorer.loglikelihood(requests)
    for (ctx, cont), (logp, is_greedy) in zip(requests, got):
        ref, ref_greedy = full_forward(scorer, ctx, cont)
        assert logp == close(ref), (ctx, cont)
        assert is_greedy == ref_greedy, (ctx, cont)
    if not hf:  # an HF-compatible byte reads the patch its next byte closes: scoring reads that next
        assert got[-2][1] and got[-1][1]  # byte's start, as training does; generation cannot, as in HF
    assert not all(g for _, g in got[: len(REQUESTS)])


@pytest.mark.parametrize("mode", ["static", "space", "entropy", "learned"])
def test_a_shared_context_is_encoded_once_with_the_full_forward_numbers(mode):
    scorer = random_scorer(mode, batch_size=2)  # 2 contexts per cached state: several states, ragged
    contexts = [b"The cat sat on", b"x" * 40, "caf\u00e9 cr".encode(), b"abcd"]
    greedy = Generator(scorer.model, scorer.patcher, scorer.context).generate(contexts, max_bytes=4, temperature=0)
    choices = [
        [b" the mat, then", b" a", "\u00e9t\u00e9".encode()],
        [b" y z", b"q", b"hello there"],
        ["\u00e8me".encode(), b"ux"],
        [b"e", b"\xe2\x82\xac"],
    ]
    requests = [(c, k) for c, ks, g in zip(contexts, choices, greedy) for k in [*ks, g]]
    requests += [(b"ab", b"c"), (b"", b"hi"), (b"ab", b"long continuation")]  # not shared: one, or too long
    got = scorer.loglikelihood(requests)
    assert scorer.shared == len(requests) - 3
    for (ctx, cont), (logp, is_greedy) in zip(requests, got):
        ref, ref_greedy = full_forward(scorer, ctx, cont)
        assert logp == close(ref), (ctx, cont)
        assert is_greedy == ref_greedy, (ctx, cont)
    assert all(hit for r, (_, hit) in zip(requests, got) if r in zip(contexts, greedy))  # greedy's continuations
    assert not all(g for _, g in got)
    off = Scorer(scorer.model, scorer.patcher, scorer.context, 2, share_context=False)
    assert off.loglikelihood(requests) == [close(v) for v in got] and off.shared == 0
    hf = random_scorer(mode if mode not in ("space", "learned") else "static", hf=True)
    assert not hf.share_context and hf.loglikelihood(requests[:3]) and hf.shared == 0  # HF-compatible: full forwards


def test_batch_size_does_not_change_the_numbers():
    one, many = random_scorer("entropy", batch_size=1), random_scorer("entropy", batch_size=16)
    docs = [b"To be, or not to be: that is the question." * 4, b"short", "\u00e9t\u00e9".encode()]
    assert [v for v, _ in one.loglikelihood(REQUESTS)] == pytest.approx(
        [v for v, _ in many.loglikelihood(REQUESTS)], abs=1e-5
    )
    assert one.rolling(docs) == pytest.approx(many.rolling(docs), abs=1e-5)
    assert one.forwards > many.forwards


def test_a_continuation_longer_than_the_context_is_scored_byte_by_byte_once():
    cont = bytes(range(40, 140))
    pieces = continuation_pieces(0, b"context", cont, width=32)
    scored = [t for p in pieces for t in p.targets if t >= 0]
    assert sorted(scored) == sorted(b + OFFSET for b in cont) and all(len(p.ids) <= 32 for p in pieces)
    value, _ = random_scorer("static", context=32).loglikelihood([(b"context", cont)])[0]
    assert math.isfinite(value) and value < 0


def test_rolling_bits_per_byte_equal_blt_eval(colours_run, tmp_path, capsys):
    text = (BUNDLED_DIR / "val" / "comedy_of_errors.txt").read_bytes()[:3000]  # 47 windows of 64 bytes
    (tmp_path / "play.txt").write_bytes(text)
    code, out, _ = run_cli(capsys, "eval", colours_run, "--data", tmp_path / "play.txt")
    assert code == 0
    lm = BltLM(pretrained=str(colours_run), batch_size=5)
    assert (
        lm.scorer.share_context and not BltLM(pretrained=str(colours_run), share_context="false").scorer.share_context
    )
    (logp,) = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text.decode(),)]))
    assert -logp / len(text) / math.log(2) == pytest.approx(json.loads(out)["bpb"], abs=1e-5)


def test_a_batch_that_does_not_fit_says_so_in_one_line():
    scorer = random_scorer("static")

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    scorer.model.forward = oom
    with pytest.raises(BatchTooLargeError, match="does not fit in cpu memory; use a smaller batch size"):
        scorer.loglikelihood(REQUESTS)


# ----------------------------------------------------------------------------- tasks end to end


def test_learnable_task_above_chance_after_training_and_at_chance_at_random_init(colours_run):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import blt.harness.lm  # noqa: F401 - registers "blt", as `python -m blt.harness` does

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model="blt", model_args=f"pretrained={colours_run}", batch_size=16, tasks=["blt_colours"], task_manager=tm
    )
    assert res["results"]["blt_colours"]["acc,none"] >= 0.8  # chance: 0.25
    loaded = load_model(colours_run)
    torch.manual_seed(0)
    fresh = build_model(loaded.cfg.model).eval()
    lm = BltLM.from_model(fresh, loaded.patcher, loaded.cfg.data.seq_len)
    acc = flat_metrics(run_tasks(lm, find_tasks(["blt_colours"])))["blt_colours/acc"]
    assert 0.1 <= acc <= 0.4


def test_generate_until_stops_at_stop_strings_and_at_the_byte_limit(colours_run):
    lm = BltLM(pretrained=str(colours_run), batch_size=2)
    colour = FACTS["apple"]
    args = [
        ("the apple is ", {"until": ["."], "max_gen_toks": 20}),  # stops before "."
        ("the apple is ", {"until": [colour[2:]]}),  # stops inside the word
        ("the apple is ", {"until": [], "max_gen_toks": 3}),  # the byte limit
        ("the zebra is ", {"until": ["\n", "."], "max_gen_toks": 20}),
    ]
    out = lm.generate_until(instances("generate_until", args))
    assert out == [colour, colour[:2], colour[:3], FACTS["zebra"]]
    lm.scorer.cached = False  # ZeRO-3's path: uncached, one forward per byte in step with the ranks
    assert lm.generate_until(instances("generate_until", args)) == out


def test_blt_lm_eval_command(colours_run, tmp_path, capsys):
    (tmp_path / "results.json").write_text("an earlier run's results")  # --output replaces the file it names
    code, out, err = run_cli(
        capsys,
        "lm-eval",
        colours_run,
        "--tasks",
        "blt_colours,blt_colours_gen",
        "--limit",
        8,
        "--batch-size",
        4,
        "--output",
        tmp_path / "results.json",
    )
    assert code == 0, err
    line = json.loads(out)
    assert line["tasks"]["blt_colours"]["acc"] >= 0.75 and line["tasks"]["blt_colours_gen"]["exact_match"] >= 0.75
    assert "blt_colours_gen" in err and "exact_match" in err  # lm-eval's table
    full = json.loads((tmp_path / "results.json").read_text())
    assert full["results"]["blt_colours"]["acc,none"] == line["tasks"]["blt_colours"]["acc"]
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # written atomically: no temporary file left


def test_a_standard_task_reads_a_local_copy_of_its_data(colours_run, tmp_path, capsys):
    """The README's worked example: lm-eval's own arc_easy, pointed at local JSON lines."""
    import lm_eval

    data = tmp_path / "arc_easy"
    data.mkdir()
    rows = [
        {
            "id": str(i),
            "question": f"What colour is the {o}?",
            "answerKey": "B",
            "choices": {"text": ["red", FACTS[o], "green", "black"], "label": ["A", "B", "C", "D"]},
        }
        for i, o in enumerate(["apple", "zebra", "harp"])
    ]
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    standard = f"{lm_eval.__path__[0]}/tasks/arc/arc_easy.yaml"
    (tasks / "arc_easy_local.yaml").write_text(
        f"include: {standard}\ntask: arc_easy_local\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n"
        f"  data_files:\n" + "".join(f"    {s}: {data}/{s}.jsonl\n" for s in ("train", "validation", "test"))
    )
    code, out, err = run_cli(capsys, "lm-eval", colours_run, "--tasks", "arc_easy_local", "--include-path", tasks)
    assert code == 0, err
    assert set(json.loads(out)["tasks"]["arc_easy_local"]) == {"acc", "acc_norm"}


def test_in_training_task_eval_is_logged_to_metrics_and_tensorboard(colours_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {m["step"]: m["eval/blt_colours/acc"] for m in read_metrics(colours_run) if "eval/blt_colours/acc" in m}
    assert sorted(logged) == [150, 300] and logged[300] >= 0.8
    (events,) = list((colours_run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("eval/blt_colours/acc")} == pytest.approx(logged)


def test_shipped_tasks_load_offline_and_their_data_is_what_make_tasks_writes():
    from blt.harness import make_tasks

    for name, rows in make_tasks.build().items():
        assert (make_tasks.DATA / name).read_text(encoding="utf-8").splitlines() == [
            json.dumps(r, ensure_ascii=False) for r in rows
        ], f"run python -m blt.harness.make_tasks ({name})"
    loaded = load_tasks(find_tasks(blt_task_names()))
    sizes = {t.task_name: len(t.eval_docs) for t in loaded}
    assert sizes == {
        "blt_colours": 40,
        "blt_colours_gen": 40,
        "blt_shakespeare_bpb": 2,
        "blt_shakespeare_next_line": 200,
        "blt_shakespeare_speaker": 200,
        "blt_shakespeare_word_order": 192,
    }


# ----------------------------------------------------------------------------- bad input


def code_tasks(where: Path) -> Path:
    """An include path whose task reads its 5 documents through `!function utils.docs` (utils.py
    says on stderr when it is imported), with its few-shot examples drawn from the test split."""
    where.mkdir()
    (where / "utils.py").write_text(
        "import sys\nprint('utils.py imported', file=sys.stderr, flush=True)\n\n\ndef docs(**metadata):\n"
        "    import datasets\n\n    rows = [{'q': f'the {o} is', 'label': i % 2} for i, o in enumerate('abcde')]\n"
        "    return datasets.DatasetDict({'test': datasets.Dataset.from_list(rows)})\n"
    )
    (where / "code_task.yaml").write_text(
        "task: code_task\ncustom_dataset: !function utils.docs\noutput_type: multiple_choice\ntest_split: test\n"
        "fewshot_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: [blue, gold]\ndoc_to_target: label\n"
    )
    return where


def test_include_path_code_is_named_before_it_is_imported(colours_run, tmp_path):
    tasks = code_tasks(tmp_path / "my_tasks")
    assert find_tasks(["blt_colours"]).code == []  # blt's own utils.py is blt's code, not an include path's
    proc = run_blt("lm-eval", colours_run, "--tasks", "code_task", "--include-path", tasks, "--limit", 1)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    notice = f"blt lm-eval: --include-path runs Python: {tasks / 'utils.py'} ("
    assert notice in err and err.index(notice) < err.index("utils.py imported"), err


def test_training_names_the_include_path_code_before_its_tasks_run(tmp_path, capsys):
    """eval.tasks_include_path is code too: the trainer names the files when it checks the tasks,
    before the first task run imports them."""
    from blt.config import load_config
    from blt.train.tasks import find_eval_tasks

    tasks = code_tasks(tmp_path / "my_tasks")
    cfg = load_config(CONFIGS / "tiny.yaml", ["eval.tasks=[code_task]", f"eval.tasks_include_path=[{tasks}]"])
    assert find_eval_tasks(cfg).code == [tasks / "utils.py"]
    err = capsys.readouterr().err
    assert f"eval: eval.tasks_include_path runs Python: {tasks / 'utils.py'} (" in err
    assert "utils.py imported" not in err


def test_num_fewshot_is_checked_against_the_examples_a_task_has(tmp_path):
    """The check's bound is lm-eval's own: the largest count it accepts runs, one more is refused."""
    tasks = find_tasks(["code_task", "blt_colours"], include_path=[code_tasks(tmp_path / "my_tasks")])
    objects = load_tasks(tasks)
    with pytest.raises(TaskError, match=r"--num-fewshot 5 asks task 'code_task' .* than it has \(4\)"):
        check_fewshot(tasks, objects[:1], 5)  # the document asked about is never its own example
    with pytest.raises(TaskError, match=r"task 'blt_colours' .* \(320\); give --num-fewshot 320 or fewer"):
        check_fewshot(tasks, objects[1:], 321)
    scorer = random_scorer("static")
    lm = BltLM.from_model(scorer.model, scorer.patcher, 96)
    results = run_tasks(lm, tasks, limit=1, num_fewshot=4, objects=objects[:1])
    assert results["n-shot"]["code_task"] == 4


def test_lm_eval_missing_names_the_extra(monkeypatch, colours_run, capsys):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    code, _, err = run_cli(capsys, "lm-eval", colours_run, "--tasks", "blt_colours")
    assert code == 2 and 'pip install -e ".[eval]"' in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_bad_inputs_are_one_line(colours_run, tmp_path):
    net = tmp_path / "net_tasks"
    net.mkdir()
    (net / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: someone/some_dataset\noutput_type: "
        "multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_choice: c\n"
        "doc_to_target: 0\n"
    )
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    rows = [
        (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
        (["--tasks", "hub_task", "--include-path", net], "needs data from the network"),
        (["--tasks", "blt_colours", "--limit", "0"], "--limit must be >= 1, got 0"),
    ]
    for extra, says in rows:
        assert_user_error(["lm-eval", colours_run, *extra], watch=[colours_run], contains=says)
    assert_user_error(["lm-eval", tmp_path / "not_a_model", "--tasks", "blt_colours"], contains="no checkpoint")


def test_bad_lm_eval_inputs_are_one_line_before_any_evaluation(colours_run, tmp_path):
    """A bad --output is refused before the model is even looked for (here: a directory holding no
    model, which would be the error otherwise), so nothing is evaluated and then lost."""
    bad = tmp_path / "bad_tasks"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken_task\ndataset_path: json\n  output_type: multiple_choice\n")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    (tmp_path / "results.json").mkdir()
    rows = [
        (["--output", tmp_path / "results.json"], f"--output '{tmp_path / 'results.json'}' is a directory"),
        (["--output", tmp_path / "nope" / "x.json"], f"the directory '{tmp_path / 'nope'}' does not exist"),
        (["--output", "/sys/x.json"], "cannot write in '/sys'"),
        (["--output", tmp_path / "not_a_model" / "notes.txt" / "x.json"], "notes.txt' is not a directory"),
    ]
    for extra, says in rows:
        assert_user_error(
            ["lm-eval", tmp_path / "not_a_model", "--tasks", "blt_colours", *extra], watch=[tmp_path], contains=says
        )
    assert_user_error(
        ["lm-eval", colours_run, "--tasks", "blt_colours", "--num-fewshot", 1000],
        watch=[colours_run],
        contains="--num-fewshot 1000 asks task 'blt_colours' for more few-shot examples than it has (320)",
    )
    assert_user_error(
        ["lm-eval", colours_run, "--tasks", "broken_task", "--include-path", bad, "--output", tmp_path / "r.json"],
        watch=[tmp_path],
        contains=f"task 'broken_task' cannot be read: '{bad / 'broken.yaml'}' line 3: ",
    )


@pytest.mark.slow
def test_tasks_during_a_zero3_job_are_shared_by_the_ranks_and_logged_once(tmp_path, cache_dir):
    """One document per task: blt_colours_gen has one request, so one rank scores nothing and steps along."""
    from test_distributed import launch

    run = tmp_path / "run"
    done = launch(
        "torchrun.sh",
        [
            f"run_dir={run}",
            f"data.cache_dir={cache_dir}",
            "patching.mode=static",
            *TINY_BLT,
            "training.batch_size=2",
            "training.steps=4",
            "model.hash_sparse_grad=false",
            "distributed.zero_stage=3",
            f"data.train=[{COLOURS}]",
            f"data.val=[{COLOURS}]",
            "eval.tasks=[blt_colours,blt_colours_gen]",
            "eval.tasks_limit=1",
            "eval.tasks_every=2",
        ],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [m for m in read_metrics(run) if any(k.startswith("eval/") for k in m)]
    assert [m["step"] for m in logged] == [2, 4]  # rank 0 only: one line per run of the tasks
    for m in logged:
        assert 0 <= m["eval/blt_colours/acc"] <= 1 and 0 <= m["eval/blt_colours_gen/exact_match"] <= 1
