"""The OpenAI-compatible HTTP server: FastAPI routes over one loaded Model.

One worker thread steps the scheduler, so every request's chains share batched decodes
(continuous batching); request handlers only submit jobs and wait for them. A client that goes
away cancels its job; shutdown cancels what is left. Power samples cannot be streamed token by
token (a later MH step may change any earlier token): their streams carry keep-alive comments
until the chain ends, then the text.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import queue
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import Model
from ..errors import PsLocalError, UserError
from ..output import stats_record
from ..prompts import chat_tokens, render_messages
from ..scheduler import Job, JobCancelled
from ..settings import Sample
from .requests import ApiError, SamplingRequest, parse

POLL_S = 0.02  # how often a waiting handler looks at its job and its client


class Worker:
    """The thread that steps the scheduler while there is work."""

    def __init__(self, model: Model):
        self.session = model.session
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ps-local-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.session.step():
                self.session.scheduler.wait_for_work(0.1)

    def stop(self) -> None:
        """Cancel every job left and end the thread."""
        self._stop.set()
        self.session.scheduler.wake()
        self._thread.join(timeout=30)
        self.session.cancel_all(JobCancelled("the server is shutting down"))


class TextStream:
    """Text of a plain-decoding chain as its tokens arrive, holding back what a stop string
    may still cut and bytes of an unfinished UTF-8 character."""

    def __init__(self, token_bytes: Any, holdback: int):
        self.token_bytes = token_bytes
        self.holdback = holdback
        self.buffer = bytearray()
        self.tokens_seen = 0
        self.fed = 0
        self.text = ""  # what has been sent
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, tokens: list[int], is_end: Any) -> str:
        for token in tokens[self.tokens_seen :]:
            if not is_end(token):
                self.buffer += self.token_bytes(token)
        self.tokens_seen = len(tokens)
        safe = len(self.buffer) - self.holdback
        if safe <= self.fed:
            return ""
        delta = self.decoder.decode(bytes(self.buffer[self.fed : safe]))
        self.fed = safe
        self.text += delta
        return delta

    def finish(self, final_text: str) -> str:
        delta = final_text[len(self.text) :] if final_text.startswith(self.text) else ""
        self.text = final_text
        return delta


def create_app(model: Model, model_id: str, *, api_key: str | None = None, max_queue: int = 64,
               keepalive_s: float = 5.0) -> FastAPI:
    """The app for ``model``, served under the name ``model_id``. Requests beyond ``max_queue``
    unfinished jobs get 429; with ``api_key``, every /v1 request needs ``Authorization: Bearer``."""
    worker = Worker(model)
    engine = model.session.engine
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="ps-local", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = "no such route" if error.status_code == 404 else str(error.detail)
        return JSONResponse(ApiError(error.status_code, f"{message}: {request.method} {request.url.path}",
                                     code=str(error.status_code)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")
                            .body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", kind="authentication_error",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "jobs": model.session.scheduler.pending()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if name != model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {model_id!r}", "model",
                           code="model_not_found")
        return model_card()

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "ps-local"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorize(request)
        parsed = parse(await read_json(request), chat=False, model_id=model_id, default_method="power")
        tokens = await run_in_threadpool(model.tokens, parsed.prompt) if isinstance(parsed.prompt, str) \
            else list(parsed.prompt)  # type: ignore[arg-type]
        if any(not 0 <= token < engine.n_vocab for token in tokens):
            raise ApiError(400, f"token ids must be from 0 to {engine.n_vocab - 1}", "prompt")
        return await respond(request, parsed, tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        parsed = parse(await read_json(request), chat=True, model_id=model_id, default_method="power")
        tokens = await run_in_threadpool(lambda: chat_tokens(engine, render_messages(engine, parsed.messages)))
        return await respond(request, parsed, tokens, chat=True)

    async def read_json(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}") from None

    async def respond(request: Request, parsed: SamplingRequest, tokens: list[int], chat: bool) -> Any:
        if model.session.scheduler.pending() >= max_queue:
            raise ApiError(429, f"the server is busy ({max_queue} requests queued); retry later",
                           kind="rate_limit_error", code="queue_full")
        events: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()
        streams: dict[int, TextStream] = {}
        holdback = max((len(stop.encode()) for stop in parsed.settings.stop), default=1) - 1

        def on_token(index: int, sofar: list[int]) -> None:
            stream = streams.setdefault(index, TextStream(engine.token_bytes, holdback))
            delta = stream.advance(sofar, engine.is_end_of_generation)
            if delta:
                events.put((index, delta))

        try:
            job = await run_in_threadpool(
                model.session.submit, tokens, parsed.settings, parsed.n,
                concurrent_chains=model.session.options.chains_per_batch,
                on_token=on_token if parsed.stream else None)
        except UserError as error:
            raise ApiError(400, str(error)) from None
        reply = Reply(model_id, chat, len(tokens), parsed)
        if parsed.stream:
            return EventSourceResponse(stream_events(request, job, events, streams, reply), ping=keepalive_s,
                                       sep="\n")
        try:
            while not job.done.is_set():
                await asyncio.sleep(POLL_S)
                if await request.is_disconnected():
                    job.cancel()
                    break
        except asyncio.CancelledError:
            job.cancel()
            raise
        return reply.complete(result_of(job))

    async def stream_events(request: Request, job: Job, events: queue.SimpleQueue[tuple[int, str]],
                            streams: dict[int, TextStream], reply: "Reply") -> AsyncIterator[str]:
        try:
            if reply.chat:
                for index in range(reply.parsed.n):
                    yield reply.chunk(index, {"role": "assistant", "content": ""}, None)
            while not job.done.is_set():
                await asyncio.sleep(POLL_S)
                while not events.empty():
                    index, delta = events.get()
                    yield reply.chunk(index, delta, None)
            while not events.empty():
                index, delta = events.get()
                yield reply.chunk(index, delta, None)
            try:
                samples = result_of(job)
            except ApiError as error:  # the status line has gone: the error travels as an event
                yield json.dumps(error.body())
                return
            for index, sample in enumerate(samples):
                stream = streams.get(index) or TextStream(engine.token_bytes, 0)
                rest = stream.finish(sample.text)
                yield reply.chunk(index, rest, finish_reason(sample), sample)
            yield "[DONE]"
        finally:
            job.cancel()  # a client gone mid-stream: its chains stop (nothing if it finished)

    return app


def result_of(job: Job) -> list[Sample]:
    try:
        return job.result()
    except JobCancelled as error:
        raise ApiError(503, f"the request was cancelled: {error}", kind="server_error") from None
    except UserError as error:
        raise ApiError(400, str(error)) from None
    except PsLocalError as error:
        raise ApiError(500, str(error), kind="server_error") from None


def finish_reason(sample: Sample) -> str:
    return "length" if sample.stats.stop_reason == "length" else "stop"


class Reply:
    """OpenAI response bodies for one request."""

    def __init__(self, model_id: str, chat: bool, prompt_tokens: int, parsed: SamplingRequest):
        self.model_id, self.chat, self.prompt_tokens, self.parsed = model_id, chat, prompt_tokens, parsed
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    def stats(self, samples: list[Sample]) -> dict[str, Any]:
        return {"method": self.parsed.settings.method, "ignored": list(self.parsed.ignored),
                "samples": [stats_record(sample.stats) for sample in samples]}

    def usage(self, samples: list[Sample]) -> dict[str, int]:
        completion = sum(len(sample.tokens) for sample in samples)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def complete(self, samples: list[Sample]) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                        "logprobs": None, "finish_reason": finish_reason(s)} for i, s in enumerate(samples)]
        else:
            choices = [{"index": i, "text": s.text, "logprobs": None, "finish_reason": finish_reason(s)}
                       for i, s in enumerate(samples)]
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head(kind), "choices": choices, "usage": self.usage(samples), "ps_local": self.stats(samples)}

    def chunk(self, index: int, delta: str | dict[str, str], finish: str | None, sample: Sample | None = None) -> str:
        if self.chat:
            content = delta if isinstance(delta, dict) else {"content": delta}
            choice: dict[str, Any] = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
            body = {**self.head("chat.completion.chunk"), "choices": [choice]}
        else:
            body = {**self.head("text_completion"),
                    "choices": [{"index": index, "text": delta, "logprobs": None, "finish_reason": finish}]}
        if sample is not None:
            body["ps_local"] = self.stats([sample])
        return json.dumps(body, ensure_ascii=False)
