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
from blt.data import BUNDLED_DIR
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
from blt.model import build_model

from badinput import assert_user_error, run_blt
from conftest import CONFIGS, TINY_BLT, read_metrics, run_cli
from random_models import random_scorer

COLOURS = TASKS_DIR / "data" / "colours_train.jsonl"
FACTS = {
    json.loads(ln)["object"]: json.loads(ln)["colour"]
    for ln in (TASKS_DIR / "data" / "colours_test.jsonl").read_text().splitlines()
}


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
