"""The OpenAI-compatible HTTP server: FastAPI routes over one loaded Model.

One worker thread steps the scheduler, so every request's chains share batched decodes
(continuous batching); request handlers only submit jobs and wait for them. A client that goes
away cancels its job; shutdown cancels what is left. Power samples cannot be streamed token by
token (a later MH step may change any earlier token): their streams carry keep-alive comments
until the chain ends, then the text.

Nothing here may block the event loop, or every client stalls with it: a handler polls its
job's ``done`` flag and never calls ``job.result()`` before it is set, and whatever takes the
session's step lock (``submit``, which the stepping thread holds for a whole decode) or
tokenizes runs in the threadpool. ``session.pending()`` is fine: the scheduler's lock is only ever held
for a moment.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..api import Model
from ..errors import PsLocalError, UserError
from ..prompts import chat_tokens
from ..samplers.base import Progress
from ..scheduler import Job, JobCancelled
from ..settings import Sample
from .api_errors import NO_CHAT_TEMPLATE, ApiError, api_wording, field_of, validation_error
from .limits import RequestLimits, check_limits, most_particles
from .middleware import ApiKeyMiddleware, JsonBodyMiddleware
from .replies import Reply, TextStream, finish_reason
from .requests import ChatCompletionRequest, CompletionRequest, Sampling, SamplingFields
from .worker import SchedulerFailed, Worker

POLL_S = 0.02  # how often a waiting handler looks at its job and its client
PROGRESS_EVERY_S = 1.0  # how often a stream carries a chain's progress (when it has moved)
CLIENT_CLOSED = 499  # the status logged for a request whose client left (nobody reads it)
T = TypeVar("T")


def create_app(model: Model, model_id: str, *, api_key: str | None = None, max_queue: int = 64,
               keepalive_s: float = 5.0, limits: RequestLimits = RequestLimits(),
               on_failure: Callable[[SchedulerFailed], None] | None = None) -> FastAPI:
    """The app for ``model``, served under the name ``model_id``. Requests beyond ``max_queue``
    unfinished jobs get 429, requests beyond ``limits`` 400; with ``api_key``, every /v1 request
    needs ``Authorization: Bearer``. ``on_failure`` hears, on the worker's thread, that the
    scheduler died (``serve`` stops the process then); the worker is ``app.state.worker``."""
    worker = Worker(model.session, on_failure)
    engine = model.session.engine
    ctx = model.session.options.ctx or engine.n_ctx_train  # tokens per request, prompt included
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)  # joins the thread, takes the step lock

    app = FastAPI(title="ps-local", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json",
                  description="Power sampling on a local GGUF model behind OpenAI's completions API. ps-local's "
                              "settings (method, alpha, block_size, mcmc_steps, ...) are extra body fields.")
    app.state.worker = worker
    app.add_middleware(JsonBodyMiddleware)
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)  # added last: runs first

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(error.errors()))  # 400 as OpenAI, not FastAPI's 422

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI's one: a body that is not even text (bad UTF-8)
            return await api_error(request, ApiError(400, "the request body is not valid JSON (nor UTF-8 text)"))
        message = "no such route" if error.status_code == 404 else str(error.detail)
        return await api_error(request, ApiError(error.status_code, f"{message}: {request.method} {request.url.path}",
                                                 code=str(error.status_code)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return await api_error(request, ApiError(500, f"internal error: {type(error).__name__}: {error}",
                                                 kind="server_error"))

    def failed() -> ApiError:
        return ApiError(503, str(worker.failure), kind="server_error", code="scheduler_failed")

    @app.get("/health", response_model=None)
    async def health() -> dict[str, Any] | JSONResponse:
        if worker.failure is not None:
            return JSONResponse({"status": "failed", "model": model_id, "reason": str(worker.failure)},
                                status_code=503)
        return {"status": "ok", "model": model_id, "jobs": model.session.pending()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "ps-local"}

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {model_id!r}", "model",
                           code="model_not_found")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        sampling = admit(body, chat=False)
        if isinstance(body.prompt, str):
            tokens = await client_errors("prompt", model.tokens, body.prompt)
        else:
            tokens = list(body.prompt)  # type: ignore[arg-type]  # token ids, as validated
            if any(not 0 <= token < engine.n_vocab for token in tokens):
                raise ApiError(400, f"token ids must be from 0 to {engine.n_vocab - 1}", "prompt")
        return await respond(request, sampling, tokens, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        sampling = admit(body, chat=True)

        def tokens() -> list[int]:
            if engine.chat_template() is None:  # said in the API's words, not the CLI's
                raise ApiError(400, NO_CHAT_TEMPLATE, "messages", code="no_chat_template")
            # The template's own markers are control tokens; a marker typed into content stays text.
            return chat_tokens(engine, body.conversation())

        return await respond(request, sampling, await client_errors("messages", tokens), chat=True)

    def admit(body: SamplingFields, chat: bool) -> Sampling:
        """The request's sampling settings, or why this server will not run it."""
        check_model(body.model)
        if worker.failure is not None:
            raise failed()
        sampling = body.sampling(chat)
        # SMC's default particle count is fitted to the model's memory and the longest answer,
        # within the server's cache and its limit on particles x max_tokens.
        tokens = min(sampling.settings.max_tokens or ctx, ctx)
        most = most_particles(sampling.settings, tokens, limits)
        sampling = replace(sampling, settings=model.session.fit_particles(sampling.settings, tokens, most))
        refusal = check_limits(sampling.settings, sampling.n, limits, ctx)
        if refusal is not None:
            raise ApiError(400, refusal.message, refusal.param, code="request_too_large")
        return sampling

    async def client_errors(param: str | None, function: Callable[..., T], *args: Any) -> T:
        """``function`` in the threadpool; a UserError (the client's mistake) is a 400 in the
        API's words."""
        try:
            return await run_in_threadpool(function, *args)
        except UserError as error:
            message = api_wording(str(error))
            raise ApiError(400, message, param or field_of(message, SamplingFields.model_fields)) from None

    async def respond(request: Request, sampling: Sampling, tokens: list[int], chat: bool) -> Any:
        if model.session.pending() >= max_queue:
            raise ApiError(429, f"the server is busy ({max_queue} requests queued); retry later",
                           kind="rate_limit_error", code="queue_full")
        events: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()
        streams: dict[int, TextStream] = {}
        holdback = max((len(stop.encode()) for stop in sampling.settings.stop), default=1) - 1

        def on_token(index: int, sofar: list[int]) -> None:  # on the worker's thread
            stream = streams.setdefault(index, TextStream(engine.token_bytes, holdback))
            delta = stream.advance(sofar, engine.is_end_of_generation)
            if delta:
                events.put((index, delta))

        feed = ProgressFeed()
        job = await client_errors(
            None, lambda: model.session.submit(tokens, sampling.settings, sampling.n,
                                               concurrent_chains=model.session.options.chains_per_batch,
                                               on_token=on_token if sampling.stream else None,
                                               progress=feed.update if sampling.stream else None))
        reply = Reply(model_id, chat, len(tokens), sampling)
        if sampling.stream:
            return EventSourceResponse(stream_events(job, events, streams, reply, feed), ping=keepalive_s,
                                       sep="\n")
        if not await settled(request, job):
            return Response(status_code=CLIENT_CLOSED)
        return reply.complete(outcome(job))

    async def settled(request: Request, job: Job) -> bool:
        """Wait for ``job`` without blocking the loop; False when the client went away first.
        Its job is then cancelled, and nothing waits for the scheduler to drop it."""
        try:
            while not job.done.is_set():
                if worker.failure is not None:
                    break  # outcome() says so
                await asyncio.sleep(POLL_S)
                if await request.is_disconnected():
                    job.cancel()
                    return False
        except asyncio.CancelledError:
            job.cancel()
            raise
        return True

    def outcome(job: Job) -> list[Sample]:
        """The samples of a settled job, or its error as an ApiError; never waits."""
        if not job.done.is_set():  # only after the worker died: nothing may ever finish the job
            job.cancel()
            raise failed()
        try:
            return job.result(timeout=0)
        except SchedulerFailed:
            raise failed() from None
        except JobCancelled as error:
            raise ApiError(503, f"the request was cancelled: {error}", kind="server_error") from None
        except UserError as error:
            raise ApiError(400, api_wording(str(error))) from None
        except Exception as error:  # noqa: BLE001 - a failed decode, a sampler's error: 500, one line
            what = str(error) if isinstance(error, PsLocalError) else f"{type(error).__name__}: {error}"
            raise ApiError(500, f"sampling failed: {what}", kind="server_error") from None

    async def stream_events(job: Job, events: queue.SimpleQueue[tuple[int, str]], streams: dict[int, TextStream],
                            reply: Reply, feed: "ProgressFeed") -> AsyncIterator[str | ServerSentEvent]:
        try:
            if reply.chat:
                for index in range(reply.parsed.n):
                    yield reply.chunk(index, {"role": "assistant", "content": ""}, None)
            while not job.done.is_set() and worker.failure is None:
                await asyncio.sleep(POLL_S)
                for status in feed.due():  # a sample of p^alpha's progress, as comments OpenAI clients skip
                    yield ServerSentEvent(comment=f"ps-local progress {json.dumps(status)}", sep="\n")
                while not events.empty():
                    index, delta = events.get()
                    yield reply.chunk(index, delta, None)
            while not events.empty():
                index, delta = events.get()
                yield reply.chunk(index, delta, None)
            try:
                samples = outcome(job)
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


class ProgressFeed:
    """The latest progress of each chain of a streamed request, for its stream to send as SSE
    comments (``: ps-local progress {...}``): the status a terminal's progress line shows
    (block, MH step, acceptances, tokens decoded, elapsed), which OpenAI clients skip as
    comments. ``update`` runs on the stepping thread; ``due`` on the event loop."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S):
        self.every_s = every_s
        self._latest: dict[int, Progress] = {}
        self._sent: dict[int, Progress] = {}
        self._last = 0.0

    def update(self, progress: Progress) -> None:
        self._latest[progress.chain] = progress  # one assignment: no lock needed under the GIL

    def due(self) -> list[dict[str, Any]]:
        """The chains' statuses that changed since the last ones sent, at most every ``every_s``."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            return []
        self._last = now
        changed = [p for chain, p in sorted(self._latest.items()) if self._sent.get(chain) is not p]
        self._sent.update((p.chain, p) for p in changed)
        return [status(p) for p in changed]


def status(p: Progress) -> dict[str, Any]:
    """One chain's progress as a stream's comment carries it (smc: per token, with its ESS)."""
    if p.method == "smc":
        return {"chain": p.chain, "method": "smc", "token": p.mh_step, "max_tokens": p.mh_steps,
                "ess": round(p.ess or 0.0, 3), "particles": p.particles, "resamples": p.resamples,
                "tokens_decoded": p.tokens_decoded, "elapsed_s": round(p.elapsed_s, 3)}
    return {"chain": p.chain, "block": p.block, "blocks": p.blocks, "mh_step": p.mh_step,
            "mh_steps": p.mh_steps, "accepted": p.accepted, "proposals": p.proposals,
            "tokens_decoded": p.tokens_decoded, "elapsed_s": round(p.elapsed_s, 3)}
