"""`blt serve`: the real `openai` client and httpx against uvicorn on 127.0.0.1, every answer held
against what the generator (the code behind `blt generate`) gives for the same prompt and seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from blt.artifacts import load_model
from blt.cli import main
from blt.generation import Generator
from blt.net import free_port
from blt.serve.app import create_app
from blt.serve.batcher import Batcher
from blt.serve.protocol import CHAT_STOP, ChatMessage, Limits, render_chat

from badinput import ROOT, assert_user_error
from conftest import CONFIGS, TINY_BLT


class Served:
    """uvicorn in a thread of this process, serving `path` on 127.0.0.1."""

    def __init__(
        self,
        path: Path,
        max_batch: int = 16,
        max_queue: int = 256,
        max_tokens: int = 4096,
        api_key: str | None = None,
        kv_cache_mb: float | None = None,
        context: int | None = None,
    ):
        """kv_cache_mb: paged KV caches (--kv-cache-mb); context: another than the model's data.seq_len."""
        import uvicorn

        loaded = load_model(path)
        context = context or loaded.cfg.data.seq_len
        self.gen = Generator(loaded.model, loaded.patcher, context)
        self.batcher = Batcher(loaded.model, loaded.patcher, context, max_batch, max_queue, kv_cache_mb)
        self.batcher.start()
        app = create_app(self.batcher, "tiny", Limits(max_tokens, max_batch), api_key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def alone(self, prompt, stop=(), **kw) -> str:
        """What the generator gives for this prompt alone, as the API returns it (stop string cut)."""
        out = self.gen.generate([prompt], stop=list(stop), **kw)[0]
        for s in sorted(stop, key=len, reverse=True):
            if out.endswith(s.encode()):
                out = out[: -len(s.encode())]
                break
        return out.decode("utf-8", errors="replace")

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.batcher.stop()


@pytest.fixture(scope="module")
def model_run(tmp_path_factory, cache_dir, entropy_run) -> Path:
    """A tiny entropy-patched BLT trained 30 steps (so greedy text is not one repeated byte)."""
    run = tmp_path_factory.mktemp("serve") / "run"
    assert (
        main(
            [
                "train",
                str(CONFIGS / "tiny.yaml"),
                f"run_dir={run}",
                f"data.cache_dir={cache_dir}",
                f"patching.entropy_model={entropy_run}",
                *TINY_BLT,
                "training.steps=30",
                "optimizer.lr=3e-3",
            ]
        )
        == 0
    )
    return run


@pytest.fixture(scope="module")
def served(model_run):
    s = Served(model_run)
    yield s
    s.close()


def test_openai_client_gets_the_generators_text(served, model_run, capsys):
    client = served.client()
    for opts in (dict(temperature=0.0, seed=0), dict(temperature=0.9, top_p=0.95, seed=7)):
        want = served.alone("ROMEO.", max_bytes=60, **opts)
        got = client.completions.create(model="tiny", prompt="ROMEO.", max_tokens=60, **opts)
        assert got.choices[0].text == want and got.choices[0].finish_reason in ("length", "stop")
        raw = served.gen.generate(["ROMEO."], max_bytes=60, **opts)[0]
        assert got.usage.prompt_tokens == 6 and got.usage.completion_tokens == len(raw)
        chunks = client.completions.create(model="tiny", prompt="ROMEO.", max_tokens=60, stream=True, **opts)
        assert "".join(c.choices[0].text for c in chunks) == want
    # the same text as the command line prints for the same settings
    assert (
        main(
            [
                "generate",
                str(model_run),
                "--prompt",
                "ROMEO.",
                "--max-bytes",
                "60",
                "--temperature",
                "0.9",
                "--top-p",
                "0.95",
                "--seed",
                "7",
                "--json",
            ]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    alone = served.alone("ROMEO.", max_bytes=60, temperature=0.9, top_p=0.95, seed=7)
    assert line["text"] == alone
    # a prompt prints the same bytes alone and in a batch, cached and uncached (one loop, a seeded RNG per row)
    opts = ["--max-bytes", "60", "--temperature", "0.9", "--top-p", "0.95", "--seed", "7", "--json"]
    for cache in ([], ["--no-cache"]):
        batch = ["--prompt", "KING", "--prompt", "ROMEO.", "--prompt", "QUEEN"]
        assert main(["generate", str(model_run), *batch, *opts, *cache]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()[-3:]]
        assert [x["prompt"] for x in lines] == ["KING", "ROMEO.", "QUEEN"] and lines[1]["text"] == alone
        assert lines[0]["text"] != lines[2]["text"]
    assert client.models.list().data[0].id == "tiny"


def test_concurrent_clients_share_batched_steps(served):
    prompts = ["ROMEO.", "JULIET. O", "KING HENRY", "To be, or not", "", "What", "Enter", "Exeunt all but"]
    want = [served.alone(p, max_bytes=80, temperature=0.8, seed=i) for i, p in enumerate(prompts)]
    before = served.batcher.stats()
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        client = served.client()
        if i % 2:
            chunks = client.completions.create(
                model="tiny", prompt=prompts[i], max_tokens=80, temperature=0.8, seed=i, stream=True
            )
            got[i] = "".join(c.choices[0].text for c in chunks)
        else:
            got[i] = (
                client.completions.create(model="tiny", prompt=prompts[i], max_tokens=80, temperature=0.8, seed=i)
                .choices[0]
                .text
            )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(len(prompts))] == want  # each its single-request output
    after = served.batcher.stats()
    steps, rows = after["steps"] - before["steps"], after["row_steps"] - before["row_steps"]
    assert rows / steps > 2, (steps, rows)  # rows shared steps: 8 alone would be one row per step
    assert after["max_batch_seen"] >= 4


def test_stop_strings_n_and_odd_prompts(served):
    client = served.client()
    # a stop string ends the text and is not part of it
    stop = ["e ", "\n"]
    want = served.alone("ROMEO.", stop=stop, max_bytes=200, temperature=0.8, seed=1)
    got = client.completions.create(model="tiny", prompt="ROMEO.", max_tokens=200, temperature=0.8, seed=1, stop=stop)
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    assert "\n" not in want and "e " not in want and len(want) < 200
    streamed = client.completions.create(
        model="tiny", prompt="ROMEO.", max_tokens=200, temperature=0.8, seed=1, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == want
    # n choices: choice j samples with seed + j; several prompts keep their order
    got = client.completions.create(model="tiny", prompt=["KING", "QUEEN"], max_tokens=30, temperature=1.0, seed=5, n=3)
    assert [c.index for c in got.choices] == list(range(6))
    want = [served.alone(p, max_bytes=30, temperature=1.0, seed=5 + j) for p in ("KING", "QUEEN") for j in range(3)]
    assert [c.text for c in got.choices] == want
    # a prompt of byte values ending inside a character: the completion finishes that character
    raw = "Café".encode()[:-1]  # b"Caf\xc3"
    out = served.gen.generate([raw], max_bytes=20, temperature=0.0)[0]
    got = client.completions.create(model="tiny", prompt=list(raw), max_tokens=20, temperature=0)
    assert got.choices[0].text == (b"\xc3" + out).decode("utf-8", errors="replace")
    assert got.usage.prompt_tokens == len(raw)
    # an empty prompt starts from BOS alone
    got = client.completions.create(model="tiny", prompt="", max_tokens=20, temperature=0)
    assert got.choices[0].text == served.alone("", max_bytes=20, temperature=0.0)


def test_chat_renders_the_documented_template(served):
    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who art thou?"}]
    prompt = render_chat([ChatMessage(**m) for m in messages])
    assert prompt == "System: Speak as a king.\n\nUser: Who art thou?\n\nAssistant: "
    got = served.client().chat.completions.create(model="tiny", messages=messages, max_tokens=50, temperature=0)
    want = served.alone(prompt, stop=[CHAT_STOP], max_bytes=50, temperature=0.0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    chunks = served.client().chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=50,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens >= len(want.encode("utf-8", errors="replace")) - 3 * want.count("\ufffd")


@pytest.mark.parametrize(
    "body, field",
    [
        ('{"model": "tiny", "prompt": "x", "max_tokens": "many"}', "max_tokens"),
        ('{"model": "tiny", "prompt": "x", "max_tokens": 5000}', "max_tokens"),
        ('{"model": "tiny", "prompt": "x", "top_p": 1.5}', "top_p"),
        ('{"model": "tiny", "prompt": "x", "temperature": -1}', "temperature"),
        ('{"model": "tiny", "prompt": "x", "temperature": 1e-45}', "temperature"),  # logits / T overflow float32
        ('{"model": "tiny", "prompt": "x", "n": 0}', "n"),
        ('{"model": "tiny", "prompt": [72, 300]}', "prompt"),
        ('{"model": "tiny", "prompt": "x", "stop": [""]}', "stop"),
        ('{"model": "tiny", "prompt": "x", "logprobs": 3}', "logprobs"),
        ('{"model": "tiny", "prompt": "x", "best_off": 3}', "best_off"),
        ('{"prompt": "x"}', "model"),
        ('{"model": "tiny", "prompt": "x",}', None),
        ("[1, 2]", None),
    ],
)
def test_malformed_requests_are_400_naming_the_field(served, body, field):
    r = httpx.post(served.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error"
    if field:
        assert field in err["message"]
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"max_completion_tokens": -1}, "max_completion_tokens"),  # the field the client sent, not max_tokens
        ({"max_completion_tokens": 5000, "max_tokens": 5}, "max_completion_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
    ],
)
def test_a_chat_length_error_names_the_field_sent(served, body, field):
    r = httpx.post(
        served.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field} must be")


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        served.client().completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_disconnected_stream_frees_its_row(served):
    before = served.batcher.stats()["cancelled"]
    with httpx.stream(
        "POST",
        served.url + "/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 4000, "temperature": 0, "stream": True},
    ) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if ln.startswith("data:"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = served.batcher.stats()
        if s["running"] == 0 and s["cancelled"] > before:
            break
        time.sleep(0.05)
    assert s["running"] == 0 and s["cancelled"] == before + 1, s


def test_full_queue_is_429_and_the_key_is_401(model_run):
    s = Served(model_run, max_batch=1, max_queue=1, api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client().completions.create(model="tiny", prompt="x", max_tokens=1)
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200  # for load balancers: no key
        for path in ("/v1/completions", "/v1/chat/completions"):  # the key is checked before the body is read
            bad = httpx.post(s.url + path, content=b'{"model": ', headers={"content-type": "application/json"})
            assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error", bad.text
            keyed = httpx.post(
                s.url + path,
                content=b'{"model": ',
                headers={"authorization": "Bearer sesame", "content-type": "application/json"},
            )
            assert keyed.status_code == 400 and "not valid JSON" in keyed.json()["error"]["message"], keyed.text
        client = s.client("sesame")
        body = {"model": "tiny", "prompt": "ROMEO.", "max_tokens": 4000, "temperature": 0, "stream": True}
        head = {"authorization": "Bearer sesame"}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=head) as first:
            lines = first.iter_lines()  # held: a dropped iterator closes the stream
            next(lines)  # running: the batch (1 row) is full
            second = threading.Thread(
                target=lambda: httpx.post(s.url + "/v1/completions", json=body, headers=head, timeout=60)
            )
            second.start()  # waits in the queue (1 place)
            deadline = time.monotonic() + 10
            while s.batcher.stats()["waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert s.batcher.stats()["running"] == 1 and s.batcher.stats()["waiting"] == 1, s.batcher.stats()
            with pytest.raises(openai.RateLimitError, match="waiting"):
                client.completions.create(model="tiny", prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="queues at most 1"):  # never fits: 400, not 429
            client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=1)
        second.join(60)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason
    finally:
        s.close()


def test_the_paged_server_reports_its_pool_and_gets_its_blocks_back(model_run):
    """`blt serve --kv-cache-mb`: the startup line says how many rows the pool holds, /health shows
    its blocks, 8 concurrent clients get their single-request text (from contiguous caches), blocks
    are in use while a stream runs and all back in the pool once every request is done."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "blt", "serve", str(model_run), "--port", str(port), "--kv-cache-mb", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        loaded = load_model(model_run)
        gen = Generator(loaded.model, loaded.patcher, loaded.cfg.data.seq_len)
        prompts = ["ROMEO.", "JULIET. O", "KING HENRY", "To be, or not", "", "What", "Enter", "Exeunt all but"]
        want = [
            gen.generate([p], max_bytes=40, temperature=0.8, seed=i)[0].decode(errors="replace")
            for i, p in enumerate(prompts)
        ]
        line = ""
        while "KV cache" not in line:
            line = proc.stdout.readline().decode()
            assert line or proc.poll() is None, "the server exited"
        assert (
            "KV cache 0.5 MB, paged in blocks of 16 positions" in line and "rows at the full context (64 bytes)" in line
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                health = httpx.get(url + "/health").json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        pool = health["kv_cache"]
        assert pool["block_size"] == 16 and pool["free"] == pool["blocks"] > 0 and pool["used"] == 0
        assert set(pool["pools"]) == {"entropy_model", "encoder", "global", "decoder"}
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        name = model_run.name
        got: dict[int, str] = {}

        def ask(i: int) -> None:
            out = client.completions.create(model=name, prompt=prompts[i], max_tokens=40, temperature=0.8, seed=i)
            got[i] = out.choices[0].text

        body = {"model": name, "prompt": "x", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # held: a dropped iterator closes the stream
            assert next(ln for ln in lines if ln.startswith("data:"))
            during = httpx.get(url + "/health").json()
            assert during["kv_cache"]["used"] > 0 and during["running"] == 1, during
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert [got.get(i) for i in range(len(prompts))] == want
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the dropped stream leaves at the next step
            after = httpx.get(url + "/health").json()
            if after["running"] == 0:
                break
            time.sleep(0.05)
        assert after["running"] == after["waiting"] == 0 and after["kv_cache"]["free"] == pool["blocks"], after
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_prompt_the_paged_cache_cannot_hold_is_a_400_naming_the_limit(model_run):
    s = Served(model_run, kv_cache_mb=0.1, context=256)  # a global pool of 1 block: 16 patches, ~64 bytes
    try:
        limit = s.batcher.pools.limit
        assert 1 < limit < 256
        client = s.client()
        with pytest.raises(
            openai.BadRequestError, match=rf"--kv-cache-mb 0.1 holds prompts of at most {limit - 1} bytes"
        ):
            client.completions.create(model="tiny", prompt="x" * limit, max_tokens=5)
        r = httpx.post(
            s.url + "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "x" * limit}], "max_tokens": 5},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        fits = client.completions.create(model="tiny", prompt="x" * (limit - 1), max_tokens=5, temperature=0)
        assert fits.choices[0].finish_reason in ("length", "stop")
        assert s.batcher.stats()["kv_cache"]["used"] == 0
    finally:
        s.close()


@pytest.mark.parametrize("value", ["0", "0.001"])
def test_bad_kv_cache_budgets_are_one_line(model_run, value):
    assert_user_error(["serve", model_run, "--kv-cache-mb", value], contains="--kv-cache-mb")


def test_serve_needs_its_extra(monkeypatch, tmp_path):
    from blt.errors import UserError
    from blt.serve.server import ServeOptions, serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(UserError, match=r'uvicorn is not installed: install the .serve. extra \(pip install -e "'):
        serve(ServeOptions(str(tmp_path / "not_loaded")))  # refused before any model is looked for


@pytest.mark.parametrize(
    "args, contains",
    [
        (["--max-batch", "0"], "--max-batch"),
        (["--port", "70000"], "--port"),
        (["--drain", "nan"], "--drain"),
    ],
)
def test_bad_serve_options_are_one_line(model_run, args, contains):
    assert_user_error(["serve", model_run, *args], contains=contains)


@pytest.mark.slow
def test_cli_server_stops_cleanly_on_ctrl_c(model_run):
    """The real `blt serve` process: a client streams, Ctrl-C comes, the stream ends and the process
    exits within the drain time plus a few seconds."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "blt", "serve", str(model_run), "--port", str(port), "--drain", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": model_run.name, "prompt": "x", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(ln for ln in lines if ln.startswith("data:"))
            proc.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            rest = list(lines)  # the stream ends (cancelled after the drain) instead of hanging
        assert proc.wait(15) in (0, 130)
        assert time.monotonic() - t0 < 10
        assert any("the server stopped before this request was done" in ln for ln in rest), rest[-3:]
        out = proc.stdout.read().decode()
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_streamed_text_holds_back_only_what_may_be_a_stop_string():
    from blt.serve.text import ChoiceText

    out = ChoiceText([b"\n\n", b"END"], prompt=b"caf\xc3")
    assert out.push(b"\xa9") == "é"  # the prompt's unfinished character, finished by the completion
    assert out.push(b"\n") == ""  # may begin "\n\n"
    assert out.push(b"E") == "\n"  # it did not; "E" may begin "END"
    assert out.push(b"x\xe2\x82") == "Ex"  # half a character waits for the rest
    assert out.push(b"\xac\n") == "€"
    assert out.push(b"\n") == "" and out.finish("stop") == ""  # the stop string is never sent
    out = ChoiceText([b"\n\n"])
    assert out.push(b"a\n") == "a" and out.finish("length") == "\n"  # not a stop: the held byte is sent
    assert ChoiceText().push(b"\xff") == "\ufffd"
