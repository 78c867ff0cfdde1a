"""`blt tokenizer train`: a byte-level BPE from HF tokenizers on the inputs `blt prepare` reads,
written as a HF tokenizer directory that transformers loads; refusals leave files as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blt.subword import load_tokenizer, tokenizer_digest

from conftest import run_cli

PLAY = Path(__file__).resolve().parents[2] / "blt" / "data" / "shakespeare" / "train" / "tempest.txt"
TEXT = "Héllo wörld 🙂 ROMEO.\n\n  What, ho! \t\x00end"


def train(capsys, out: Path, *args) -> tuple[int, str, str]:
    return run_cli(capsys, "tokenizer", "train", *args, "--out", out)


def test_a_trained_tokenizer_loads_in_transformers_and_round_trips_any_text(tmp_path, capsys):
    from transformers import AutoTokenizer

    code, out, err = train(capsys, tmp_path / "tok", PLAY, "--vocab", "600")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["vocab"] == 600 and summary["bytes"] == len(PLAY.read_bytes()) and summary["bytes_per_token"] > 2
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(hf) == 600 and hf.eos_token == "<|endoftext|>"
    ids = hf(TEXT, add_special_tokens=False)["input_ids"]
    assert hf.decode(ids) == TEXT  # every byte is in the base vocabulary: nothing unknown
    assert load_tokenizer(tmp_path / "tok").encode(TEXT).ids == ids
    assert len(ids) < len(TEXT.encode())  # merges learned from the play shorten text


def test_training_is_deterministic_and_reads_json_lines(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    text = PLAY.read_text()
    docs.write_text("".join(json.dumps({"body": text[i : i + 5000]}) + "\n" for i in range(0, len(text), 5000)))
    for name in ("a", "b"):
        code, _, err = train(capsys, tmp_path / name, docs, "--vocab", "400", "--text-field", "body")
        assert code == 0, err
    a, b = load_tokenizer(tmp_path / "a"), load_tokenizer(tmp_path / "b" / "tokenizer.json")
    assert tokenizer_digest(a) == tokenizer_digest(b) and a.get_vocab_size() == 400


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vocab", "100"], "--vocab must be in [258, 2**20], got 100"),
        (["--sample-by", "word"], "--sample-by"),
        ([], "--out '{out}' already exists and is not an empty directory; pass a new path"),
    ],
)
def test_bad_input_is_one_line_and_leaves_files_alone(tmp_path, capsys, args, message):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    target = out if not args else tmp_path / "new"
    code, _, err = train(capsys, target, PLAY, *args)
    assert code == 2 and message.format(out=out) in err and len(err.strip().splitlines()) == 1
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "new").exists()


def test_a_missing_or_malformed_tokenizer_is_one_line(tmp_path):
    from blt.subword import TokenizerError

    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    for path, message in ((tmp_path / "none", "no tokenizer at"), (bad, "is not a tokenizer HF tokenizers can read")):
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(path)
        assert message in str(e.value) and "\n" not in str(e.value)
