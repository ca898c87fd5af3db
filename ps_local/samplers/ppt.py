"""Parallel power tempering (PPT): K block-wise MH chains on a ladder of targets, with swaps.

Replica k is the exact MH chain of Algorithm 1 (mh.Chain) on p^alpha_k, with its own proposal
temperature 1/alpha_k, for a ladder 1 <= alpha_1 < ... < alpha_K = alpha. The replicas run each
block together (their extensions and proposals share every decode); after the block's MH steps
one ordered sweep k = 1 ... K-1 proposes to swap the sequences of replicas k and k+1, accepted
with probability min(1, exp((alpha_{k+1} - alpha_k) (log p(x_k) - log p(x_{k+1})))). A swap only
relabels which replica holds which sequence (and the slots it lives in): nothing is decoded or
copied. The hot replicas explore; swaps carry good sequences up to the alpha replica, whose
sequence is the sample. The run stops after the block in which that sequence ends (EOS or a
stop string), as Algorithm 1 does.

Each replica's MH kernel leaves its own p^alpha_k invariant and each swap is an MH move on the
product of the targets, so the alpha replica's samples converge to exactly what Algorithm 1's
do (p^alpha with one block), faster where the hot replicas help. A sequence moving to another rung needs that rung's MH
weights for its tokens: every draw scores its token for every rung (proposal.TokenSampler with
rungs), and every stored table keeps each rung's normalizer.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from ..settings import Sample
from .base import ChainRun, RunSpec, chain_seeds, finished_sample, lockstep
from .mh import Chain, Trajectory
from .streams import Streams

SWAP_STREAM = 3  # stream (kind, block): the uniforms of the swap sweep after that block

# Counters of the replicas' chains that are costs: summed over every replica. The MH counters
# (mh_steps, accepted, moved, ...) are the alpha replica's own, which is what shows its mixing.
COST_COUNTERS = ("tokens_decoded", "tokens_reevaluated", "proposal_tokens", "discarded_tokens", "reused_tokens")


class PptRun:
    """One PPT run over ``len(slots)`` slots, split evenly among the replicas; each slot already
    holds the prompt."""

    def __init__(self, spec: RunSpec):
        settings = spec.settings
        self.engine = spec.engine
        self.settings = settings
        self.prompt = list(spec.prompt)
        self.stops = spec.stops
        self.ladder = settings.power_ladder
        rungs = [(alpha, 1.0 / alpha) for alpha in self.ladder]
        count = len(self.ladder)
        per_replica = len(spec.slots) // count
        seeds = chain_seeds(spec.chain_seed, count)
        # Replica k is the plain MH chain at alpha_k; only the alpha replica reports progress.
        self.replicas = [
            Chain(replace(spec, settings=replace(settings, method="power", alpha=alpha),
                          slots=spec.slots[k * per_replica : (k + 1) * per_replica], chain_seed=seeds[k],
                          progress=spec.progress if k == count - 1 else None, on_token=None),
                  rungs=rungs, rung=k)
            for k, alpha in enumerate(self.ladder)
        ]
        self.streams = Streams(spec.chain_seed, 1)
        self.swaps_proposed = np.zeros(count - 1, dtype=int)
        self.swaps_accepted = np.zeros(count - 1, dtype=int)
        self._start = time.perf_counter()
        self.trace = spec.trace  # events (ps_local.trace), only when a trace is written
        if self.trace is not None:
            self._trace_fields = self.trace.fields(chain=spec.index)

    def run(self, prompt_logits: np.ndarray) -> ChainRun:
        replicas = self.replicas
        states = [Trajectory(replica.slots[0]) for replica in replicas]
        for block in range(1, len(replicas[0].ends) + 1):
            first = prompt_logits if block == 1 else None
            states = yield from lockstep([replica.run_block(state, block, first)
                                          for replica, state in zip(replicas, states)])
            self._swap_sweep(states, block)
            if states[-1].end is not None:
                break
        return self._finish(states[-1])

    def _swap_sweep(self, states: list[Trajectory], block: int) -> None:
        """One ordered sweep of adjacent swaps; an accepted swap exchanges the two replicas'
        sequences and the slots they live in."""
        uniforms = self.streams.start(SWAP_STREAM, block).random(len(states) - 1)
        for k in range(len(states) - 1):
            log_accept = (self.ladder[k + 1] - self.ladder[k]) * (states[k].cum_logp[-1] - states[k + 1].cum_logp[-1])
            self.swaps_proposed[k] += 1
            # Without the correction (the negative-control test only) every swap is accepted.
            accepted = not self.settings.swap_correction or math.log(uniforms[k] or 5e-324) < log_accept
            if self.trace is not None:
                self.trace.emit({"event": "swap", **self._trace_fields, "block": block, "rungs": [k, k + 1],
                                 "alphas": [self.ladder[k], self.ladder[k + 1]],
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

    def _finish(self, state: Trajectory) -> Sample:
        stats = replace(self.replicas[-1].final_stats(), method="ppt", alpha=self.settings.alpha, ladder=list(self.ladder),
                        swap_acceptance=(self.swaps_accepted / np.maximum(self.swaps_proposed, 1)).tolist())
        for counter in COST_COUNTERS:
            setattr(stats, counter, sum(getattr(replica.stats, counter) for replica in self.replicas))
        stats.widest_round = max(replica.stats.widest_round for replica in self.replicas)
        return finished_sample(self.engine, self.stops, self.prompt, state.tokens, state.logp, state.end, stats,
                               self._start)
