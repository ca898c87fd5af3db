"""Power-SMC (Azizi et al. 2026): sequential Monte Carlo on p^alpha, one engine slot per particle.

N particles grow token by token from the proposal q (temperature tau over the whole vocabulary,
tau = 1/alpha by default). Each draw multiplies a particle's weight by p(y)^alpha / q(y) (at
tau = 1/alpha that is Z_t, the same for every token). Every ``check_every`` tokens, when the
effective sample size falls below ``ess_threshold * N``, the particles are resampled
systematically: dropped particles' slots take copies of the survivors (prefix copies, in place:
a survivor keeps its own slot, so no ancestor is overwritten before it is copied). EOS and stop
strings are absorbing ends. The returned sample is one particle drawn by its final weight.

Consistent as N grows (bias O(1/N)), over sequences of at most max_tokens tokens: nothing else
(top-p, minimum lengths, early stops) changes the target. The maths and the traps of the public
code are in the project's docs/samplers.md.

Like mh.Chain, a run is a generator yielding decode requests, so the scheduler batches it
with other work; it uses ``settings.particles`` slots.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..protocol import DecodeRequest, Engine
from ..settings import SampleStats, SamplingSettings
from .base import ChainRun, ProgressCallback, TokenCallback, ending, finished_sample
from .proposal import TokenSampler
from .stops import StopMatcher
from .streams import Streams

DRAW_STREAM = 2  # stream (kind, t): every particle's draw at token t, in particle order
CHOICE_STREAM = 3  # stream (kind, t): the resampling at token t; (kind, 0): the final choice


@dataclass
class Particle:
    slot: int
    tokens: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    end: str | None = None  # None, "eos" or "stop"
    logits: np.ndarray | None = None  # predicting its next token
    decoded: int = 0  # generated tokens its slot holds
    origin: int = 0  # the first-generation particle it descends from

    def copy_into(self, slot: int) -> "Particle":
        return Particle(slot, list(self.tokens), list(self.logp), self.end, self.logits, self.decoded, self.origin)


def systematic_ancestors(weights: np.ndarray, u: float) -> np.ndarray:
    """Systematic resampling: ancestor k is the first i with cumsum(W)_i > (u + k) / N."""
    count = len(weights)
    cumulative = np.cumsum(weights / weights.sum())
    cumulative[-1] = 1.0  # rounding must not push the last point past the end
    return np.searchsorted(cumulative, (u + np.arange(count)) / count, side="right")


def log_mean_exp(log_w: np.ndarray) -> float:
    """log of the mean weight: one generation's factor of the log-normalizer estimate."""
    top = float(log_w.max())
    return top + math.log(float(np.exp(log_w - top).mean()))


def effective_sample_size(log_w: np.ndarray) -> float:
    w = np.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / (w * w).sum())


class SmcRun:
    """One Power-SMC run over ``len(slots)`` particles; each slot already holds the prompt."""

    def __init__(
        self,
        engine: Engine,
        settings: SamplingSettings,
        prompt: Sequence[int],
        slots: Sequence[int],
        seed: int,
        chain_seed: int,
        stop_matcher: StopMatcher,
        index: int = 0,
        progress: ProgressCallback | None = None,
        max_round_width: int = 1,  # unused: the scheduler's chain signature
        on_token: TokenCallback | None = None,  # unused: no particle's text is final early
    ):
        self.engine = engine
        self.settings = settings
        self.prompt = list(prompt)
        self.slots = list(slots)
        self.stops = stop_matcher
        self.index = index
        self.streams = Streams(chain_seed, 2)  # generator 0 for the draws, 1 for resampling choices
        self.token_sampler = TokenSampler(engine.n_vocab, settings.temperature, settings.alpha, settings.table_size)
        self.weighted = settings.smc_weights  # False only in the negative-control test
        self.stats = SampleStats(method="smc", alpha=settings.alpha, block_size=settings.token_budget, mcmc_steps=0,
                                 seed=seed, chain=index, prompt_tokens=len(self.prompt))
        self.stats.particles = len(self.slots)
        self.stats.resamples = 0
        self._start = time.perf_counter()

    def run(self, prompt_logits: np.ndarray) -> ChainRun:
        settings = self.settings
        particles = [Particle(slot, logits=prompt_logits, origin=k) for k, slot in enumerate(self.slots)]
        log_w = np.zeros(len(particles))
        log_normalizer = 0.0
        ess_min = float(len(particles))
        for t in range(1, settings.token_budget + 1):
            rng = self.streams.start(DRAW_STREAM, t)
            for number, particle in enumerate(particles):
                if particle.end is None:
                    draw = self.token_sampler.draw(particle.logits, rng)  # type: ignore[arg-type]
                    particle.tokens.append(draw.token)
                    particle.logp.append(draw.logp)
                    if self.weighted:
                        log_w[number] += draw.log_weight  # alpha log p - log q
                    particle.end = ending(self.engine, self.stops, particle.tokens)
            running = [p for p in particles if p.end is None]
            if not running or t == settings.token_budget:
                break
            requests: list[DecodeRequest] = [(p.slot, p.tokens[p.decoded :]) for p in running]
            rows = yield requests
            for particle, row in zip(running, rows):
                self.stats.tokens_decoded += len(particle.tokens) - particle.decoded
                particle.decoded = len(particle.tokens)
                particle.logits = row
            if t % settings.smc_check_every == 0:
                ess = effective_sample_size(log_w)
                ess_min = min(ess_min, ess)
                if ess < settings.ess_threshold * len(particles):
                    log_normalizer += log_mean_exp(log_w)
                    particles = self._resample(particles, log_w, t)
                    log_w = np.zeros(len(particles))
                    self.stats.resamples += 1
        log_normalizer += log_mean_exp(log_w)
        weights = np.exp(log_w - log_w.max())
        chosen = int(self.streams.start(CHOICE_STREAM, 0, slot=1).choice(len(particles), p=weights / weights.sum()))
        self.stats.ess_min = min(ess_min, effective_sample_size(log_w))
        self.stats.distinct_ancestors = len({p.origin for p in particles})
        self.stats.log_normalizer = log_normalizer
        best = particles[chosen]
        return finished_sample(self.engine, self.stops, self.prompt, best.tokens, best.logp, best.end, self.stats,
                               self._start)

    def _resample(self, particles: list[Particle], log_w: np.ndarray, t: int) -> list[Particle]:
        """Systematic resampling in place: each survivor keeps its own slot for its first copy;
        its other copies go to the slots of dropped particles."""
        u = float(self.streams.start(CHOICE_STREAM, t, slot=1).random())
        ancestors = systematic_ancestors(np.exp(log_w - log_w.max()), u)
        copies = np.bincount(ancestors, minlength=len(particles))
        free = [number for number in range(len(particles)) if copies[number] == 0]
        resampled = list(particles)
        for number in range(len(particles)):
            for _ in range(copies[number] - 1):
                target = free.pop()
                source = particles[number]
                slot = particles[target].slot
                if source.end is None:  # an ended particle never decodes again: no cells to copy
                    self.engine.copy_prefix(source.slot, slot, len(self.prompt) + source.decoded)
                resampled[target] = source.copy_into(slot)
        return resampled

