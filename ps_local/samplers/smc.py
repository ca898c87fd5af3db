"""Power-SMC (Azizi et al. 2026): sequential Monte Carlo on p^alpha, one engine slot per particle.

N particles grow token by token from the proposal q (temperature tau over the whole vocabulary,
tau = 1/alpha by default). Each draw multiplies a particle's weight by p(y)^alpha / q(y) (at
tau = 1/alpha that is Z_t, the same for every token). Every ``check_every`` tokens, when the
effective sample size falls below ``ess_threshold * N``, the particles are resampled
systematically: dropped particles' slots take copies of the survivors (prefix copies, in place:
a survivor keeps its own slot, so no ancestor is overwritten before it is copied). EOS and stop
strings are absorbing ends. The returned sample is one particle drawn by its final weight.

Optional alpha-ramp: the intermediate targets are p^alpha_t with alpha_t rising from 1 to alpha
over the first R tokens (proposal temperature 1/alpha_t), each particle's weight taking the
factor p(x_<t)^(alpha_t - alpha_{t-1}) as the target sharpens.

Consistent as N grows (bias O(1/N)), over sequences of at most max_tokens tokens: nothing else
(top-p, minimum lengths, early stops) changes the target. The maths and the traps of the public
code are in the project's docs/samplers.md.

Two exact levers:
- Particles that hold one same sequence (copies after a resampling, and at tau = 1/4 on a peaked
  model even particles that never met, since they mostly draw the same tokens) append their next
  token through one shared batch entry: a step costs the number of distinct sequences, not N.
  They also share one softmax for their draws.
- At tau = 1/alpha_t the weight of token t, log Z_t, is known before the token is drawn: the
  particles are weighted and resampled first, so the copies of a survivor draw their own next
  tokens (a fully adapted filter) instead of all carrying the one token their ancestor drew.

Like mh.Chain, a run is a generator yielding decode requests, so the scheduler batches it with
other work; it uses ``settings.particles`` slots.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..protocol import DecodeRequest
from ..settings import SampleStats
from ..trace import finite
from .base import ChainRun, RunSpec, check_cache, ending, finished_sample
from .proposal import Prepared, TokenSampler
from .streams import Streams

DRAW_STREAM = 2  # stream (kind, t): every particle's uniform for its draw at token t, in particle order
CHOICE_STREAM = 3  # stream (kind, t): the resampling at token t; (kind, 0): the final choice
# Resampling first keeps each distinct sequence's prepared proposal until its copies have drawn;
# above this many bytes of those (many distinct sequences on a large vocabulary) they are
# prepared again instead (the same draws, twice the softmax work).
KEEP_PREPARED_BYTES = 64 << 20


@dataclass
class Particle:
    slot: int
    tokens: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    end: str | None = None  # None, "eos" or "stop"
    logits: np.ndarray | None = None  # predicting its next token; one array for particles that share it
    decoded: int = 0  # generated tokens its slot holds
    origin: int = 0  # the first-generation particle it descends from
    key: int = 0  # particles with equal keys hold the same sequence
    total_logp: float = 0.0  # log p of its tokens so far

    def copy_into(self, slot: int) -> "Particle":
        return Particle(slot, list(self.tokens), list(self.logp), self.end, self.logits, self.decoded, self.origin,
                        self.key, self.total_logp)


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


def groups(particles: Sequence[Particle], by: str) -> list[list[int]]:
    """Numbers of the running particles, grouped by one attribute: ``key`` (the same sequence)
    or ``logits`` (the very same row object)."""
    found: dict[int, list[int]] = defaultdict(list)
    for number, particle in enumerate(particles):
        if particle.end is None:
            found[particle.key if by == "key" else id(particle.logits)].append(number)
    return list(found.values())


class SmcRun:
    """One Power-SMC run over ``len(slots)`` particles; each slot already holds the prompt."""

    def __init__(self, spec: RunSpec):
        settings, engine = spec.settings, spec.engine
        self.engine = engine
        self.settings = settings
        self.prompt = list(spec.prompt)
        self.slots = list(spec.slots)
        self.stops = spec.stops
        self.streams = Streams(spec.chain_seed, 2)  # generator 0 for the draws, 1 for resampling choices
        self.base_sampler = TokenSampler(engine.n_vocab, settings.temperature, settings.alpha, settings.table_size)
        self.weighted = settings.smc_weights  # False only in the negative-control test
        # At tau = 1/alpha_t the weight does not depend on the token drawn.
        self.resample_first = settings.smc_resample_first and settings.proposal_temp is None
        self.share = settings.smc_shared_decode
        self.stats = SampleStats(method="smc", alpha=settings.alpha, block_size=settings.token_budget, mcmc_steps=0,
                                 seed=spec.seed, chain=spec.index, prompt_tokens=len(self.prompt),
                                 particles=len(self.slots), resamples=0, particle_tokens=0)
        # The population: particles, their log weights since the last resampling, and the
        # log-normalizer estimate of the generations before.
        self.particles: list[Particle] = []
        self.log_w = np.zeros(len(self.slots))
        self.log_normalizer = 0.0
        self.ess_min = float(len(self.slots))
        self._keys = 1  # the next unused sequence key (0: the empty sequence every particle starts as)
        self._start = time.perf_counter()
        self.trace = spec.trace  # events (ps_local.trace), only when a trace is written
        if self.trace is not None:
            self._trace_fields = self.trace.fields(chain=spec.index)

    def alpha_at(self, t: int) -> float:
        """The exponent of the intermediate target after t tokens."""
        ramp, alpha = self.settings.smc_ramp, self.settings.alpha
        if ramp == 0:
            return alpha
        return 1.0 + (alpha - 1.0) * min(1.0, t / ramp)

    def sampler_at(self, t: int) -> TokenSampler:
        if self.settings.smc_ramp == 0:
            return self.base_sampler
        alpha = self.alpha_at(t)
        temperature = self.settings.proposal_temp if self.settings.proposal_temp is not None else 1.0 / alpha
        return self.base_sampler.retargeted(temperature, alpha)

    def run(self, prompt_logits: np.ndarray) -> ChainRun:
        settings = self.settings
        self.particles = [Particle(slot, logits=prompt_logits, origin=k) for k, slot in enumerate(self.slots)]
        t = 0
        for t in range(1, settings.token_budget + 1):
            sampler = self.sampler_at(t)
            self._sharpen(self.alpha_at(t) - self.alpha_at(t - 1))
            prepared: dict[int, Prepared] = {}
            if self.resample_first:
                prepared = self._weigh_before_drawing(sampler)
                self._maybe_resample(t)
            self._draw(sampler, t, prepared)
            if all(p.end is not None for p in self.particles) or t == settings.token_budget:
                break
            yield from self._decode()
            if not self.resample_first:
                self._maybe_resample(t)
        # A ramp longer than the sequences: the last intermediate target is still p^alpha_t.
        self._sharpen(settings.alpha - self.alpha_at(t))
        self.log_normalizer += log_mean_exp(self.log_w)
        weights = np.exp(self.log_w - self.log_w.max())
        chosen = int(self.streams.start(CHOICE_STREAM, 0, slot=1).choice(len(weights), p=weights / weights.sum()))
        final_ess = effective_sample_size(self.log_w)
        self.stats.ess_min = min(self.ess_min, final_ess)
        if self.trace is not None:
            self.trace.emit({"event": "ess", **self._trace_fields, "t": t, "ess": final_ess,
                             "particles": len(self.particles), "threshold": None, "resampled": False,
                             "final": True, "chosen": chosen, "log_normalizer": finite(self.log_normalizer)})
        self.stats.distinct_ancestors = len({p.origin for p in self.particles})
        self.stats.log_normalizer = self.log_normalizer
        best = self.particles[chosen]
        return finished_sample(self.engine, self.stops, self.prompt, best.tokens, best.logp, best.end, self.stats,
                               self._start)

    def _sharpen(self, step: float) -> None:
        """The target's exponent rises by ``step``: every particle, ended ones too, takes the
        factor p(x)^step for the tokens it has."""
        if self.weighted and step != 0:
            self.log_w += step * np.array([p.total_logp for p in self.particles])

    def _weigh_before_drawing(self, sampler: TokenSampler) -> dict[int, Prepared]:
        """Add each running particle's weight for its next token, log Z_t, before it is drawn;
        the proposals prepared for it, by row, when they fit KEEP_PREPARED_BYTES."""
        by_row = groups(self.particles, "logits")
        keep = len(by_row) * (2 * 4 * self.engine.n_vocab) <= KEEP_PREPARED_BYTES
        prepared = {}
        for members in by_row:
            logits = self.particles[members[0]].logits
            proposal = sampler.prepare(logits, keep=keep)  # type: ignore[arg-type]
            if self.weighted:
                self.log_w[members] += proposal.log_z(sampler.alpha)
            if keep:
                prepared[id(logits)] = proposal
        return prepared

    def _draw(self, sampler: TokenSampler, t: int, prepared: dict[int, Prepared]) -> None:
        """Every running particle draws token t; particles with one logits row share its softmax."""
        uniforms = self.streams.start(DRAW_STREAM, t).random(len(self.particles))
        for members in groups(self.particles, "logits"):
            logits = self.particles[members[0]].logits
            proposal = prepared.get(id(logits)) or sampler.prepare(logits)  # type: ignore[arg-type]
            fresh: dict[int, int] = {}  # token -> the key of this sequence followed by it
            for number in members:
                particle = self.particles[number]
                draw = sampler.draw_prepared(proposal, float(uniforms[number]))
                particle.tokens.append(draw.token)
                particle.logp.append(draw.logp)
                particle.total_logp += draw.logp
                if self.weighted and not self.resample_first:
                    self.log_w[number] += draw.log_weight  # alpha log p - log q
                if draw.token not in fresh:
                    fresh[draw.token] = self._new_key()
                particle.key = fresh[draw.token]
                particle.end = ending(self.engine, self.stops, particle.tokens)
                if particle.end is not None:
                    particle.logits = None  # no further draws: let the row go

    def _new_key(self) -> int:
        self._keys += 1
        return self._keys - 1

    def _decode(self) -> ChainRun:
        """One decode of every running particle's new token: one entry per distinct sequence
        (all its slots take the token), or one per particle without sharing."""
        particles = self.particles
        if self.share:
            entries = groups(particles, "key")
        else:
            entries = [[number] for number, particle in enumerate(particles) if particle.end is None]
        requests: list[DecodeRequest] = []
        for members in entries:
            for number in members:
                particle = particles[number]
                check_cache(self.engine, self.prompt, particle.slot, particle.tokens, particle.decoded)
            slots = tuple(particles[number].slot for number in members)
            first = particles[members[0]]
            requests.append((slots if len(slots) > 1 else slots[0], first.tokens[first.decoded :]))
        rows = yield requests
        for members, (_, tokens), row in zip(entries, requests, rows):
            self.stats.tokens_decoded += len(tokens)
            for number in members:
                particle = particles[number]
                self.stats.particle_tokens += len(tokens)  # type: ignore[operator]
                particle.decoded = len(particle.tokens)
                particle.logits = row

    def _maybe_resample(self, t: int) -> None:
        """Every ``check_every`` tokens: resample when the ESS fell below the threshold."""
        if t % self.settings.smc_check_every:
            return
        ess = effective_sample_size(self.log_w)
        self.ess_min = min(self.ess_min, ess)
        threshold = self.settings.ess_threshold * len(self.particles)
        resampled = ess < threshold
        if resampled:
            self.log_normalizer += log_mean_exp(self.log_w)
            self.particles = self._resample(t)
            self.log_w = np.zeros(len(self.particles))
            self.stats.resamples += 1  # type: ignore[operator]
        if self.trace is not None:
            self._trace_check(t, ess, threshold, resampled)

    def _trace_check(self, t: int, ess: float, threshold: float, resampled: bool) -> None:
        """The events of one ESS check, and of its resampling (ps_local.trace)."""
        self.trace.emit({"event": "ess", **self._trace_fields, "t": t, "ess": ess,  # type: ignore[union-attr]
                         "particles": len(self.particles), "threshold": threshold, "resampled": resampled})
        if resampled:
            counts = self._copies
            self.trace.emit({"event": "resample", **self._trace_fields, "t": t, "ess": ess,  # type: ignore[union-attr]
                             "counts": counts.tolist(), "survivors": int(np.count_nonzero(counts)),
                             "distinct_ancestors": len({p.origin for p in self.particles}),
                             "log_normalizer": finite(self.log_normalizer)})

    def _resample(self, t: int) -> list[Particle]:
        """Systematic resampling in place: each survivor keeps its own slot for its first copy;
        its other copies go to the slots of dropped particles."""
        particles = self.particles
        u = float(self.streams.start(CHOICE_STREAM, t, slot=1).random())
        ancestors = systematic_ancestors(np.exp(self.log_w - self.log_w.max()), u)
        copies = np.bincount(ancestors, minlength=len(particles))
        self._copies = copies  # for the trace
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
