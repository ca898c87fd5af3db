"""Continuous batching: chains of many prompts and requests advance together in one decode.

Work arrives as jobs (a prompt, its settings, the chains to run). Each step the scheduler
admits what fits (a job's prompt is decoded into a slot of its own; its chains then copy that
prefix into their own slots), gathers every running chain's decode requests and every new
prompt into one ``engine.decode``, and hands each chain its logits rows. A chain that ends frees
its slots and KV cells at once, and the next waiting chain starts at the next decode.

Budgets: ``max_chains`` chains run at once, within the engine's slots and (where the engine has
one) a number of KV cells. The ledger (ledger.py) names the holder of every slot and cell, and
counts a cell free only when its last holder lets go; a chain reserves its worst case, so that a
running chain never finds the cache full. What starts in a step is planned by admission.py,
first come, first served, without engine calls; this module carries the plan out.

Which chains share a batch does not change any chain's samples: chain i of a job draws only
from streams keyed by (seed, i, step) (samplers.mh.Chain). On the numpy toy that is exact bit for
bit; on llama.cpp a different batch can still move float32 logits.

Pure logic over the engine protocol. One thread steps the scheduler; ``submit`` and
``Job.cancel`` may be called from any thread.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..errors import UserError
from ..protocol import DecodeRequest, Engine
from ..samplers import run_class, slots_per_chain
from ..samplers.base import ChainRun, ProgressCallback, RunSpec, TokenCallback, chain_seeds
from ..samplers.stops import StopMatcher
from ..settings import Sample, SamplingSettings
from .admission import DecodePrompt, DropCached, RetirePrompt, StartChain, Waiting, chain_holder, plan_admission, \
    prompt_holder
from .ledger import Holder, KvLedger
from .prompt_cache import PromptCache, cache_holder

if TYPE_CHECKING:
    from ..trace import JobTrace, TraceWriter

SampleCallback = Callable[[int, Sample], None]


def random_seed() -> int:
    """A fresh seed for a request that did not give one (reported in its samples' stats)."""
    return int(np.random.SeedSequence().generate_state(1)[0])


class JobCancelled(Exception):
    """The job was cancelled before all its chains ended (a client went away, a shutdown)."""


@dataclass
class Job:
    """One prompt's chains: ``chain_indices`` of the chains 0, 1, ... its seed defines.

    ``settings`` must be validated, with ``max_tokens`` fitted to the context and ``seed``
    set. ``round_width`` proposals per chain are decoded together (a speed setting only).
    Callbacks run on the scheduler's thread.
    """

    prompt: list[int]
    settings: SamplingSettings
    chain_indices: list[int]
    round_width: int = 1
    on_sample: SampleCallback | None = None
    progress: ProgressCallback | None = None
    on_token: TokenCallback | None = None  # baselines only: (chain, tokens so far) as they are drawn
    trace: "JobTrace | None" = None  # the job's sampler events (ps_local.trace); None: none
    samples: dict[int, Sample] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.settings.seed is None:
            raise ValueError("a job needs a seed")
        self.slots_per_chain = slots_per_chain(self.settings, self.round_width)
        # Worst case, as memory.plan_cache sizes it: the prompt once; every chain's sequence and
        # each proposal slot's suffix up to max_tokens (prefix copies share cells).
        self.prompt_cells = len(self.prompt)
        self.chain_cells = self.slots_per_chain * (self.settings.max_tokens or 0)

    def cancel(self) -> None:
        """Stop the job at the next step: its chains end and free their slots."""
        self._cancel.set()

    def end(self, error: BaseException | None) -> None:
        """Mark the job finished (with ``error``, or its samples), once: its trace lines reach
        their sink first (a file the job opened is closed; an error writing them becomes the
        job's, unless it already has one)."""
        if self.done.is_set():
            return
        self.error = error
        if self.trace is not None:
            try:
                self.trace.finish()
            except Exception as failure:  # a full disk
                if self.error is None:
                    self.error = failure
        self.done.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def result(self, timeout: float | None = None) -> list[Sample]:
        """Wait for every chain; the samples in ``chain_indices`` order, or the job's error."""
        if not self.done.wait(timeout):
            raise TimeoutError("the job has not finished")
        if self.error is not None:
            raise self.error
        return [self.samples[index] for index in self.chain_indices]


@dataclass(eq=False)  # compared by identity
class _Running:
    """A started chain: its generator and what it waits for."""

    job: Job
    key: int  # its job's
    index: int
    holder: Holder  # what it holds in the ledger
    run: ChainRun
    wanted: list[DecodeRequest]


@dataclass(eq=False)
class _Admission:
    """A job the scheduler has taken in: its prompt slot and how far its chains have started."""

    key: int
    job: Job
    seeds: list[int]
    stops: StopMatcher
    prompt_slot: int | None = None
    prompt_logits: np.ndarray | None = None  # its own row, copied out of the step's logits
    started: int = 0
    running: int = 0

    @property
    def all_started(self) -> bool:
        return self.started == len(self.job.chain_indices) and self.prompt_logits is not None

    def waiting(self) -> Waiting:
        job = self.job
        return Waiting(self.key, tuple(job.prompt), job.slots_per_chain, job.chain_cells, len(job.chain_indices),
                       self.started, self.prompt_logits is not None)


class Scheduler:
    """Runs jobs' chains in shared decodes within ``slots`` KV sequences, ``max_chains`` chains
    at once and (None: not counted) ``cells`` KV cells."""

    def __init__(self, engine: Engine, slots: int, max_chains: int, cells: int | None = None):
        self.engine = engine
        self.slots = slots
        self.max_chains = max_chains
        self.cells = cells
        self.ledger = KvLedger(slots, cells)  # who holds every slot and cell
        self.cache = PromptCache()  # recent prompts kept in their slots for later requests to share
        self._lock = threading.Condition()
        self._submitted: deque[Job] = deque()
        self._queue: list[_Admission] = []  # jobs with chains still to start, in arrival order
        self._jobs: dict[int, _Admission] = {}  # every unfinished job taken in, by key
        self._running: list[_Running] = []
        self._keys = itertools.count()

    # -- any thread ------------------------------------------------------------------------

    def check_fits(self, job: Job) -> None:
        """UserError for a job that could never run, even on an idle scheduler."""
        needed_slots = 1 + job.slots_per_chain
        if needed_slots > self.slots:
            raise UserError(f"one chain needs {needed_slots} sequences; the context has {self.slots}")
        if self.cells is not None and job.prompt_cells + job.chain_cells > self.cells:
            raise UserError(
                f"the {job.prompt_cells}-token prompt and one chain of up to {job.settings.max_tokens} tokens "
                f"need {job.prompt_cells + job.chain_cells:,} KV cells; the cache has {self.cells:,}"
            )

    def fits(self, job: Job) -> bool:
        try:
            self.check_fits(job)
        except UserError:
            return False
        return True

    def submit(self, job: Job) -> Job:
        self.check_fits(job)
        with self._lock:
            self._submitted.append(job)
            self._lock.notify_all()
        return job

    def pending(self) -> int:
        """Jobs submitted and not finished."""
        with self._lock:
            return len(self._submitted) + len(self._jobs)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self._submitted or self._jobs, timeout)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # -- the stepping thread ---------------------------------------------------------------

    @property
    def running_chains(self) -> int:
        return len(self._running)

    def running_jobs(self) -> set[int]:
        """Keys of the jobs with chains running now."""
        return {running.key for running in self._running}

    def run_until_done(self, jobs: Sequence[Job], steps: int | None = None) -> None:
        """Step until every one of ``jobs`` has finished (other jobs advance meanwhile), or
        for at most ``steps`` steps. An exception here (Ctrl-C) fails every job and leaves the
        scheduler empty and usable."""
        taken = 0
        try:
            while not all(job.done.is_set() for job in jobs) and (steps is None or taken < steps):
                taken += 1
                if not self.step():
                    self.wait_for_work(0.05)
        except BaseException as error:
            self.fail_all(error)
            raise

    def step(self) -> bool:
        """Admit what fits, then one decode for everything that waits on one. False when there
        was nothing to do."""
        with self._lock:
            while self._submitted:
                job = self._submitted.popleft()
                admission = _Admission(next(self._keys), job, chain_seeds(job.settings.seed, max(
                    job.chain_indices, default=-1) + 1), StopMatcher(job.settings.stop, self.engine.token_bytes))
                self._jobs[admission.key] = admission
                self._queue.append(admission)
        self._drop_cancelled()
        admitted, prefills = self._admit()
        requests: list[DecodeRequest] = [(a.prompt_slot, a.job.prompt[shared:])  # type: ignore[misc]
                                         for a, shared in prefills]
        for running in self._running:
            requests.extend(running.wanted)
        if not requests and not self._running:
            return admitted  # chains may have started and ended at once (EOS first): admit again
        try:
            # Chains that paused (samplers.mh.PAUSE_EVERY) want nothing and get empty replies.
            rows = self.engine.decode(requests) if requests else np.empty((0, 0), dtype=np.float32)
        except Exception as error:
            # The cache is in an unknown state after a failed decode: everything in it fails.
            self.fail_all(error)
            return True
        for offset, (admission, _) in enumerate(prefills):
            # A copy: a view would keep the whole step's logits alive while the job waits.
            admission.prompt_logits = rows[offset].copy()
        offset = len(prefills)
        for running in list(self._running):
            reply = rows[offset : offset + len(running.wanted)]
            offset += len(running.wanted)
            if running in self._running:  # not ended meanwhile by another chain of its job failing
                self._advance(running, reply)
        return True

    def fail_all(self, error: BaseException) -> None:
        """End every job with ``error`` and empty the engine."""
        with self._lock:
            jobs = [admission.job for admission in self._jobs.values()] + list(self._submitted)
            self._submitted.clear()
        self._queue.clear()
        self._jobs.clear()
        self.ledger = KvLedger(self.slots, self.cells)
        self.cache = PromptCache(self.cache.capacity)
        try:
            for running in self._running:
                running.run.close()
            self._running.clear()
            self.engine.reset()
        finally:  # whatever failed above (a broken engine), no job may be left waiting
            for job in jobs:
                self._finish(job, error)

    def drop_prompt_cache(self) -> None:
        """Empty the prompt cache (everything then is free while no job runs)."""
        for entry, _ in self.cache:
            self.cache.remove(entry)
            self._empty(self.ledger.release(cache_holder(entry)))

    # -- internals -------------------------------------------------------------------------

    def _admit(self) -> tuple[bool, list[tuple[_Admission, int]]]:
        """Carry out this step's admission plan: whether it did anything, and the jobs whose
        prompts join this decode, with the prompt positions copied rather than decoded."""
        if not self._queue:
            return False, []
        plan = plan_admission([admission.waiting() for admission in self._queue], self.ledger, self.cache,
                              len(self._running), self.max_chains)
        self.ledger, self.cache = plan.ledger, plan.cache  # type: ignore[assignment]
        prefills: list[tuple[_Admission, int]] = []
        started: list[_Running] = []
        for action in plan.actions:
            if isinstance(action, DropCached):
                self._empty(action.slots)
            elif isinstance(action, DecodePrompt):
                admission = self._jobs[action.job]
                admission.prompt_slot = action.slot
                source = action.slot if action.source_slot is None else action.source_slot
                self.engine.copy_prefix(source, action.slot, action.shared)  # shared 0: emptied
                prefills.append((admission, action.shared))
            elif isinstance(action, StartChain):
                started.append(self._start_chain(self._jobs[action.job], action))
            elif isinstance(action, RetirePrompt):
                admission = self._jobs[action.job]
                admission.prompt_slot = None
                self._queue.remove(admission)
                self._empty(action.emptied)
        # Chains run only once the plan is carried out: one that fails as it starts releases its
        # job's prompt, which a later action of the plan may have copied from.
        for running in started:
            if running in self._running:
                self._advance(running, None)
        for admission in list(self._jobs.values()):
            if admission.all_started and admission.running == 0:
                self._finish_job(admission)
        return bool(plan.actions), [(admission, shared) for admission, shared in prefills
                                    if admission.key in self._jobs]

    def _start_chain(self, admission: _Admission, action: StartChain) -> _Running:
        job = admission.job
        index = job.chain_indices[action.number]
        admission.started += 1
        for slot in action.slots:
            self.engine.copy_prefix(admission.prompt_slot, slot, len(job.prompt))  # type: ignore[arg-type]
        spec = RunSpec(self.engine, job.settings, job.prompt, action.slots, job.settings.seed,  # type: ignore[arg-type]
                       admission.seeds[index], admission.stops, index, job.progress, max(1, job.round_width),
                       job.on_token, job.trace)
        chain = run_class(job.settings)(spec)
        admission.running += 1
        running = _Running(job, admission.key, index, chain_holder(admission.key, action.number),
                           chain.run(admission.prompt_logits.copy()), [])  # type: ignore[union-attr]
        self._running.append(running)
        return running

    def _advance(self, running: _Running, reply: Sequence[np.ndarray] | None) -> None:
        """Send a chain its rows; keep what it wants next, or collect its sample."""
        admission = self._jobs.get(running.key)
        try:
            running.wanted = running.run.send(reply)  # type: ignore[arg-type]
            return
        except StopIteration as ended:
            self._end_chain(running)
            sample: Sample = ended.value
            running.job.samples[running.index] = sample
            try:
                if running.job.trace is not None:
                    running.job.trace.sample(running.index, sample)
                if running.job.on_sample is not None:
                    running.job.on_sample(running.index, sample)
            except Exception as error:
                self._fail_job(running.key, error)
                return
        except Exception as error:
            self._end_chain(running)
            self._fail_job(running.key, error)
            return
        if admission is not None:
            admission.running -= 1
            if admission.running == 0 and admission.all_started:
                self._finish_job(admission)

    def _end_chain(self, running: _Running) -> None:
        if running in self._running:
            self._running.remove(running)
            self._empty(self.ledger.release(running.holder))

    def _drop_cancelled(self) -> None:
        for admission in list(self._jobs.values()):
            if admission.job.cancelled:
                self._fail_job(admission.key, JobCancelled("cancelled"))

    def _fail_job(self, key: int, error: BaseException) -> None:
        """End a job early: its chains stop and free what they hold."""
        admission = self._jobs.pop(key, None)
        for running in [r for r in self._running if r.key == key]:
            running.run.close()
            self._end_chain(running)
        if admission is None:
            return
        if admission in self._queue:
            self._queue.remove(admission)
        self._empty(self.ledger.release(prompt_holder(key)))
        admission.prompt_slot = None
        self._finish(admission.job, error)

    def _finish_job(self, admission: _Admission) -> None:
        self._jobs.pop(admission.key, None)
        self._finish(admission.job, None)

    def _finish(self, job: Job, error: BaseException | None) -> None:
        job.end(error)
        with self._lock:
            self._lock.notify_all()

    def _empty(self, slots: list[int]) -> None:
        """Empty slots the ledger gave back: their cells return to the cache unless another
        sequence still holds them."""
        for slot in slots:
            self.engine.copy_prefix(slot, slot, 0)


def sample(
    engine: Engine,
    prompt: Sequence[int],
    settings: SamplingSettings,
    num_samples: int = 1,
    chains_per_batch: int = 8,
    max_round_width: int = 1,
    progress: ProgressCallback | None = None,
    on_sample: SampleCallback | None = None,
    chain_indices: Sequence[int] | None = None,
    trace: "TraceWriter | None" = None,
) -> list[Sample]:
    """Draw ``num_samples`` independent samples of one prompt on an engine of its own.

    The engine is emptied first and needs ``1 + chains * slots_per_chain(...)`` slots, chains
    being ``min(num_samples, chains_per_batch)``: one keeps the prompt while the chains start.
    Up to ``chains_per_batch`` chains run at once; when one ends the next starts.
    ``max_round_width`` proposals per chain may be decoded together (a speed setting: the
    output distribution is the same for every width). ``chain_indices`` runs only those of the
    chains 0 .. num_samples-1 (a resumed evaluation): each chain's randomness depends only on
    the seed and its index. ``trace``: a ``ps_local.trace.TraceWriter`` that gets the run's
    events (left open).
    """
    settings.validate()
    if not prompt:
        raise ValueError("the prompt is empty")
    seed = settings.seed if settings.seed is not None else random_seed()
    indices = list(range(num_samples)) if chain_indices is None else list(chain_indices)
    per_chain = slots_per_chain(settings, max_round_width)
    chains = max(1, min(len(indices), chains_per_batch))
    engine.reset()
    scheduler = Scheduler(engine, slots=1 + per_chain * chains, max_chains=chains)
    settings = replace(settings, seed=seed)
    job_trace = trace.job(settings, len(prompt), indices) if trace is not None else None
    job = scheduler.submit(Job(list(prompt), settings, indices, max_round_width, on_sample, progress,
                               trace=job_trace))
    scheduler.run_until_done([job])
    return job.result()
