"""Start the server: load the model, size its KV cache once, run uvicorn until Ctrl-C / SIGTERM
(or until the scheduler fails: then ``serve`` raises, and the CLI exits 1 for a supervisor to
restart it)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import UserError
from ..memory import plan_cache
from ..session import MAX_SEQUENCES
from ..settings import DEFAULT_METHOD, DEFAULT_PARTICLES, SamplingSettings
from .limits import RequestLimits

SERVER_CTX = 4096  # per request (prompt + completion) unless --ctx says otherwise, as llama-server


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 64
    model_id: str | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)


def check_extra() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "sse_starlette"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"ps-local serve needs {', '.join(missing)}: pip install 'ps-local[server]'")


def load_for_serving(model: str, runtime: dict[str, Any]) -> Any:
    """The model, with a KV cache sized once for ``chains_per_batch`` chains of a full context,
    and for one default (smc) request over a full context."""
    from ..api import load

    loaded = load(model, **runtime)
    session = loaded.session
    if session.options.ctx is None:
        session.options = replace(session.options, ctx=min(SERVER_CTX, session.engine.n_ctx_train))
    chains, ctx = session.options.chains_per_batch, session.options.ctx
    width = session.options.round_width or max(1, session.options.batch_width // chains)
    width = min(width, (MAX_SEQUENCES - chains) // chains - 1)
    if width < 1:
        raise UserError(f"--chains-per-batch {chains} leaves no room for proposals in {MAX_SEQUENCES} sequences")
    session.options = replace(session.options, round_width=width)
    # A request's prompt and completion fit --ctx, so a chain's sequence and each of its
    # proposals hold at most ctx cells; each request's prompt takes a sequence of its own.
    plan = plan_cache(session.kv_shape, 0, ctx, chains, 1 + width, session.options.cache_type)
    plan = replace(plan, slots=min(MAX_SEQUENCES, chains + plan.slots))
    # Room too for one request of the default method, smc, with its default particles: one
    # sequence each of up to ctx cells (as many as fit SMC_KV_BUDGET over the whole context; a
    # shorter answer may have up to DEFAULT_PARTICLES of them).
    default = session.fit_particles(SamplingSettings(method=DEFAULT_METHOD), ctx)
    if default.method == "smc":
        smc = plan_cache(session.kv_shape, 0, ctx, 1, default.particle_count, session.options.cache_type)
        plan = replace(plan, cells=max(plan.cells, smc.cells),
                       slots=min(MAX_SEQUENCES, max(plan.slots, 1 + DEFAULT_PARTICLES)))
    session.reserve(plan.cells, plan.slots)
    return loaded, plan


def serve(model: str, runtime: dict[str, Any], options: ServeOptions) -> None:
    """Serve until stopped; SchedulerFailed (a PsLocalError) when the scheduler's thread died."""
    check_extra()
    import uvicorn

    from .app import create_app

    loaded, plan = load_for_serving(model, runtime)
    model_id = options.model_id or model
    app = create_app(loaded, model_id, api_key=options.api_key, max_queue=options.max_queue, limits=options.limits)
    print(f"ps-local: serving {model_id!r} on http://{options.host}:{options.port}/v1 "
          f"({loaded.session.options.chains_per_batch} chains at once, --ctx {loaded.session.options.ctx} per "
          f"request; {plan.describe()}); Ctrl-C stops", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    worker = app.state.worker
    # A dead scheduler leaves a server that can only answer 503: stop it as Ctrl-C would (running
    # requests have already failed), so that the process exits and a supervisor starts a fresh one.
    worker.on_failure = lambda failure: setattr(server, "should_exit", True)
    try:
        server.run()
    finally:
        loaded.close()
    if worker.failure is not None:
        raise worker.failure
