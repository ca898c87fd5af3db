"""Admission: which waiting jobs decode their prompts and start chains in this step.

A pure planning step: the queue (first come, first served), the ledger and the prompt cache in;
a plan out: the actions to take in order and the books as they will be after them. Nothing
here touches an engine, so every decision can be tested on its own.

The rules, and why nothing can wait forever:

* Chains start in job order: a job starts chains only when every earlier job has started all
  of its own. So the oldest job is never overtaken.
* A later job may decode its prompt early, but only into room that the earlier jobs do not
  need: every earlier job that still waits has committed its worst case (its prompt, in full,
  while it is not decoded, and up to ``max_chains`` of its chains). A prompt decoded early
  holds its slot and cells until its own chains start, so this is what keeps it from taking
  the room an earlier job is waiting for.
* A job whose prompt does not fit stops admission there (nothing behind it may take room
  first), so a large job is not starved by a stream of small ones.
* Cached prompts are dropped, oldest first, only when that makes the room asked for; the ledger
  says what dropping one really frees (running chains may still hold its cells).

Each waiting job's need only shrinks as it advances, and every running chain ends, so the
oldest job always gets its room in the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from .ledger import Holder, KvLedger
from .prompt_cache import PromptCache, cache_holder


def prompt_holder(job: int) -> tuple[str, int]:
    return ("prompt", job)


def chain_holder(job: int, number: int) -> tuple[str, int, int]:
    return ("chain", job, number)


@dataclass(frozen=True)
class Waiting:
    """What admission needs to know of a job with chains still to start."""

    key: int
    prompt: tuple[int, ...]
    slots_per_chain: int
    chain_cells: int  # worst case one chain decodes beyond the prompt
    chains: int  # chains the job runs in all
    started: int  # chains already started
    decoded: bool  # its prompt is in its slot, logits known

    @property
    def chains_left(self) -> int:
        return self.chains - self.started


@dataclass(frozen=True)
class DropCached:
    """Drop a cached prompt: empty ``slots``."""

    entry: int
    slots: list[int]


@dataclass(frozen=True)
class DecodePrompt:
    """Decode a job's prompt into ``slot``, copying its first ``shared`` positions from
    ``source_slot`` first."""

    job: int
    slot: int
    source_slot: int | None
    shared: int


@dataclass(frozen=True)
class StartChain:
    """Start chain number ``number`` of a job in ``slots`` (each copies the job's prompt)."""

    job: int
    number: int
    slots: list[int]


@dataclass(frozen=True)
class RetirePrompt:
    """Every chain of the job has started: its prompt slot joins the cache as ``entry``, or
    (None) its ``emptied`` slots are emptied."""

    job: int
    entry: int | None
    emptied: list[int]


Action = Union[DropCached, DecodePrompt, StartChain, RetirePrompt]


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    ledger: KvLedger | None = None  # the books after the actions
    cache: PromptCache | None = None


def plan_admission(waiting: Sequence[Waiting], ledger: KvLedger, cache: PromptCache, running: int,
                   max_chains: int) -> Plan:
    """The actions of this step for ``waiting`` (in arrival order), ``running`` chains running."""
    return _Planner(ledger.copy(), cache.copy(), running, max_chains).plan(waiting)


class _Planner:
    def __init__(self, ledger: KvLedger, cache: PromptCache, running: int, max_chains: int):
        self.ledger, self.cache = ledger, cache
        self.running, self.max_chains = running, max_chains
        self.actions: list[Action] = []
        self.decoding: list[tuple[int, ...]] = []  # prompts decoded in this step
        self.decoded: dict[int, tuple[int, ...]] = {}  # jobs whose prompts can be copied from

    def plan(self, waiting: Sequence[Waiting]) -> Plan:
        self.decoded = {job.key: job.prompt for job in waiting if job.decoded}
        committed_slots = committed_cells = 0
        earlier_waiting = False
        for job in waiting:
            prompt_waits = not job.decoded
            started = 0
            if not job.decoded:
                if self._prefix_arrives_next(job.prompt):
                    pass  # a prompt decoded in this step shares more with it: copy from that next step
                elif self._decode_prompt(job, committed_slots, committed_cells):
                    prompt_waits = False
                else:
                    break  # nothing behind it may take room first
            elif not earlier_waiting:
                while started < job.chains_left and self.running < self.max_chains \
                        and self._make_room(job.slots_per_chain, job.chain_cells):
                    self._start_chain(job, job.started + started)
                    started += 1
                if started == job.chains_left:
                    self._retire(job)
                    continue
            # What it still waits for is committed: nothing behind it may take that room.
            chains = min(job.chains_left - started, self.max_chains)
            committed_slots += (1 if prompt_waits else 0) + chains * job.slots_per_chain
            committed_cells += (len(job.prompt) if prompt_waits else 0) + chains * job.chain_cells
            earlier_waiting = True
        return Plan(self.actions, self.ledger, self.cache)

    # -- prompts ---------------------------------------------------------------------------

    def _decode_prompt(self, job: Waiting, committed_slots: int, committed_cells: int) -> bool:
        """Take a slot for the job's prompt, beside what earlier jobs committed and with room
        for its first chain, copying the longest prefix a slot holds. False if it does not fit."""
        shared, source = self._longest_prefix(job.prompt)
        slots = committed_slots + 1 + job.slots_per_chain
        cells = committed_cells + job.chain_cells
        pinned = source[1] if source is not None and source[0] == "cache" else None
        if not self._make_room(slots, cells + len(job.prompt) - shared, keep=pinned):
            # Its source may itself hold the room it needs: decode the prompt in full instead.
            shared, source = 0, None
            if not self._make_room(slots, cells + len(job.prompt)):
                return False
        holder = prompt_holder(job.key)
        slot = self.ledger.take_slots(holder, 1)[0]
        source_slot = None
        if shared:
            source_slot = self.ledger.slots_of(source)[0]
            if source[0] == "cache":  # type: ignore[index]
                self.cache.touch(source[1])  # type: ignore[index]
        self.ledger.add_prompt(holder, len(job.prompt), source, shared)
        self.actions.append(DecodePrompt(job.key, slot, source_slot, shared))
        self.decoding.append(job.prompt)
        return True

    def _longest_prefix(self, prompt: tuple[int, ...]) -> tuple[int, Holder | None]:
        """(tokens, holder): the longest prefix of ``prompt`` a slot holds now, among cached
        prompts and decoded prompts of waiting jobs; at least its last token is always decoded,
        since its logits start the chains."""
        sources: list[tuple[Holder, tuple[int, ...]]] = [(cache_holder(entry), tokens) for entry, tokens in self.cache]
        sources += [(prompt_holder(key), tokens) for key, tokens in self.decoded.items()]
        best, best_holder = 0, None
        for holder, tokens in sources:
            shared = min(shared_prefix(prompt, tokens), len(prompt) - 1)
            if shared > best:
                best, best_holder = shared, holder
        return best, best_holder

    def _prefix_arrives_next(self, prompt: tuple[int, ...]) -> bool:
        """Whether a prompt decoded in this step shares a longer prefix with ``prompt`` than any
        slot holds now (several requests with one prompt: decode it once)."""
        coming = min(max((shared_prefix(prompt, other) for other in self.decoding), default=0), len(prompt) - 1)
        return coming > self._longest_prefix(prompt)[0]

    def _retire(self, job: Waiting) -> None:
        """All its chains have started: keep its prompt in the cache (unless the same one is)."""
        holder = prompt_holder(job.key)
        self.decoded.pop(job.key, None)
        if self.cache.capacity == 0 or self.cache.holds(job.prompt):
            self.actions.append(RetirePrompt(job.key, None, self.ledger.release(holder)))
            return
        entry = self.cache.add(job.prompt)
        self.ledger.transfer(holder, cache_holder(entry))
        self.actions.append(RetirePrompt(job.key, entry, []))
        while self.cache.over_capacity():
            self._drop(self.cache.oldest())  # type: ignore[arg-type]

    # -- chains ----------------------------------------------------------------------------

    def _start_chain(self, job: Waiting, number: int) -> None:
        holder = chain_holder(job.key, number)
        slots = self.ledger.take_slots(holder, job.slots_per_chain)
        self.ledger.share_prompt(holder, prompt_holder(job.key))
        self.ledger.reserve(holder, job.chain_cells)
        self.actions.append(StartChain(job.key, number, slots))
        self.running += 1

    # -- room ------------------------------------------------------------------------------

    def _make_room(self, slots: int, cells: int, keep: int | None = None) -> bool:
        """Whether ``slots`` slots and ``cells`` cells are free, dropping cached prompts (oldest
        first, never ``keep``) to make them so; none is dropped when that would not be enough."""
        if self.ledger.fits(slots, cells):
            return True
        droppable = [entry for entry, _ in self.cache if entry != keep]
        trial = self.ledger.copy()
        for entry in droppable:
            trial.release(cache_holder(entry))
        if not trial.fits(slots, cells):
            return False
        for entry in droppable:
            if self.ledger.fits(slots, cells):
                break
            self._drop(entry)
        return True

    def _drop(self, entry: int) -> None:
        self.cache.remove(entry)
        self.actions.append(DropCached(entry, self.ledger.release(cache_holder(entry))))


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    shared = 0
    for mine, theirs in zip(a, b):
        if mine != theirs:
            break
        shared += 1
    return shared
