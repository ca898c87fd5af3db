"""Block-wise Metropolis-Hastings on p^alpha (Karan & Du 2025, Algorithm 1), and the baselines.

Pure logic over the engine protocol. A chain is a generator that yields decode requests
and receives logits rows, so a driver can advance many chains in one batched decode.
The math, with the fixes to the reference code, is in docs/algorithm.md of the project.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Sequence

import numpy as np

from .proposal import TokenDraw, TokenSampler
from .protocol import DecodeRequest, Engine
from .settings import Sample, SampleStats, SamplingSettings
from .stops import StopMatcher

ChainRun = Generator[DecodeRequest, np.ndarray, Sample]


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


@dataclass
class Trajectory:
    """A generated sequence held in one engine slot.

    The slot caches the prompt and the first ``cached`` generated tokens; the last sampled
    token is decoded only when the sequence grows, so a finished sequence costs nothing more.
    Running sums of log p and of the MH weights make any suffix's score O(1).
    """

    slot: int
    tokens: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    cum_logp: list[float] = field(default_factory=lambda: [0.0])
    cum_weight: list[float] = field(default_factory=lambda: [0.0])
    cached: int = 0
    end: str | None = None  # None, "eos" or "stop"

    def append(self, draw: TokenDraw) -> None:
        self.tokens.append(draw.token)
        self.logp.append(draw.logp)
        self.cum_logp.append(self.cum_logp[-1] + draw.logp)
        self.cum_weight.append(self.cum_weight[-1] + draw.log_weight)

    def prefix(self, slot: int, keep: int) -> "Trajectory":
        return Trajectory(
            slot, self.tokens[:keep], self.logp[:keep], self.cum_logp[: keep + 1], self.cum_weight[: keep + 1], keep
        )


def block_ends(max_tokens: int, block_size: int) -> list[int]:
    return [min(k * block_size, max_tokens) for k in range(1, math.ceil(max_tokens / block_size) + 1)]


class Chain:
    """One independent Markov chain (or one plain decode, for the baselines)."""

    def __init__(
        self,
        engine: Engine,
        settings: SamplingSettings,
        prompt: Sequence[int],
        slots: tuple[int, int],
        seed: int,
        chain_seed: int,
        stop_matcher: StopMatcher,
        index: int = 0,
        progress: ProgressCallback | None = None,
    ):
        self.engine = engine
        self.settings = settings
        self.prompt = list(prompt)
        self.slots = slots
        self.rng = np.random.default_rng(chain_seed)
        self.stops = stop_matcher
        self.index = index
        self.progress = progress
        self.temperature = settings.temperature
        self.token_sampler = TokenSampler(engine.n_vocab, self.temperature, settings.alpha)
        self.max_swap = math.isinf(settings.alpha)
        # log A <= bound holds while every per-token weight is <= 0: 1 <= 1/τ <= α.
        self.early_rejection = settings.early_rejection and (
            self.max_swap or 1.0 / settings.alpha <= self.temperature <= 1.0
        )
        self.stats = SampleStats(
            method=settings.method,
            alpha=settings.alpha,
            block_size=settings.effective_block_size,
            mcmc_steps=settings.steps_per_block,
            seed=seed,
            chain=index,
            prompt_tokens=len(self.prompt),
        )
        self._start = time.perf_counter()

    # -- the chain ---------------------------------------------------------------------

    def run(self, prompt_logits: np.ndarray) -> ChainRun:
        """Algorithm 1. ``prompt_logits`` predict the first generated token; both slots
        already hold the prompt."""
        settings = self.settings
        current = Trajectory(self.slots[0], cached=0)
        ends = block_ends(settings.token_budget, settings.effective_block_size)
        next_logits: np.ndarray | None = prompt_logits
        for block, limit in enumerate(ends, start=1):
            yield from self._grow(current, limit, next_logits)
            next_logits = None
            for step in range(1, settings.steps_per_block + 1):
                current = yield from self._mh_step(current, limit)
                self._report(block, len(ends), step)
            if current.end is not None:
                break
            self._report(block, len(ends), settings.steps_per_block)
        return self._finish(current)

    def _grow(
        self,
        trajectory: Trajectory,
        limit: int,
        next_logits: np.ndarray | None = None,
        keep_going: Callable[[Trajectory], bool] | None = None,
    ) -> Generator[DecodeRequest, np.ndarray, bool]:
        """Sample tokens from the proposal until ``limit`` tokens, an end, or until
        ``keep_going`` says no (then returns False)."""
        while len(trajectory.tokens) < limit and trajectory.end is None:
            if next_logits is None:
                pending = trajectory.tokens[trajectory.cached :]
                next_logits = yield (trajectory.slot, pending)
                trajectory.cached += len(pending)
                self.stats.tokens_decoded += len(pending)
            draw = self.token_sampler.draw(next_logits, self.rng)
            next_logits = None
            trajectory.append(draw)
            if self.engine.is_end_of_generation(draw.token):
                trajectory.end = "eos"
            elif self.stops.completes_stop(trajectory.tokens):
                trajectory.end = "stop"
            elif keep_going is not None and not keep_going(trajectory):
                return False
        return True

    def _mh_step(self, current: Trajectory, limit: int) -> Generator[DecodeRequest, np.ndarray, Trajectory]:
        """One Metropolis-Hastings move: resample from a uniform index, accept with min(1, A)."""
        n = len(current.tokens)
        resample_index = int(self.rng.integers(1, n + 1))  # 1-based, as in the paper
        keep = resample_index - 1
        # Drawn before the proposal so that decoding can stop once rejection is certain.
        log_u = math.log(self.rng.random() or 5e-324)
        current_score = self._suffix_score(current, keep)
        log_n = math.log(n)

        proposal = current.prefix(self.slots[1] if current.slot == self.slots[0] else self.slots[0], keep)
        # The cache keeps keys and values, not logits: re-decode the token before the
        # resample index to get the logits that predict it.
        history = self.prompt + current.tokens
        branch_position = len(self.prompt) + keep - 1
        self.engine.copy_prefix(current.slot, proposal.slot, branch_position)
        next_logits = yield (proposal.slot, [history[branch_position]])
        self.stats.tokens_decoded += 1
        self.stats.tokens_reevaluated += 1

        def may_still_accept(candidate: Trajectory) -> bool:
            score = self._suffix_score(candidate, keep)
            if self.max_swap:
                return score > current_score  # log p only falls as the proposal grows
            bound = score - current_score + self._length_term(log_n, len(candidate.tokens))
            # The slack absorbs float rounding in weights that are <= 0 only mathematically.
            return bound + 1e-9 > log_u

        keep_going = may_still_accept if self.early_rejection else None
        finished = yield from self._grow(proposal, limit, next_logits, keep_going)
        self.stats.mh_steps += 1
        self.stats.proposal_tokens += len(proposal.tokens) - keep
        if not finished:
            self.stats.early_rejections += 1
            return current
        proposal_score = self._suffix_score(proposal, keep)
        if self.max_swap:
            accept = proposal_score > current_score
        else:
            log_accept = proposal_score - current_score + self._length_term(log_n, len(proposal.tokens))
            accept = log_u < log_accept
        if accept:
            self.stats.accepted += 1
            return proposal
        return current

    def _suffix_score(self, trajectory: Trajectory, keep: int) -> float:
        sums = trajectory.cum_logp if self.max_swap else trajectory.cum_weight
        return sums[-1] - sums[keep]

    def _length_term(self, log_n: float, proposal_length: int) -> float:
        return log_n - math.log(proposal_length) if self.settings.length_term else 0.0

    # -- results -----------------------------------------------------------------------

    def _report(self, block: int, blocks: int, step: int) -> None:
        if self.progress is not None:
            self.progress(
                Progress(
                    chain=self.index,
                    block=block,
                    blocks=blocks,
                    mh_step=step,
                    mh_steps=self.settings.steps_per_block,
                    accepted=self.stats.accepted,
                    proposals=self.stats.mh_steps,
                    tokens_decoded=self.stats.tokens_decoded,
                    elapsed_s=time.perf_counter() - self._start,
                )
            )

    def _finish(self, current: Trajectory) -> Sample:
        stats = self.stats
        stats.acceptance_rate = stats.accepted / stats.mh_steps if stats.mh_steps else None
        stats.stop_reason = current.end or "length"
        stats.wall_s = time.perf_counter() - self._start
        text = b"".join(self.engine.token_bytes(t) for t in current.tokens if not self.engine.is_end_of_generation(t))
        if current.end == "stop":
            text = self.stops.cut(text)
        return Sample(
            text=text.decode("utf-8", errors="replace"),
            tokens=list(current.tokens),
            logprobs=list(current.logp),
            stats=stats,
            prompt_token_ids=list(self.prompt),
        )


def chain_seeds(seed: int, count: int) -> list[int]:
    """Independent per-chain seeds derived from one user seed."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(count)]


def sample(
    engine: Engine,
    prompt: Sequence[int],
    settings: SamplingSettings,
    num_samples: int = 1,
    chains_per_batch: int = 8,
    progress: ProgressCallback | None = None,
    on_sample: Callable[[int, Sample], None] | None = None,
) -> list[Sample]:
    """Draw ``num_samples`` independent samples; chains advance together in batches.

    The engine must have ``1 + 2 * min(num_samples, chains_per_batch)`` slots: slot 0
    keeps the prompt, each running chain owns two (current and proposal).
    """
    settings.validate()
    if not prompt:
        raise ValueError("the prompt is empty")
    seed = settings.seed if settings.seed is not None else int(np.random.SeedSequence().generate_state(1)[0])
    seeds = chain_seeds(seed, num_samples)
    stop_matcher = StopMatcher(settings.stop, engine.token_bytes)
    engine.reset()
    (prompt_logits,) = engine.decode([(0, list(prompt))])
    results: list[Sample | None] = [None] * num_samples
    for first in range(0, num_samples, chains_per_batch):
        indices = range(first, min(first + chains_per_batch, num_samples))
        runs: dict[int, ChainRun] = {}
        requests: dict[int, DecodeRequest] = {}
        for offset, index in enumerate(indices):
            slots = (1 + 2 * offset, 2 + 2 * offset)
            for slot in slots:
                engine.copy_prefix(0, slot, len(prompt))
            chain = Chain(engine, settings, prompt, slots, seed, seeds[index], stop_matcher, index, progress)
            runs[index] = chain.run(prompt_logits.copy())
        _advance(runs, requests, {index: None for index in runs}, results, on_sample)
        while requests:
            order = list(requests)
            rows = engine.decode([requests[index] for index in order])
            _advance(runs, requests, dict(zip(order, rows)), results, on_sample)
    return [r for r in results if r is not None]


def _advance(
    runs: dict[int, ChainRun],
    requests: dict[int, DecodeRequest],
    replies: dict[int, np.ndarray | None],
    results: list[Sample | None],
    on_sample: Callable[[int, Sample], None] | None,
) -> None:
    for index, reply in replies.items():
        try:
            requests[index] = runs[index].send(reply)  # type: ignore[arg-type]
        except StopIteration as done:
            requests.pop(index, None)
            results[index] = done.value
            if on_sample is not None:
                on_sample(index, done.value)
