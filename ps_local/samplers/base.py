"""What every sampler shares: the generator protocol a driver batches, progress reports, how a
sequence ends and the Sample it becomes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generator, Sequence

import numpy as np

from ..protocol import DecodeRequest, Engine
from ..settings import Sample, SampleStats, SamplingSettings
from .stops import StopMatcher

if TYPE_CHECKING:
    from ..trace import JobTrace

# A chain yields the decode requests it needs next and receives one logits row for each.
ChainRun = Generator[list[DecodeRequest], Sequence[np.ndarray], Any]


@dataclass
class Progress:
    """A chain's state after an MH round (power; the alpha replica of ppt; smc: after a token). ``tokens``: the
    chain's current sequence (a tuple, the generated tokens only) and ``logp`` its base-model
    log p, for a live view of its text; a later MH step may still change any of it."""

    chain: int
    block: int
    blocks: int
    mh_step: int
    mh_steps: int
    accepted: int
    proposals: int
    tokens_decoded: int
    elapsed_s: float
    tokens: tuple[int, ...] = ()
    logp: float | None = None
    # Power-SMC reports after each token instead: mh_step is the token, mh_steps the most tokens,
    # tokens the heaviest particle's; with its ESS, particles and resamplings so far.
    method: str = "power"
    ess: float | None = None
    particles: int | None = None
    resamples: int | None = None


ProgressCallback = Callable[[Progress], None]
TokenCallback = Callable[[int, list[int]], None]  # (chain, its tokens so far)


@dataclass(frozen=True)
class RunSpec:
    """What a driver (the scheduler) hands a sampler run: every slot in ``slots`` already holds
    the prompt. ``seed`` is the request's (reported in the stats), ``chain_seed`` this run's own
    (its random streams); ``index`` is its number among the request's samples."""

    engine: Engine
    settings: SamplingSettings
    prompt: list[int]
    slots: list[int]
    seed: int
    chain_seed: int
    stops: StopMatcher
    index: int = 0
    progress: ProgressCallback | None = None
    round_width: int = 1  # MH proposals decoded together (a speed setting only)
    on_token: TokenCallback | None = None  # plain decoding only: (index, tokens so far) as drawn
    trace: "JobTrace | None" = None  # where the run's events go (ps_local.trace); None: no events


class CacheInvariantError(RuntimeError):
    """A bug in ps-local: a slot's cache does not hold what its sequence says."""


def check_cache(engine: Engine, prompt: list[int], slot: int, tokens: list[int], cached: int) -> None:
    """The cache invariant: a slot that a sequence owns holds the prompt and the sequence's first
    ``cached`` tokens (a token decoded onto any other context gets the wrong logits, draws and
    log p). Engines that can show a slot's tokens (the numpy toy) get the tokens compared too."""
    held = engine.length(slot)
    expected = len(prompt) + cached
    if held != expected:
        raise CacheInvariantError(f"slot {slot} holds {held} positions, the sequence needs {expected}")
    slot_tokens = getattr(engine, "slot_tokens", None)
    if slot_tokens is not None and slot_tokens(slot) != (prompt + tokens)[:expected]:
        raise CacheInvariantError(f"slot {slot} holds other tokens than its sequence")


def ending(engine: Engine, stops: StopMatcher, tokens: list[int]) -> str | None:
    """How a sequence whose last token was just drawn ends: ``eos``, ``stop``, or None (it goes on)."""
    if engine.is_end_of_generation(tokens[-1]):
        return "eos"
    return "stop" if stops.completes_stop(tokens) else None


def finished_sample(engine: Engine, stops: StopMatcher, prompt: Sequence[int], tokens: list[int],
                    logprobs: list[float], end: str | None, stats: SampleStats, started: float) -> Sample:
    """The Sample of a finished sequence: its text without EOS and cut at its stop string."""
    stats.stop_reason = end or "length"
    stats.wall_s = time.perf_counter() - started
    text = b"".join(engine.token_bytes(t) for t in tokens if not engine.is_end_of_generation(t))
    if end == "stop":
        text = stops.cut(text)
    return Sample(text=text.decode("utf-8", errors="replace"), tokens=list(tokens), logprobs=list(logprobs),
                  stats=stats, prompt_token_ids=list(prompt))


def lockstep(runs: Sequence[ChainRun]) -> ChainRun:
    """Advance several runs together: each decode carries every unfinished run's requests.
    Returns the runs' results, in order."""
    results: list[Any] = [None] * len(runs)
    wanted: dict[int, list[DecodeRequest]] = {}

    def advance(number: int, reply: Sequence[np.ndarray] | None) -> None:
        try:
            wanted[number] = runs[number].send(reply)  # type: ignore[arg-type]
        except StopIteration as finished:
            wanted.pop(number, None)
            results[number] = finished.value

    try:
        for number in range(len(runs)):
            advance(number, None)
        while wanted:
            waiting = list(wanted.items())
            rows = yield [request for _, requests in waiting for request in requests]
            offset = 0
            for number, requests in waiting:
                advance(number, rows[offset : offset + len(requests)])
                offset += len(requests)
    finally:
        for run in runs:
            run.close()  # a run closed early (a cancelled job) closes the ones it drives
    return results


def chain_seeds(seed: int, count: int) -> list[int]:
    """Independent per-chain seeds derived from one user seed."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(count)]
