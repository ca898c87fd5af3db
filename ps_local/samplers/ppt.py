"""Parallel power tempering (PPT): K block-wise MH chains on a ladder of targets, with swaps.

Replica k is the exact MH chain of Algorithm 1 (mh.Chain) on p^alpha_k, with its own proposal
temperature 1/alpha_k, for a ladder 1 <= alpha_1 < ... < alpha_K = alpha. The replicas run each
block together (their extensions and proposals share every decode): every ``swap_every`` MH
steps of the replicas, and after the block's last, one ordered sweep k = 1 ... K-1 proposes to
swap the sequences of replicas k and k+1, accepted with probability
min(1, exp((alpha_{k+1} - alpha_k) (log p(x_k) - log p(x_{k+1})))). All replicas then hold
sequences of the same block end L, so each swap is an MH move on the product of the targets
over that block. A swap only relabels which replica holds which sequence (and the slots it lives
in): nothing is decoded or copied. The hot replicas explore; swaps carry good sequences up to the
alpha replica, whose sequence is the sample. The run stops after the block in which that
sequence ends (EOS or a stop string), as Algorithm 1 does.

Each replica's MH kernel leaves its own p^alpha_k invariant and each swap is an MH move on the
product of the targets, so the alpha replica's samples converge to exactly what Algorithm 1's
do (p^alpha with one block), faster where the hot replicas help. A sequence moving to another rung needs that rung's MH
weights for its tokens: every draw scores its token for every rung (proposal.TokenSampler with
rungs), and every stored table keeps each rung's normalizer.

Ladder placement (``ladder_warmup`` W > 0). log p of a sequence grows with its length, so a fixed
ladder that swaps well on short answers hardly swaps on long ones. A pilot first runs PPT with
the initial ladder over the first block, W MH steps per replica (with its swap sweeps), and
records each rung's log p; ``place_ladder`` turns the energy curve E(alpha) = mean -log p into a
ladder of as many rungs, top at alpha, spaced for a target swap acceptance. The pilot is then
discarded entirely: every slot holds the prompt again, and the real run starts afresh, with the
placed ladder and random streams of its own. The real run is PPT with a fixed ladder, which is
only a function of the pilot's randomness, independent of the real run's: it stays exact. (The
pilot's sequences cannot be kept: their tokens carry the MH weights of the pilot's rungs.)
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Sequence

import numpy as np

from ..settings import Sample
from .base import ChainRun, RunSpec, chain_seeds, check_cache, finished_sample, lockstep
from .mh import Chain, Trajectory
from .streams import Streams

# Stream (kind, block | (sweep - 1) << 32): the uniforms of the block's sweep-th swap sweep.
SWAP_STREAM = 3
SWAP_TARGET = 0.3  # the swap acceptance per adjacent pair a placed ladder aims at
PILOT_SPAWN = 1 << 16  # the pilot's seed: a child of the run's seed no replica's seed is

# Counters of the replicas' chains that are costs: summed over every replica (and the pilot's).
# The MH counters (mh_steps, accepted, moved, ...) are the alpha replica's own, which is what
# shows its mixing.
COST_COUNTERS = ("tokens_decoded", "tokens_reevaluated", "proposal_tokens", "discarded_tokens", "reused_tokens")


def place_ladder(ladder: Sequence[float], energies: Sequence[float], target: float = SWAP_TARGET) -> tuple[float, ...]:
    """A ladder of ``len(ladder)`` rungs, top at ``ladder[-1]`` (alpha), bottom >= 1, for a swap
    acceptance of about ``target`` between adjacent rungs.

    ``energies``: mean -log p of the sequences the replicas at ``ladder`` held. Swapping the
    sequences of rungs a < b is accepted with probability about exp(-(b - a)(E(a) - E(b))), so each
    gap should cost (b - a)(E(a) - E(b)) = -log target. E(a) is interpolated linearly in 1/a between
    the rungs (made non-increasing; flat below the lowest rung): on a piece E = e + m/a a gap costs
    m (b - a)^2 / (ab), about (sqrt(m) log(b/a))^2, so in the length Lambda, the sum over pieces
    of sqrt(m) log(b/a), a gap of cost c is sqrt(c) long. The rungs step down from alpha by
    sqrt(-log target) each; when the whole range 1..alpha is shorter than the K - 1 steps, the
    bottom rung is 1 and the rungs divide it evenly (a flat curve: geometrically)."""
    alphas = np.asarray(ladder, dtype=np.float64)
    count, alpha = len(alphas), float(alphas[-1])
    energy = _non_increasing(np.asarray(energies, dtype=np.float64))
    # Knots over [1, alpha]: 1 (flat below the lowest rung, whose energy it takes), then the rungs.
    knots = np.concatenate(([1.0], alphas)) if alphas[0] > 1.0 else alphas
    values = np.concatenate(([energy[0]], energy)) if alphas[0] > 1.0 else energy
    slopes = np.maximum(-np.diff(values), 0.0) / -np.diff(1.0 / knots)  # m of each piece
    step = math.sqrt(-math.log(target))
    # A little length per log alpha, so that the length grows strictly (a flat curve: geometric).
    floor = 1e-3 * step / math.log(alpha)
    logs = np.log(knots)
    length = np.concatenate(([0.0], np.cumsum((np.sqrt(slopes) + floor) * np.diff(logs))))
    total = float(length[-1])
    if total <= (count - 1) * step:
        marks = total * np.arange(count) / (count - 1)  # the full range meets the target
    else:
        marks = total - step * np.arange(count - 1, -1, -1)
    rungs = np.exp(np.interp(marks, length, logs))
    rungs[0] = max(1.0, float(rungs[0]))
    rungs[-1] = alpha
    placed = tuple(float(a) for a in rungs)
    if any(b <= a for a, b in zip(placed, placed[1:])):
        return tuple(float(a) for a in alphas)  # rounding collapsed rungs: keep the ladder as it is
    return placed


def _non_increasing(values: np.ndarray) -> np.ndarray:
    """The closest non-increasing sequence in least squares (pool adjacent violators): noisy
    energies can rise with alpha, the true curve does not."""
    blocks: list[list[float]] = []  # [mean, size]
    for value in values:
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean, size = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * size) / (blocks[-1][1] + size), blocks[-1][1] + size]
    return np.concatenate([np.full(int(size), mean) for mean, size in blocks])


def pilot_seed(chain_seed: int) -> int:
    """The pilot's seed: independent of the seeds of the real run's replicas and swaps."""
    return int(np.random.SeedSequence(chain_seed, spawn_key=(PILOT_SPAWN,)).generate_state(1)[0])


class Tempering:
    """The replicas of one ladder over a run's slots, their swap streams and swap counts."""

    def __init__(self, spec: RunSpec, ladder: Sequence[float], chain_seed: int, pilot: bool = False):
        settings = spec.settings
        self.settings = settings
        self.ladder = tuple(ladder)
        rungs = [(alpha, 1.0 / alpha) for alpha in self.ladder]
        count = len(self.ladder)
        per_replica = len(spec.slots) // count
        seeds = chain_seeds(chain_seed, count)
        # Replica k is the plain MH chain at alpha_k; only the real run's alpha replica reports
        # progress, and the pilot writes no events.
        self.replicas = [
            Chain(replace(spec, settings=replace(settings, method="power", alpha=alpha),
                          slots=spec.slots[k * per_replica : (k + 1) * per_replica], chain_seed=seeds[k],
                          progress=spec.progress if k == count - 1 and not pilot else None, on_token=None,
                          trace=None if pilot else spec.trace),
                  rungs=rungs, rung=k)
            for k, alpha in enumerate(self.ladder)
        ]
        self.streams = Streams(chain_seed, 1)
        self.swaps_proposed = np.zeros(count - 1, dtype=int)
        self.swaps_accepted = np.zeros(count - 1, dtype=int)
        self.logp: list[list[float]] = []  # every rung's log p after each sweep
        self.trace = None if pilot else spec.trace  # events (ps_local.trace), only when a trace is written
        if self.trace is not None:
            self._trace_fields = self.trace.fields(chain=spec.index)

    def run_block(self, states: list[Trajectory], block: int, first: np.ndarray | None,
                  steps: int | None = None) -> ChainRun:
        """Block ``block`` for every replica: the extensions, then the MH steps in groups of
        ``swap_every``, a swap sweep after each group. ``steps``: MH steps per replica (None: the
        block's, the most any replica's length asks for, so that all take the same number)."""
        replicas = self.replicas
        yield from lockstep([replica.extend_block(state, block, first) for replica, state in zip(replicas, states)])
        if steps is None:
            steps = max(replica._steps_this_block for replica in replicas)
        for replica in replicas:
            replica._steps_this_block = steps
        done, sweep = 0, 0
        while True:
            group = min(self.settings.swap_every, steps - done)
            if group > 0:
                states = yield from lockstep([replica.take_steps(state, group)
                                              for replica, state in zip(replicas, states)])
                done += group
            sweep += 1
            self._swap_sweep(states, block, sweep, done)
            if done >= steps:
                return states

    def _swap_sweep(self, states: list[Trajectory], block: int, sweep: int, step: int) -> None:
        """One ordered sweep of adjacent swaps; an accepted swap exchanges the two replicas'
        sequences and the slots they live in."""
        uniforms = self.streams.start(SWAP_STREAM, block | (sweep - 1) << 32).random(len(states) - 1)
        for k in range(len(states) - 1):
            log_accept = (self.ladder[k + 1] - self.ladder[k]) * (states[k].cum_logp[-1] - states[k + 1].cum_logp[-1])
            self.swaps_proposed[k] += 1
            # Without the correction (the negative-control test only) every swap is accepted.
            accepted = not self.settings.swap_correction or math.log(uniforms[k] or 5e-324) < log_accept
            if self.trace is not None:
                self.trace.emit({"event": "swap", **self._trace_fields, "block": block, "sweep": sweep, "step": step,
                                 "rungs": [k, k + 1], "alphas": [self.ladder[k], self.ladder[k + 1]],
                                 "logp": [states[k].cum_logp[-1], states[k + 1].cum_logp[-1]],
                                 "log_accept": log_accept, "accepted": accepted})
            if not accepted:
                continue
            self.swaps_accepted[k] += 1
            lower, upper = self.replicas[k], self.replicas[k + 1]
            lower.slots, upper.slots = upper.slots, lower.slots
            states[k], states[k + 1] = states[k + 1], states[k]
            states[k].retarget(k)
            states[k + 1].retarget(k + 1)
        self.logp.append([state.cum_logp[-1] for state in states])

    def swap_acceptance(self) -> list[float]:
        return (self.swaps_accepted / np.maximum(self.swaps_proposed, 1)).tolist()


class PptRun:
    """One PPT run over ``len(slots)`` slots, split evenly among the replicas; each slot already
    holds the prompt."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.engine = spec.engine
        self.settings = spec.settings
        self.prompt = list(spec.prompt)
        self.stops = spec.stops
        self.pilot: Tempering | None = None
        self.tempering = Tempering(spec, spec.settings.power_ladder, spec.chain_seed)
        self._start = time.perf_counter()

    @property
    def ladder(self) -> tuple[float, ...]:
        return self.tempering.ladder

    def run(self, prompt_logits: np.ndarray) -> ChainRun:
        if self.settings.ladder_warmup:
            yield from self._place_ladder(prompt_logits)
        tempering = self.tempering
        states = [Trajectory(replica.slots[0]) for replica in tempering.replicas]
        for block in range(1, len(tempering.replicas[0].ends) + 1):
            first = prompt_logits if block == 1 else None
            states = yield from tempering.run_block(states, block, first)
            if states[-1].end is not None:
                break
        return self._finish(states[-1])

    def _place_ladder(self, prompt_logits: np.ndarray) -> ChainRun:
        """The pilot over the first block, the ladder placed from its energies, the pilot
        discarded: every slot holds the prompt again, and the real run gets fresh replicas."""
        spec, initial = self.spec, self.settings.power_ladder
        pilot = self.pilot = Tempering(spec, initial, pilot_seed(spec.chain_seed), pilot=True)
        states = [Trajectory(replica.slots[0]) for replica in pilot.replicas]
        yield from pilot.run_block(states, 1, prompt_logits, steps=self.settings.ladder_warmup)
        records = np.array(pilot.logp)
        energies = -records[len(records) // 2 :].mean(axis=0)  # the later half: past the extensions' start
        placed = place_ladder(initial, energies, SWAP_TARGET)
        self._clear_slots()
        self.tempering = Tempering(spec, placed, spec.chain_seed)
        if spec.trace is not None:
            spec.trace.emit({"event": "ladder", **spec.trace.fields(chain=spec.index), "pilot_ladder": list(initial),
                             "ladder": list(placed), "energies": energies.tolist(),
                             "steps": self.settings.ladder_warmup, "sweeps": len(records),
                             "pilot_swap_acceptance": pilot.swap_acceptance(),
                             "tokens_decoded": sum(replica.stats.tokens_decoded for replica in pilot.replicas)})

    def _clear_slots(self) -> None:
        """Cut every slot back to the prompt (the engine protocol's copy_prefix; a slot cannot
        copy from itself, so the second slot is cut from the first and the rest from it)."""
        slots, length = self.spec.slots, len(self.prompt)
        self.engine.copy_prefix(slots[0], slots[1], length)
        for slot in [slots[0], *slots[2:]]:
            self.engine.copy_prefix(slots[1], slot, length)
        for slot in slots:
            check_cache(self.engine, self.prompt, slot, [], 0)

    def _finish(self, state: Trajectory) -> Sample:
        tempering = self.tempering
        replicas = tempering.replicas + (self.pilot.replicas if self.pilot is not None else [])
        stats = replace(tempering.replicas[-1].final_stats(), method="ppt", alpha=self.settings.alpha,
                        ladder=list(tempering.ladder), swap_acceptance=tempering.swap_acceptance())
        for counter in COST_COUNTERS:
            setattr(stats, counter, sum(getattr(replica.stats, counter) for replica in replicas))
        stats.widest_round = max(replica.stats.widest_round for replica in replicas)
        return finished_sample(self.engine, self.stops, self.prompt, state.tokens, state.logp, state.end, stats,
                               self._start)
