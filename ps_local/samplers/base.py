"""What every sampler shares: the generator protocol a driver batches, progress reports, how a
sequence ends and the Sample it becomes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

import numpy as np

from ..protocol import DecodeRequest, Engine
from ..settings import Sample, SampleStats
from .stops import StopMatcher

# A chain yields the decode requests it needs next and receives one logits row for each.
ChainRun = Generator[list[DecodeRequest], Sequence[np.ndarray], Any]


@dataclass
class Progress:
    chain: int
    block: int
    blocks: int
    mh_step: int
    mh_steps: int
    accepted: int
    proposals: int
    tokens_decoded: int
    elapsed_s: float


ProgressCallback = Callable[[Progress], None]
TokenCallback = Callable[[int, list[int]], None]  # (chain, its tokens so far)


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


def chain_seeds(seed: int, count: int) -> list[int]:
    """Independent per-chain seeds derived from one user seed."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(count)]
