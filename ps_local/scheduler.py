"""Continuous batching: chains of many prompts and requests advance together in one decode.

Work arrives as jobs (a prompt, its settings, the chains to run). Each step the scheduler
admits what fits (a job's prompt is decoded into a slot of its own; its chains then copy that
prefix into their own slots), gathers every running chain's decode requests and every new
prompt into one ``engine.decode``, and hands each chain its logits rows. A chain that ends frees
its slots and KV cells at once, and the next waiting chain starts at the next decode.

Budgets: ``max_chains`` chains run at once, within the engine's slots and (where the engine has
one) a number of KV cells, reserved per chain for its worst case so that a running chain never
finds the cache full. Jobs are admitted in the order they came (first in, first out).

Which chains share a batch does not change any chain's samples: chain i of a job draws only
from streams keyed by (seed, i, step) (samplers.mh.Chain). On the numpy toy that is exact bit for
bit; on llama.cpp a different batch can still move float32 logits.

Pure logic over the engine protocol. One thread steps the scheduler; ``submit`` and
``Job.cancel`` may be called from any thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from .errors import UserError
from .protocol import DecodeRequest, Engine
from .samplers import run_class, slots_per_chain
from .samplers.base import ChainRun, ProgressCallback, RunSpec, TokenCallback, chain_seeds
from .settings import Sample, SamplingSettings
from .samplers.stops import StopMatcher

SampleCallback = Callable[[int, Sample], None]
PROMPT_CACHE = 4  # prompts kept in their slots after their chains start, for later requests to share


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
    index: int
    slots: list[int]
    run: ChainRun
    wanted: list[DecodeRequest]


@dataclass(eq=False)
class _Admission:
    """A job the scheduler has taken in: its prompt slot and how far its chains have started."""

    job: Job
    seeds: list[int]
    stops: StopMatcher
    prompt_slot: int | None = None
    prompt_shared: int = 0  # leading prompt tokens copied from a cached prompt, not decoded
    prompt_reserved: bool = False  # its prompt's cells count against the budget until it ends
    prompt_logits: np.ndarray | None = None
    started: int = 0
    running: int = 0


class Scheduler:
    def __init__(self, engine: Engine, slots: int, max_chains: int, cells: int | None = None):
        self.engine = engine
        self.slots = slots
        self.max_chains = max_chains
        self.cells = cells  # None: the engine has no cell budget to respect (the toy)
        self._free_slots = list(range(slots - 1, -1, -1))  # popped from the end: lowest first
        self._free_cells = cells
        self._lock = threading.Condition()
        self._submitted: deque[Job] = deque()
        self._admitted: deque[_Admission] = deque()  # jobs with chains still to start
        self._jobs: dict[int, _Admission] = {}  # every unfinished job taken in, by id
        self._running: list[_Running] = []
        # Recent prompts still in their slots (LRU order): a request that shares a prefix with
        # one (the same question again, a common system prompt) copies those cells instead of
        # decoding them. Their cells stay reserved; they are dropped first when room is needed.
        self._prompt_cache: OrderedDict[int, list[int]] = OrderedDict()

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
                admission = _Admission(job, chain_seeds(job.settings.seed, max(job.chain_indices, default=-1) + 1),
                                       StopMatcher(job.settings.stop, self.engine.token_bytes))
                self._jobs[id(job)] = admission
                self._admitted.append(admission)
        self._drop_cancelled()
        prefills = self._admit()
        requests: list[DecodeRequest] = [(a.prompt_slot, a.job.prompt[a.prompt_shared :])  # type: ignore[misc]
                                         for a in prefills]
        for running in self._running:
            requests.extend(running.wanted)
        if not requests and not self._running:
            return False
        try:
            # Chains that paused (samplers.mh.PAUSE_EVERY) want nothing and get empty replies.
            rows = self.engine.decode(requests) if requests else np.empty((0, 0), dtype=np.float32)
        except Exception as error:
            # The cache is in an unknown state after a failed decode: everything in it fails.
            self.fail_all(error)
            return True
        for offset, admission in enumerate(prefills):
            admission.prompt_logits = rows[offset]
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
        for running in self._running:
            running.run.close()
        self._running.clear()
        self._admitted.clear()
        self._jobs.clear()
        self._prompt_cache.clear()
        self.engine.reset()
        self._free_slots = list(range(self.slots - 1, -1, -1))
        self._free_cells = self.cells
        for job in jobs:
            self._finish(job, error)

    # -- internals -------------------------------------------------------------------------

    def _admit(self) -> list[_Admission]:
        """Start what fits, first come first served; the jobs whose prompts join this decode.

        Chains start in job order: a job starts chains only when every earlier job has started
        all of its own. A later job's prompt may be decoded early, but only into room that the
        earlier jobs' waiting chains do not need (``committed``), so nothing it holds can keep
        an earlier job from starting.
        """
        prefills = []
        committed_cells = committed_slots = 0
        earlier_waiting = False
        for admission in list(self._admitted):
            job = admission.job
            if admission.prompt_slot is None and self._prefix_arrives_next(job.prompt, prefills):
                pass  # a prompt decoded in this step shares more with it: copy from that next step
            elif admission.prompt_slot is None:
                # Its prompt, and room for its first chain beyond what earlier jobs wait for.
                if not self._make_room(committed_slots + 1 + job.slots_per_chain,
                                       committed_cells + job.prompt_cells + job.chain_cells):
                    break
                admission.prompt_slot = self._take_slots(1)[0]
                self._reserve(job.prompt_cells)
                admission.prompt_reserved = True
                shared, source = self._longest_cached_prefix(job.prompt)
                if shared:
                    self.engine.copy_prefix(source, admission.prompt_slot, shared)
                admission.prompt_shared = shared
                prefills.append(admission)
            elif admission.prompt_logits is not None and not earlier_waiting:
                while admission.started < len(job.chain_indices) and self._room_for_chain(job):
                    self._start_chain(admission)
                    if job.done.is_set():
                        break  # a chain failed as it started: the job is gone
                if job.done.is_set():
                    continue
                if admission.started == len(job.chain_indices):
                    self._admitted.remove(admission)
                    self._keep_prompt(admission)  # the chains hold the prompt's cells too
                    admission.prompt_slot = None
                    if admission.running == 0:
                        self._finish_job(admission)
                    continue
            waiting = min(len(job.chain_indices) - admission.started, self.max_chains)
            committed_cells += waiting * job.chain_cells
            committed_slots += waiting * job.slots_per_chain
            earlier_waiting = True
        return prefills

    def _room_for_chain(self, job: Job) -> bool:
        return len(self._running) < self.max_chains and self._make_room(job.slots_per_chain, job.chain_cells)

    def _make_room(self, slots: int, cells: int) -> bool:
        """Whether ``slots`` slots and ``cells`` cells are free, dropping cached prompts
        (oldest first) to make them so."""
        while (len(self._free_slots) < slots or not self._has_cells(cells)) and self._prompt_cache:
            self._drop_cached_prompt()
        return len(self._free_slots) >= slots and self._has_cells(cells)

    def _prefix_arrives_next(self, prompt: list[int], prefills: list[_Admission]) -> bool:
        """Whether a prompt being decoded in this step shares a longer prefix with ``prompt``
        than any slot holds now (several requests with one prompt: decode it once)."""
        coming = min(max((_shared_prefix(prompt, a.job.prompt) for a in prefills), default=0), len(prompt) - 1)
        return coming > self._longest_cached_prefix(prompt, touch=False)[0]

    def _longest_cached_prefix(self, prompt: list[int], touch: bool = True) -> tuple[int, int]:
        """(tokens, slot): the longest prefix of ``prompt`` that a slot already holds, among
        cached prompts and decoded prompts of jobs still starting chains. At least the last
        prompt token is always decoded, since its logits start the chains."""
        sources = list(self._prompt_cache.items()) + [
            (a.prompt_slot, a.job.prompt) for a in self._admitted
            if a.prompt_slot is not None and a.prompt_logits is not None]
        best, best_slot = 0, -1
        for slot, tokens in sources:
            shared = min(_shared_prefix(prompt, tokens), len(prompt) - 1)
            if shared > best:
                best, best_slot = shared, slot  # type: ignore[assignment]
        if touch and best_slot in self._prompt_cache:
            self._prompt_cache.move_to_end(best_slot)
        return best, best_slot

    def _keep_prompt(self, admission: _Admission) -> None:
        """Move a job's prompt slot into the prompt cache (its cell reservation with it)."""
        slot, prompt = admission.prompt_slot, admission.job.prompt
        if PROMPT_CACHE == 0 or any(tokens == prompt for tokens in self._prompt_cache.values()):
            self._release_slots([slot])  # type: ignore[list-item]
            return
        self._prompt_cache[slot] = list(prompt)  # type: ignore[index]
        admission.prompt_reserved = False
        while len(self._prompt_cache) > PROMPT_CACHE:
            self._drop_cached_prompt()

    def _drop_cached_prompt(self) -> None:
        slot, tokens = self._prompt_cache.popitem(last=False)
        self._release_slots([slot])
        self._unreserve(len(tokens))

    def drop_prompt_cache(self) -> None:
        """Empty the prompt cache (everything then is free while no job runs)."""
        while self._prompt_cache:
            self._drop_cached_prompt()

    def _start_chain(self, admission: _Admission) -> None:
        job = admission.job
        index = job.chain_indices[admission.started]
        admission.started += 1
        slots = self._take_slots(job.slots_per_chain)
        self._reserve(job.chain_cells)
        for slot in slots:
            self.engine.copy_prefix(admission.prompt_slot, slot, len(job.prompt))  # type: ignore[arg-type]
        spec = RunSpec(self.engine, job.settings, job.prompt, slots, job.settings.seed, admission.seeds[index],  # type: ignore[arg-type]
                       admission.stops, index, job.progress, max(1, job.round_width), job.on_token)
        chain = run_class(job.settings)(spec)
        admission.running += 1
        running = _Running(job, index, slots, chain.run(admission.prompt_logits.copy()), [])  # type: ignore[union-attr]
        self._running.append(running)
        self._advance(running, None)

    def _advance(self, running: _Running, reply: Sequence[np.ndarray] | None) -> None:
        """Send a chain its rows; keep what it wants next, or collect its sample."""
        admission = self._jobs.get(id(running.job))
        try:
            running.wanted = running.run.send(reply)  # type: ignore[arg-type]
            return
        except StopIteration as ended:
            self._end_chain(running)
            sample: Sample = ended.value
            running.job.samples[running.index] = sample
            try:
                if running.job.on_sample is not None:
                    running.job.on_sample(running.index, sample)
            except Exception as error:
                self._fail_job(running.job, error)
                return
        except Exception as error:
            self._end_chain(running)
            self._fail_job(running.job, error)
            return
        if admission is not None:
            admission.running -= 1
            if admission.running == 0 and admission.started == len(running.job.chain_indices) \
                    and admission.prompt_slot is None:
                self._finish_job(admission)

    def _end_chain(self, running: _Running) -> None:
        if running in self._running:
            self._running.remove(running)
            self._release_slots(running.slots)
            self._unreserve(running.job.chain_cells)

    def _drop_cancelled(self) -> None:
        for admission in list(self._jobs.values()):
            if admission.job.cancelled:
                self._fail_job(admission.job, JobCancelled("cancelled"))

    def _fail_job(self, job: Job, error: BaseException) -> None:
        """End a job early: its chains stop and free what they hold."""
        admission = self._jobs.get(id(job))
        for running in [r for r in self._running if r.job is job]:
            running.run.close()
            self._end_chain(running)
        if admission is not None:
            if admission in self._admitted:
                self._admitted.remove(admission)
            if admission.prompt_slot is not None:
                self._release_slots([admission.prompt_slot])
                admission.prompt_slot = None
            self._unreserve_prompt(admission)
            del self._jobs[id(job)]
        self._finish(job, error)

    def _finish_job(self, admission: _Admission) -> None:
        self._unreserve_prompt(admission)
        self._jobs.pop(id(admission.job), None)
        self._finish(admission.job, None)

    def _unreserve_prompt(self, admission: _Admission) -> None:
        if admission.prompt_reserved:
            self._unreserve(admission.job.prompt_cells)
            admission.prompt_reserved = False

    def _finish(self, job: Job, error: BaseException | None) -> None:
        if not job.done.is_set():
            job.error = error
            job.done.set()
        with self._lock:
            self._lock.notify_all()

    def _take_slots(self, count: int) -> list[int]:
        taken = [self._free_slots.pop() for _ in range(count)]
        return taken

    def _release_slots(self, slots: list[int]) -> None:
        for slot in slots:
            self.engine.copy_prefix(slot, slot, 0)  # empty it: its cells go back to the cache
        self._free_slots.extend(slots)
        self._free_slots.sort(reverse=True)

    def _has_cells(self, count: int) -> bool:
        return self._free_cells is None or count <= self._free_cells

    def _reserve(self, count: int) -> None:
        if self._free_cells is not None:
            self._free_cells -= count

    def _unreserve(self, count: int) -> None:
        if self._free_cells is not None:
            self._free_cells += count


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    shared = 0
    for mine, theirs in zip(a, b):
        if mine != theirs:
            break
        shared += 1
    return shared


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
) -> list[Sample]:
    """Draw ``num_samples`` independent samples of one prompt on an engine of its own.

    The engine is emptied first and needs ``1 + chains * slots_per_chain(...)`` slots, chains
    being ``min(num_samples, chains_per_batch)``: one keeps the prompt while the chains start.
    Up to ``chains_per_batch`` chains run at once; when one ends the next starts.
    ``max_round_width`` proposals per chain may be decoded together (a speed setting: the
    output distribution is the same for every width). ``chain_indices`` runs only those of the
    chains 0 .. num_samples-1 (a resumed evaluation): each chain's randomness depends only on
    the seed and its index.
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
    job = scheduler.submit(Job(list(prompt), replace(settings, seed=seed), indices, max_round_width,
                               on_sample, progress))
    scheduler.run_until_done([job])
    return job.result()
