"""The HTTP API of `blt serve`: OpenAI's completions and chat completions (streamed as server-sent
events, or whole), the model list and a health check, over one continuous `Batcher`.

    app = create_app(batcher, name="tiny", limits=Limits(max_tokens=4096, max_n=16), api_key=None)

    POST /v1/completions        prompt (a string, strings, or byte values), max_tokens (bytes), ...
    POST /v1/chat/completions   messages, rendered by protocol.render_chat
    GET  /v1/models             the one model served, named `name`
    GET  /health                {"status": "ok", ...the batcher's counters, "kv_cache": the pools (paged)}
    GET  /                      the model's name and these endpoints

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a malformed
body or a bad value (the field named) or a prompt longer than the paged KV cache holds, 401
without the bearer key when one is set (checked before the body is read), 404 for another model
name, 429 when the queue is full, 503 when the server stops before a request is done.
A client that goes away (a closed stream, a dropped connection) frees its rows at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from blt.generation.engine import Row
from blt.generation.paged import KVBudgetError
from blt.serve.batcher import Batcher, QueueFull
from blt.serve.protocol import ChatRequest, CompletionRequest, Limits, RequestError, chat_jobs, completion_jobs
from blt.serve.text import ChoiceText
from blt.tokens import BOS_ID, OFFSET

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "error"), "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's first complaint -> (one line naming the field, the field)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})", None
    field = ".".join(loc) or None
    if field is None:
        return f"the body must be a JSON object ({err.get('msg')})", None
    if err.get("type") == "extra_forbidden":
        return f"unknown field '{field}'", field
    if err.get("type") == "missing":
        return f"'{field}' is required", field
    return f"'{field}': {err.get('msg')} (got {json.dumps(err.get('input'), default=str)[:80]})", field


def create_app(batcher: Batcher, name: str, limits: Limits, api_key: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.stop()  # after uvicorn's drain: what is still running ends as cancelled

    app = FastAPI(title="blt serve", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request, exc):
        return _error(400, *_validation_message(exc))

    @app.exception_handler(RequestError)
    async def _bad_value(request, exc):
        return _error(400, str(exc), exc.param)

    @app.exception_handler(QueueFull)
    async def _full(request, exc):
        return _error(429, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        return _error(exc.status_code, str(exc.detail))

    if api_key is not None:
        app.add_middleware(_Auth, api_key=api_key)

    def check_model(model: str) -> None:
        if model != name:
            raise HTTPException(
                404, f"the model '{model}' is not served here; this server serves '{name}' (see GET /v1/models)"
            )

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **batcher.stats()}

    @app.get("/")
    async def index():  # what a browser pointed at the printed address sees
        return {
            "model": name,
            "openai_base_path": "/v1",
            "endpoints": ["POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health"],
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "blt"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        jobs = completion_jobs(req, limits)
        return await _respond(request, jobs, req, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        jobs = chat_jobs(req, limits)
        return await _respond(request, jobs, req, "chat.completion", "chatcmpl")

    outbox = _Outbox()

    async def _respond(request: Request, jobs, req, kind: str, prefix: str):
        queue: asyncio.Queue = asyncio.Queue()
        outbox.loop = asyncio.get_running_loop()

        def emitter(index: int):
            return lambda data, finish: outbox.put(queue, (index, data, finish))  # from the model thread

        if len(jobs) > batcher.max_queue:  # could never be queued: not a matter of waiting
            raise RequestError(
                f"this request asks for {len(jobs)} sequences (prompts x n); the server queues at "
                f"most {batcher.max_queue} (--max-queue)",
                "n" if req.n > 1 else "prompt",
            )
        rows = [
            Row([BOS_ID] + [b + OFFSET for b in prompt], params, emitter(i)) for i, (prompt, params) in enumerate(jobs)
        ]
        try:  # a prompt the whole KV-cache pools cannot hold would never run
            for r in rows:
                batcher.check_prompt(len(r.ids))
        except KVBudgetError as e:
            raise RequestError(str(e), "messages" if isinstance(req, ChatRequest) else "prompt") from None
        texts = [ChoiceText(params.stop, prompt) for prompt, params in jobs]
        batcher.submit(rows)
        usage = {"prompt_tokens": sum(len(p) for p, _ in jobs[:: req.n]), "completion_tokens": 0}
        meta = {"id": f"{prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": name}
        events = _events(queue, texts, rows, usage)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(events, rows, meta, kind, include_usage, usage), media_type="text/event-stream"
            )
        return await _whole(request, events, rows, meta, kind, usage)

    return app


class _Auth:
    """The bearer key checked on every /v1/ path before anything reads the body, so a request
    without the key is a 401 whatever it holds (malformed JSON included)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not (given.startswith(b"Bearer ") and secrets.compare_digest(given[7:], self.key)):
                denied = _error(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'")
                return await denied(scope, receive, send)
        await self.app(scope, receive, send)


class _Outbox:
    """Hands the model thread's reports to the event loop with one wake-up per batch of them (not
    one per row and byte), so the loop takes the GIL from the model thread as seldom as it can."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.items: list = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((queue, item))
            if len(self.items) > 1:
                return  # a delivery is already scheduled
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


async def _events(queue: asyncio.Queue, texts: list[ChoiceText], rows: list[Row], usage: dict):
    """(choice, text, finish reason) as the model thread reports bytes, until every choice ends.
    Whatever arrived while the client was being written to is merged, one item per choice."""
    left = len(rows)
    while left:
        got = [await queue.get()]
        while not queue.empty():
            got.append(queue.get_nowait())
        merged: dict[int, tuple[bytearray, str | None]] = {}
        for index, data, finish in got:
            buf, _ = merged.setdefault(index, (bytearray(), None))
            merged[index] = (bytearray(data) if finish in ("error", "cancelled") else buf + data, finish)
        for index, (data, finish) in merged.items():
            if finish in ("error", "cancelled"):
                yield index, bytes(data).decode("utf-8", errors="replace"), finish
                left -= 1
                continue
            text = texts[index].push(bytes(data))
            if finish is not None:
                text += texts[index].finish(finish)
                usage["completion_tokens"] += len(rows[index].out)
                left -= 1
            yield index, text, finish


def _totals(usage: dict) -> dict:
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


async def _whole(request: Request, events, rows: list[Row], meta: dict, kind: str, usage: dict):
    """The non-streamed answer; the client's going away (checked every second) cancels it."""
    out, finish = [[] for _ in rows], [None] * len(rows)
    it = events.__aiter__()
    try:
        while True:
            step = asyncio.ensure_future(it.__anext__())
            while not step.done():
                await asyncio.wait([step], timeout=1.0)
                if not step.done() and await request.is_disconnected():
                    step.cancel()
                    return JSONResponse({}, status_code=499)
            try:
                index, text, why = step.result()
            except StopAsyncIteration:
                break
            out[index].append(text)
            if why is not None:
                finish[index] = why
    finally:
        for r in rows:
            r.cancelled = True  # finished rows are gone already; the others leave at the next step
    for why, parts in zip(finish, out):
        if why == "cancelled":
            return _error(503, "the server stopped before this request was done")
        if why == "error":
            return _error(500, f"generation failed: {''.join(parts)}")
    if kind == "chat.completion":
        choices = [
            {"index": i, "message": {"role": "assistant", "content": "".join(p)}, "finish_reason": f, "logprobs": None}
            for i, (p, f) in enumerate(zip(out, finish))
        ]
    else:
        choices = [
            {"index": i, "text": "".join(p), "logprobs": None, "finish_reason": f}
            for i, (p, f) in enumerate(zip(out, finish))
        ]
    return {**meta, "object": kind, "choices": choices, "usage": _totals(usage)}


async def _sse(events, rows: list[Row], meta: dict, kind: str, include_usage: bool, usage: dict):
    """Server-sent events: one chunk per choice and step that has text; [DONE] at the end."""
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind

    def chunk(choices: list, **more) -> str:
        return f"data: {json.dumps({**meta, 'object': chunk_kind, 'choices': choices, **more})}\n\n"

    def choice(index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        if kind != "chat.completion":
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}

    try:
        if kind == "chat.completion":
            yield "".join(chunk([choice(i, None, None, first=True)]) for i in range(len(rows)))
        async for index, text, finish in events:
            if finish in ("error", "cancelled"):
                msg = "the server stopped before this request was done" if finish == "cancelled" else text
                yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n"
                return
            if text or finish is not None:
                yield chunk([choice(index, text, finish)])
        if include_usage:
            yield chunk([], usage=_totals(usage))
        yield "data: [DONE]\n\n"
    finally:
        for r in rows:
            r.cancelled = True  # a closed stream frees its rows at the next step
