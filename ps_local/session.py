"""A loaded model ready to sample: file checks, context sizing, then the sampler."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .engine import EngineError, LlamaEngine
from .errors import UserError
from .gguf_file import check_architecture, read_metadata
from .memory import CACHE_TYPES, CachePlan, KvShape, check_cache_type, format_bytes, kv_bytes_per_cell, plan_cache
from .samplers import slots_per_chain
from .samplers.base import ProgressCallback, TokenCallback
from .scheduler import Job, JobCancelled, Scheduler, random_seed
from .settings import DEFAULT_MAX_TOKENS, Sample, SamplingSettings, check_request, default_particles

if TYPE_CHECKING:
    from .trace import TraceWriter


MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: the most sequences (slots) one context holds


@dataclass(frozen=True)
class RuntimeOptions:
    """How a model runs on this machine. None of these changes which samples a seed gives
    (on llama.cpp a different batch can still change floating-point results)."""

    threads: int | None = None  # None: all cores
    ctx: int | None = None  # per-sequence context; None: the model's trained context
    gpu_layers: int = -1  # -1: every layer when the build can offload (Metal, CUDA), else none
    chains_per_batch: int = 8  # chains that advance together in one batched decode
    round_width: int | None = None  # proposals per chain decoded together; None: batch_width // chains
    batch_width: int = 8  # sequences one decode may carry: a lone chain fills it with proposals
    cache_type: str = "f16"  # KV cache element type: f16 or q8_0

    def validate(self) -> None:
        for name, value in (("--threads", self.threads), ("--ctx", self.ctx),
                            ("--chains-per-batch", self.chains_per_batch), ("--round-width", self.round_width)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be a positive integer, got {value}")
        if self.gpu_layers < -1:
            raise UserError(f"--gpu-layers must be -1 (all layers) or a number of layers >= 0, got {self.gpu_layers}")
        if self.cache_type not in CACHE_TYPES:
            raise UserError(f"--cache-type must be one of {', '.join(CACHE_TYPES)}, got {self.cache_type!r}")


@dataclass(frozen=True)
class BatchLayout:
    """How many chains share a batch, how many proposals each decodes together, and the KV
    sequences (slots) each holds."""

    chains: int
    round_width: int  # 0 for the baselines, which propose nothing, and for SMC
    slots_per_chain: int


def fit_max_tokens(prompt_tokens: int, requested: int | None, ctx: int | None, n_ctx_train: int) -> int:
    """How many tokens may be generated; UserError when an explicit request cannot fit."""
    limit = ctx if ctx is not None else n_ctx_train
    source = "--ctx" if ctx is not None else "the model's trained context"
    if prompt_tokens >= limit:
        raise UserError(f"the prompt is {prompt_tokens} tokens and does not fit {source} of {limit} tokens")
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, limit - prompt_tokens)
    if prompt_tokens + requested > limit:
        raise UserError(
            f"--max-tokens {requested} plus the {prompt_tokens}-token prompt exceeds {source} of {limit} tokens"
        )
    return requested


class Session:
    """One GGUF model loaded through llama.cpp, reusable across prompts."""

    def __init__(self, model_path: str | os.PathLike[str], options: RuntimeOptions = RuntimeOptions()):
        path = Path(model_path)
        metadata = read_metadata(path)  # checks the file is a readable GGUF first
        options.validate()
        # Refused before llama.cpp loads it: a recurrent state cannot be branched.
        check_architecture(metadata, str(path))
        try:
            self.kv_shape: KvShape | None = KvShape.from_metadata(metadata)
        except UserError:
            self.kv_shape = None  # an architecture the estimate does not know: sizes unknown
        if self.kv_shape is not None:
            check_cache_type(self.kv_shape, options.cache_type)
        self.options = options
        try:
            self.engine = LlamaEngine(path, n_threads=options.threads, n_gpu_layers=options.gpu_layers,
                                      metadata=metadata)
        except EngineError as error:
            raise UserError(str(error)) from None
        if options.ctx is not None and options.ctx > self.engine.n_ctx_train:
            self.engine.close()
            raise UserError(f"--ctx {options.ctx} exceeds the model's trained context of {self.engine.n_ctx_train} tokens")
        self._scheduler: Scheduler | None = None
        self._fixed = False  # reserve() sized the cache: it no longer grows
        self._waiting_for_room: list[tuple[Job, CachePlan]] = []  # submitted while a smaller cache was busy
        self._step_lock = threading.RLock()

    def tokenize(self, prompt: str, special: bool = False) -> list[int]:
        return self.engine.tokenize(prompt, special=special)

    def layout(self, settings: SamplingSettings, chains: int) -> BatchLayout:
        """Chains per batch and proposals per round, within llama.cpp's sequence limit."""
        chains = min(chains, self.options.chains_per_batch)
        if settings.method == "smc":
            per_chain = slots_per_chain(settings, 0)  # one per particle (two with rejuvenation)
            return BatchLayout(max(1, min(chains, (MAX_SEQUENCES - 1) // per_chain)), 0, per_chain)
        if not settings.steps_per_block:
            return BatchLayout(min(chains, MAX_SEQUENCES - 1), 0, 1)
        # PPT: every replica is an MH chain with its own proposals.
        replicas = len(settings.power_ladder) if settings.method == "ppt" else 1
        width = self.options.round_width or max(1, self.options.batch_width // (chains * replicas))
        width = min(width, (MAX_SEQUENCES - 1) // replicas - 1)
        per_chain = slots_per_chain(settings, width)
        # Slot 0 holds the prompt; each chain takes per_chain slots.
        return BatchLayout(max(1, min(chains, (MAX_SEQUENCES - 1) // per_chain)), width, per_chain)

    def fit_particles(self, settings: SamplingSettings, max_tokens: int, most: int | None = None) -> SamplingSettings:
        """SMC's default particle count for this model's KV cells and ``max_tokens``; on a cache
        sized once (a server's, ``reserve``) no more than it holds, and no more than ``most`` (a
        server's limit). Particles asked for are kept as given."""
        bytes_per_cell = None if self.kv_shape is None else kv_bytes_per_cell(self.kv_shape, self.options.cache_type)
        fitted = default_particles(settings, max_tokens, bytes_per_cell)
        if settings.particles is not None or fitted.method != "smc":
            return fitted
        per_particle = settings.sequences_per_particle
        room = [fitted.particle_count] + ([most] if most is not None else [])
        if self._fixed and self._scheduler is not None:
            room.append((self._scheduler.slots - 1) // per_particle)  # slot 0 is the prompt's
            if self._scheduler.cells is not None:
                room.append(self._scheduler.cells // (per_particle * max(1, max_tokens)))
        return replace(fitted, particles=max(1, min(room)))

    def plan(self, prompt_tokens: list[int], settings: SamplingSettings, num_samples: int = 1) -> CachePlan:
        """The KV cache a run of these settings allocates (what --dry-run shows)."""
        return self._prepare(prompt_tokens, settings, num_samples)[2]

    def unfit_reason(self, prompt_tokens: list[int], settings: SamplingSettings) -> str | None:
        """Why a request cannot run here (a prompt too long for the context, ...), or None."""
        try:
            self._prepare(prompt_tokens, settings, 1)
        except UserError as error:
            return str(error)
        return None

    def _prepare(
        self, prompt_tokens: list[int], settings: SamplingSettings, chains: int
    ) -> tuple[SamplingSettings, BatchLayout, CachePlan]:
        """The settings with their token budget fitted to the context, the batch layout and
        the cache they need; UserError for a request that cannot run."""
        check_request(settings, chains)
        if not prompt_tokens:
            raise UserError("the prompt is empty")
        max_tokens = fit_max_tokens(len(prompt_tokens), settings.max_tokens, self.options.ctx, self.engine.n_ctx_train)
        settings = self.fit_particles(settings, max_tokens)
        layout = self.layout(settings, chains)
        # Unified cache: the prompt once, then every chain's sequence and proposals.
        plan = plan_cache(self.kv_shape, len(prompt_tokens), max_tokens, layout.chains, layout.slots_per_chain,
                          self.options.cache_type)
        return replace(settings, max_tokens=max_tokens), layout, plan

    def submit(
        self,
        prompt_tokens: list[int],
        settings: SamplingSettings,
        num_samples: int = 1,
        progress: ProgressCallback | None = None,
        on_sample: Callable[[int, Sample], None] | None = None,
        chain_indices: list[int] | None = None,
        concurrent_chains: int | None = None,
        on_token: TokenCallback | None = None,
        trace: "TraceWriter | None" = None,
        trace_info: dict | None = None,
        owns_trace: bool = False,
    ) -> Job:
        """Queue a request; it runs whenever a caller of ``run`` (or ``generate``) steps.

        ``concurrent_chains``: how many chains are expected to share the machine, which sets the
        proposals decoded per chain (default: this request's own chains). UserError for a
        request that cannot run here. ``trace``: a writer that gets the request's header (with
        ``trace_info`` added) and its sampler events; ``owns_trace``: close it when the request
        ends.
        """
        indices = list(range(num_samples)) if chain_indices is None else list(chain_indices)
        check_request(settings, max(1, len(indices)))
        settings, layout, plan = self._prepare(prompt_tokens, settings, concurrent_chains or max(1, len(indices)))
        settings = replace(settings, seed=settings.seed if settings.seed is not None else random_seed())
        job_trace = None
        if trace is not None:
            job_trace = trace.job(settings, len(prompt_tokens), indices, **(trace_info or {}))
            job_trace.owns_writer = owns_trace
        job = Job(list(prompt_tokens), settings, indices, layout.round_width, on_sample, progress, on_token, job_trace)
        with self._step_lock:
            if self._scheduler is None or (not self._waiting_for_room and self._scheduler.pending() == 0):
                self._ensure_capacity(plan)
            if self._fixed or (not self._waiting_for_room and self.scheduler.fits(job)):
                return self.scheduler.submit(job)  # UserError for a job that can never fit
            # Larger than the cache while others run: it waits until the scheduler is idle and
            # the cache grows (later requests queue behind it, so it is not overtaken for ever).
            self._waiting_for_room.append((job, plan))
            return job

    def pending(self) -> int:
        """Requests submitted and not finished (those waiting for the cache to grow included)."""
        return len(self._waiting_for_room) + (self._scheduler.pending() if self._scheduler is not None else 0)

    def _admit_waiting(self) -> None:
        """Once the scheduler is idle, grow the cache for the requests that waited for room and
        hand them to it. Called with the step lock held."""
        waiting = self._waiting_for_room
        for job, _ in waiting:
            if job.cancelled:
                job.end(JobCancelled("cancelled"))
        waiting[:] = [item for item in waiting if not item[0].done.is_set()]
        if not waiting or (self._scheduler is not None and self._scheduler.pending()):
            return
        plans = [plan for _, plan in waiting]
        grown = replace(plans[0], cells=max(plan.cells for plan in plans),
                        slots=min(MAX_SEQUENCES, max(plan.slots for plan in plans)))
        try:
            self._ensure_capacity(grown)
        except UserError as error:
            self._fail_waiting(error)
            return
        for job, _ in waiting:
            self.scheduler.submit(job)
        waiting.clear()

    def _fail_waiting(self, error: BaseException) -> None:
        for job, _ in self._waiting_for_room:
            job.end(error)
        self._waiting_for_room.clear()

    def make_room(self, prompt_tokens: int, settings: list[SamplingSettings], chains: int) -> None:
        """Grow the cache (when idle) for several prompts of ``prompt_tokens`` tokens in all and
        ``chains`` chains at once, so that they all run together, under the most demanding of
        ``settings`` (an evaluation's methods)."""
        plans = []
        for chosen in settings:
            fitted, layout, _ = self._prepare([0], chosen, chains)
            plans.append(plan_cache(self.kv_shape, prompt_tokens, fitted.token_budget, layout.chains,
                                    layout.slots_per_chain, self.options.cache_type))
        cells, slots = max(plan.cells for plan in plans), max(plan.slots for plan in plans)
        with self._step_lock:
            self._ensure_capacity(replace(plans[0], cells=cells, slots=min(MAX_SEQUENCES, slots + chains)))

    def step(self) -> bool:
        """One scheduler step under the step lock (a serving thread calls this in a loop)."""
        with self._step_lock:
            self._admit_waiting()
            return self._scheduler.step() if self._scheduler is not None else False

    def cancel_all(self, error: BaseException) -> None:
        """End every request with ``error`` (a server shutting down)."""
        with self._step_lock:
            self._fail_waiting(error)
            if self._scheduler is not None:
                self._scheduler.fail_all(error)

    def run(self, jobs: list[Job], until_any: bool = False) -> None:
        """Step the scheduler until ``jobs`` have finished (with ``until_any``: until one has).
        Several threads may call this at once: whoever holds the step lock advances everyone's
        chains."""
        settled = any if until_any else all
        while jobs and not settled(job.done.is_set() for job in jobs):
            if not self._step_lock.acquire(timeout=0.05):
                continue
            try:
                if not settled(job.done.is_set() for job in jobs):
                    self._admit_waiting()
                    self.scheduler.run_until_done(jobs, steps=1)
            except BaseException as error:  # Ctrl-C: what waits for room fails too
                self._fail_waiting(error)
                raise
            finally:
                self._step_lock.release()

    def generate(
        self,
        prompt_tokens: list[int],
        settings: SamplingSettings,
        num_samples: int = 1,
        progress: ProgressCallback | None = None,
        on_sample: Callable[[int, Sample], None] | None = None,
        chain_indices: list[int] | None = None,
    ) -> list[Sample]:
        job = self.submit(prompt_tokens, settings, num_samples, progress, on_sample, chain_indices)
        self.run([job])
        return job.result()

    def reserve(self, cells: int, slots: int) -> None:
        """Size the KV cache for at least ``cells`` cells and ``slots`` sequences now (a server
        does this once at start; later requests then wait for room instead of growing it)."""
        bytes_per_cell = None if self.kv_shape is None else kv_bytes_per_cell(self.kv_shape, self.options.cache_type)
        with self._step_lock:
            self._ensure_capacity(CachePlan(cells, min(slots, MAX_SEQUENCES), bytes_per_cell, self.options.cache_type))
            self._fixed = True

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("no KV cache yet: submit a request or reserve() first")
        return self._scheduler

    def _ensure_capacity(self, plan: CachePlan) -> None:
        """Grow the context to fit ``plan``, when nothing runs in it (growing empties the cache)."""
        current = self._scheduler
        if current is not None:
            if plan.cells <= current.cells and plan.slots <= current.slots:
                return
            if self._fixed or current.pending():
                return  # the job waits for room, or Scheduler.check_fits refuses it
            plan = replace(plan, cells=max(plan.cells, current.cells), slots=max(plan.slots, current.slots))
        try:
            self.engine.allocate(plan.cells, plan.slots, self.options.cache_type)
        except EngineError as error:
            raise UserError(f"{error} ({plan.describe()}; lower --max-tokens, --chains-per-batch or "
                            "--round-width, or use --cache-type q8_0)") from None
        self._scheduler = Scheduler(self.engine, plan.slots, self.options.chains_per_batch, plan.cells)

    def memory_summary(self) -> dict[str, object]:
        """What ``ps-local info`` shows about the KV cache: per token, and for the defaults."""
        if self.kv_shape is None:
            return {"kv_cache": "unknown for this architecture"}
        defaults = SamplingSettings()
        max_tokens = min(defaults.token_budget, self.engine.n_ctx_train - 1)
        layout = self.layout(defaults, 1)
        per_token = {kind: kv_bytes_per_cell(self.kv_shape, kind) for kind in CACHE_TYPES}
        sample = {kind: plan_cache(self.kv_shape, 0, max_tokens, layout.chains, layout.slots_per_chain, kind).bytes
                  for kind in CACHE_TYPES}
        return {
            "kv_cache_per_token": ", ".join(f"{format_bytes(size)} ({kind})" for kind, size in per_token.items()),
            "kv_cache_one_power_sample": ", ".join(f"{format_bytes(size or 0)} ({kind})" for kind, size in sample.items())
            + f" at T_max {max_tokens} with {layout.round_width} proposals per round",
            "kv_cache_bytes_per_token": per_token,
        }

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
