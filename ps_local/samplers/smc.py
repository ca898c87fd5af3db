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

Resample-move (``smc_rejuvenate`` = K > 0; Gilks & Berzuini 2001): after token t is drawn at a
check where the particles were resampled (or where their weights were all equal already, so that
resampling would change nothing: every particle holding one same sequence, the collapse this is
for), the population is equally weighted and targets pi_t, p^alpha over sequences of t tokens or
shorter ones that ended. Every particle, ended ones too, then takes K independent MH moves of
Algorithm 1 with block end t (mh.Chain's own rounds: coupled proposals from stored tables, early
rejection, the length term log n - log n'). Each move leaves pi_t invariant, so the run stays
consistent, and copies of one ancestor spread out again. Each particle has a spare slot for its
proposals (2N slots); an accepted move's sequence lives in the spare, which becomes the
particle's slot. Only at tau = 1/alpha without a ramp (``SamplingSettings.validate``).

Like mh.Chain, a run is a generator yielding decode requests, so the scheduler batches it with
other work; it uses ``settings.particles`` slots (twice that with rejuvenation).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..protocol import DecodeRequest
from ..settings import SampleStats
from ..trace import finite
from .base import ChainRun, Progress, RunSpec, check_cache, ending, finished_sample, lockstep
from .mh import Chain, Trajectory
from .proposal import Prepared, TokenSampler, TokenTable
from .streams import Streams, member_seed

DRAW_STREAM = 2  # stream (kind, t): every particle's uniform for its draw at token t, in particle order
CHOICE_STREAM = 3  # stream (kind, t): the resampling at token t; (kind, 0): the final choice
# Resampling first keeps each distinct sequence's prepared proposal until its copies have drawn;
# above this many bytes of those (many distinct sequences on a large vocabulary) they are
# prepared again instead (the same draws, twice the softmax work).
KEEP_PREPARED_BYTES = 64 << 20
# The counters of the particles' MH moves (rejuvenation) that go into the run's statistics.
MOVE_COUNTERS = ("mh_steps", "accepted", "moved", "tokens_decoded", "tokens_reevaluated", "proposal_tokens",
                 "early_rejections", "discarded_tokens", "reused_tokens")


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
    # Rejuvenation only (None without): what an MH move needs of the sequence (mh.Trajectory's
    # running sums of log p and of the tokens' MH weights, and each position's proposal table,
    # one object for the particles that drew from one row).
    cum_logp: list[float] | None = None
    cum_weight: list[float] | None = None
    tables: list[TokenTable | None] | None = None

    def copy_into(self, slot: int) -> "Particle":
        return Particle(slot, list(self.tokens), list(self.logp), self.end, self.logits, self.decoded, self.origin,
                        self.key, self.total_logp, *(None if lists is None else list(lists)
                                                     for lists in (self.cum_logp, self.cum_weight, self.tables)))

    def trajectory(self) -> Trajectory:
        """The particle as an MH chain's current sequence; it shares the particle's lists (MH
        rounds only read the current sequence: proposals copy what they keep)."""
        assert self.cum_logp is not None and self.cum_weight is not None and self.tables is not None
        return Trajectory(self.slot, self.tokens, self.logp, self.cum_logp, self.cum_weight, self.tables,
                          self.decoded, self.end)

    def adopt(self, moved: Trajectory) -> None:
        """Become the sequence an MH move accepted; its slot holds its first ``cached`` tokens."""
        self.slot, self.tokens, self.logp, self.end = moved.slot, moved.tokens, moved.logp, moved.end
        self.cum_logp, self.cum_weight, self.tables = moved.cum_logp, moved.cum_weight, moved.tables
        self.decoded, self.total_logp, self.logits = moved.cached, moved.cum_logp[-1], None


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
    """One Power-SMC run over ``len(slots)`` particles (half as many with rejuvenation: the other
    half are their spares); each slot already holds the prompt."""

    def __init__(self, spec: RunSpec):
        settings, engine = spec.settings, spec.engine
        self.engine = engine
        self.settings = settings
        self.prompt = list(spec.prompt)
        # At tau = 1/alpha only (validate() refuses the rest): K MH moves per particle after a resampling.
        self.rejuvenate = settings.smc_rejuvenate if settings.smc_resample_first and settings.proposal_temp is None \
            and settings.smc_ramp == 0 else 0
        # One slot per particle; with rejuvenation a spare one each for its moves' proposals.
        count = len(spec.slots) // 2 if self.rejuvenate else len(spec.slots)
        self.slots = list(spec.slots[:count])
        self.spares = list(spec.slots[count : 2 * count]) if self.rejuvenate else []
        self.spec = spec
        self.index, self.progress = spec.index, spec.progress
        self.stops = spec.stops
        self.streams = Streams(spec.chain_seed, 2)  # generator 0 for the draws, 1 for resampling choices
        self.base_sampler = TokenSampler(engine.n_vocab, settings.temperature, settings.alpha, settings.table_size)
        self.weighted = settings.smc_weights  # False only in the negative-control test
        # At tau = 1/alpha_t the weight does not depend on the token drawn.
        self.resample_first = settings.smc_resample_first and settings.proposal_temp is None
        self.share = settings.smc_shared_decode
        self.stats = SampleStats(method="smc", alpha=settings.alpha, block_size=settings.token_budget,
                                 mcmc_steps=self.rejuvenate, seed=spec.seed, chain=spec.index,
                                 prompt_tokens=len(self.prompt), particles=len(self.slots), resamples=0,
                                 particle_tokens=0, rejuvenations=0 if self.rejuvenate else None)
        # The population: particles, their log weights since the last resampling, and the
        # log-normalizer estimate of the generations before.
        self.particles: list[Particle] = []
        self.log_w = np.zeros(len(self.slots))
        self.log_normalizer = 0.0
        self.ess_min = float(len(self.slots))
        self._keys = 1  # the next unused sequence key (0: the empty sequence every particle starts as)
        self._even_at = 0  # the last token after whose check the weights were all equal (resampled or not)
        self._movers: list[Chain] | None = None  # one MH kernel per particle, made at the first rejuvenation
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
        if self.rejuvenate:
            for particle in self.particles:
                particle.cum_logp, particle.cum_weight, particle.tables = [0.0], [0.0], []
        t = 0
        for t in range(1, settings.token_budget + 1):
            sampler = self.sampler_at(t)
            self._sharpen(self.alpha_at(t) - self.alpha_at(t - 1))
            prepared: dict[int, Prepared] = {}
            if self.resample_first:
                prepared = self._weigh_before_drawing(sampler)
                self._maybe_resample(t)
            self._draw(sampler, t, prepared)
            if self.rejuvenate and self._even_at == t:
                yield from self._rejuvenate(t)
            if all(p.end is not None for p in self.particles):
                if self.rejuvenate and t < settings.token_budget:
                    t = settings.token_budget
                    yield from self._last_moves(t)
                break
            if t == settings.token_budget:
                break
            yield from self._decode()
            if not self.resample_first:
                self._maybe_resample(t)
            self._report(t)
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
        self.stats.distinct_sequences = self._distinct_sequences()
        self.stats.log_normalizer = self.log_normalizer
        if self.stats.mh_steps:
            self.stats.acceptance_rate = self.stats.accepted / self.stats.mh_steps
        best = self.particles[chosen]
        return finished_sample(self.engine, self.stops, self.prompt, best.tokens, best.logp, best.end, self.stats,
                               self._start)

    def _report(self, t: int) -> None:
        """Progress after token t, for a live view: the heaviest particle's sequence stands for
        the population (a later resampling may still drop it)."""
        if self.progress is None:
            return
        leader = self.particles[int(np.argmax(self.log_w))]
        self.progress(Progress(chain=self.index, block=1, blocks=1, mh_step=t, mh_steps=self.settings.token_budget,
                               accepted=self.stats.accepted, proposals=self.stats.mh_steps,
                               tokens_decoded=self.stats.tokens_decoded, elapsed_s=time.perf_counter() - self._start,
                               tokens=tuple(leader.tokens), logp=leader.total_logp, method="smc",
                               ess=effective_sample_size(self.log_w), particles=len(self.particles),
                               resamples=self.stats.resamples))

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
            # Rejuvenation's MH moves draw from each position's table (one for the row's particles).
            table = sampler.table_of(proposal) if self.rejuvenate and self.settings.reuse_tables else None
            fresh: dict[int, int] = {}  # token -> the key of this sequence followed by it
            for number in members:
                particle = self.particles[number]
                draw = sampler.draw_prepared(proposal, float(uniforms[number]))
                particle.tokens.append(draw.token)
                particle.logp.append(draw.logp)
                particle.total_logp += draw.logp
                if self.rejuvenate:  # as mh.Trajectory.append keeps them
                    particle.cum_logp.append(particle.cum_logp[-1] + draw.logp)  # type: ignore[union-attr]
                    particle.cum_weight.append(particle.cum_weight[-1] + draw.log_weight)  # type: ignore[union-attr]
                    particle.tables.append(table)  # type: ignore[union-attr]
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
        self._check(t)

    def _check(self, t: int) -> None:
        """An ESS check after token t: resample when the ESS fell below the threshold."""
        ess = effective_sample_size(self.log_w)
        self.ess_min = min(self.ess_min, ess)
        threshold = self.settings.ess_threshold * len(self.particles)
        resampled = ess < threshold
        if resampled:
            self.log_normalizer += log_mean_exp(self.log_w)
            self.particles = self._resample(t)
            self.log_w = np.zeros(len(self.particles))
            self.stats.resamples += 1  # type: ignore[operator]
        if resampled or self.log_w.max() == self.log_w.min():
            self._even_at = t  # equally weighted: where resampling would be the identity too
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
                # An ended particle never decodes again: no cells to copy, unless MH moves branch from it.
                if source.end is None or self.rejuvenate:
                    self.engine.copy_prefix(source.slot, slot, len(self.prompt) + source.decoded)
                resampled[target] = source.copy_into(slot)
        return resampled

    # -- resample-move ------------------------------------------------------------------

    def _rejuvenate(self, t: int) -> ChainRun:
        """K MH moves of every particle on pi_t (Algorithm 1 with block end t), all particles'
        proposals decoded together; each particle draws from its own streams, (chain seed, t,
        particle number)."""
        movers = self._movers
        if movers is None:
            movers = self._movers = [self._mover(number) for number in range(len(self.particles))]
        before = {name: sum(getattr(mover.stats, name) for mover in movers) for name in MOVE_COUNTERS}
        distinct_before = self._distinct_sequences() if self.trace is not None else None
        views = [particle.trajectory() for particle in self.particles]
        finals = yield from lockstep([self._moves(number, view, t) for number, view in enumerate(views)])
        changed = 0
        for number, (particle, view, final) in enumerate(zip(self.particles, views, finals)):
            if final is view:
                continue  # every move rejected
            if final.tokens != view.tokens or final.end != view.end:
                changed += 1
            # The particle's sequence now lives in one of its two slots; the other is its spare.
            if final.slot != particle.slot:
                self.spares[number] = particle.slot
            particle.adopt(final)
            check_cache(self.engine, self.prompt, particle.slot, particle.tokens, particle.decoded)
        self._regroup()
        after = {name: sum(getattr(mover.stats, name) for mover in movers) for name in MOVE_COUNTERS}
        for name in MOVE_COUNTERS:
            setattr(self.stats, name, getattr(self.stats, name) + after[name] - before[name])
        self.stats.rejuvenations += 1  # type: ignore[operator]
        if self.trace is not None:
            self.trace.emit({"event": "rejuvenate", **self._trace_fields, "t": t,
                             "moves": after["mh_steps"] - before["mh_steps"],
                             "accepted": after["accepted"] - before["accepted"],
                             "moved": after["moved"] - before["moved"], "particles_changed": changed,
                             "distinct_before": distinct_before, "distinct_after": self._distinct_sequences(),
                             "tokens_decoded": after["tokens_decoded"] - before["tokens_decoded"]})

    def _last_moves(self, t: int) -> ChainRun:
        """Every particle ended before token t = max_tokens. Later tokens would draw nothing and
        change no weight: the population stands for pi_t as it is (the checks and moves of the
        tokens between are optional and skipped). One check at t, and the moves on pi_t where
        it leaves the weights equal: they may take an ended particle to a longer sequence, which
        pi_t holds and the earlier targets did not."""
        self._check(t)
        if self._even_at == t:
            yield from self._rejuvenate(t)

    def _mover(self, number: int) -> Chain:
        """Particle ``number``'s MH kernel: mh.Chain on its two slots, sharing the run's sampler;
        it emits no events of its own (the run emits one per sweep)."""
        settings = replace(self.settings, method="power", mcmc_steps=max(1, self.rejuvenate))
        spec = replace(self.spec, settings=settings, slots=[self.slots[number], self.spares[number]],
                       progress=None, on_token=None, trace=None, round_width=1)
        return Chain(spec, token_sampler=self.base_sampler)

    def _moves(self, number: int, current: Trajectory, t: int) -> ChainRun:
        """Particle ``number``'s K MH moves from ``current``; returns where they left it."""
        mover = self._movers[number]  # type: ignore[index]
        mover.slots = [current.slot, self.spares[number]]
        mover.streams.chain_seed = member_seed(self.streams.chain_seed, t, number)
        for step in range(self.rejuvenate):
            current, _ = yield from mover._mh_round(current, t, self.rejuvenate - step)
        return current

    def _regroup(self) -> None:
        """New keys after moves: one per distinct (sequence, tokens its slot holds), so that
        shared decode entries group exactly the slots that hold the same tokens."""
        keys: dict[tuple[tuple[int, ...], int], int] = {}
        for particle in self.particles:
            if particle.end is None:
                found = (tuple(particle.tokens), particle.decoded)
                if found not in keys:
                    keys[found] = self._new_key()
                particle.key = keys[found]

    def _distinct_sequences(self) -> int:
        return len({tuple(p.tokens) for p in self.particles})
