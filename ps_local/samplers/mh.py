"""Block-wise Metropolis-Hastings on p^alpha (Karan & Du 2025, Algorithm 1), and the baselines.

Pure logic over the engine protocol. A chain is a generator that yields decode requests
and receives logits rows, so a driver can advance many chains in one batched decode.
The math, with the fixes to the reference code, is in docs/algorithm.md of the project.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..protocol import DecodeRequest
from ..settings import Sample, SampleStats
from .base import CacheInvariantError, ChainRun, Progress, RunSpec, check_cache, ending, finished_sample
from .proposal import Rung, TokenDraw, TokenSampler, TokenTable
from .streams import Streams

PAUSE_EVERY = 32  # MH rounds without a decode after which a chain yields to its driver

# Kinds of random stream a chain draws from, each indexed (block, MH step).
EXTEND_STREAM = 0
MH_STREAM = 1


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
    tables: list[TokenTable | None] = field(default_factory=list)  # the proposal at each position
    cached: int = 0
    end: str | None = None  # None, "eos" or "stop"
    # On a tempering ladder: each token's MH weight at every rung, so that the sequence can
    # move to another replica (retarget) without decoding anything again.
    rung_weights: list[np.ndarray] | None = None

    def append(self, draw: TokenDraw, table: TokenTable | None) -> None:
        self.tokens.append(draw.token)
        self.tables.append(table)
        self.logp.append(draw.logp)
        self.cum_logp.append(self.cum_logp[-1] + draw.logp)
        self.cum_weight.append(self.cum_weight[-1] + draw.log_weight)
        if draw.rung_weights is not None:
            if self.rung_weights is None:
                self.rung_weights = []
            self.rung_weights.append(draw.rung_weights)

    def prefix(self, slot: int, keep: int) -> "Trajectory":
        return Trajectory(
            slot,
            self.tokens[:keep],
            self.logp[:keep],
            self.cum_logp[: keep + 1],
            self.cum_weight[: keep + 1],
            self.tables[:keep],
            keep,
            rung_weights=None if self.rung_weights is None else self.rung_weights[:keep],
        )

    def retarget(self, rung: int) -> None:
        """Make the MH weights those of ladder rung ``rung`` (a sequence swapped to another replica)."""
        if self.rung_weights:
            sums = np.cumsum([0.0] + [float(weights[rung]) for weights in self.rung_weights])
            self.cum_weight = sums.tolist()


def block_ends(max_tokens: int, block_size: int) -> list[int]:
    return [min(k * block_size, max_tokens) for k in range(1, math.ceil(max_tokens / block_size) + 1)]


@dataclass
class Move:
    """One MH proposal in flight: its trajectory, resample point and uniform draw."""

    proposal: Trajectory
    keep: int  # tokens kept before the resample index
    log_u: float
    current_score: float  # the current sequence's suffix score from the same index
    pending: list[int] = field(default_factory=list)  # tokens to decode before the next draw
    # coupled: still equal to the current sequence, drawn from its stored tables, nothing
    # decoded; outside: waiting for the full logits of a draw that fell outside a table;
    # running: decoding its own tokens; finished; hopeless: certainly rejected.
    state: str = "coupled"
    table: TokenTable | None = None  # the table an "outside" draw must avoid
    # Whether its slot holds its own cache: the prompt plus its first ``cached`` tokens.
    # A coupled proposal's slot is stale (nothing of it was decoded); it gets the current
    # sequence's cells when it first differs from it, or when it is accepted as it is.
    owns_cache: bool = False
    rng: np.random.Generator | None = None  # this MH step's own random stream


class Chain:
    """One independent Markov chain (or one plain decode, for the baselines).

    MH steps are taken in rounds: ``width`` proposals are drawn from the current state and
    decoded together in one batch, then used in order while they are rejected; the first
    accepted one ends the round and the rest are discarded. Each proposal is an independent
    draw from the state it is used in, so the chain is exactly the sequential one.

    Randomness: every MH step and every block's extension draws from its own stream, derived
    from (chain seed, step), so a chain's tokens do not depend on the round width, on which
    chains share a batch, or on how many chains run (exact on the numpy toy; on llama.cpp a
    different batch can still change floating-point logits).

    Cache invariant: whenever a trajectory owns its slot, the slot holds exactly the prompt
    plus the trajectory's first ``cached`` tokens. Every decode request checks it.
    """

    def __init__(self, spec: RunSpec, rungs: Sequence[Rung] = (), rung: int = 0,
                 token_sampler: TokenSampler | None = None):
        """``rungs``, ``rung``: the (alpha, temperature) of every replica of a tempering ladder
        this chain is replica ``rung`` of (samplers.ppt); its sequences then carry every rung's
        weights. ``token_sampler``: one to share (its buffers are vocabulary-sized) instead of a
        new one; it must have this chain's temperature, alpha and table size (samplers.smc's
        rejuvenation moves: one per particle)."""
        settings, engine = spec.settings, spec.engine
        self.engine = engine
        # Only a plain decode's tokens are final as they are drawn: a later MH step may change
        # any token of a power sample, so those are never reported early.
        self.on_token = spec.on_token if settings.steps_per_block == 0 else None
        self.max_round_width = spec.round_width
        self.settings = settings
        self.prompt = list(spec.prompt)
        self.slots = list(spec.slots)  # the first holds the initial sequence; 1 + max round width
        # Slot 0 for the block extensions, one per proposal of a round after it.
        self.streams = Streams(spec.chain_seed, 1 + spec.round_width)
        self.rng: np.random.Generator  # the extension stream of the block being grown: set in run_block()
        self.stops = spec.stops
        self.index = spec.index
        self.progress = spec.progress
        self.temperature = settings.temperature
        self.token_sampler = token_sampler or TokenSampler(engine.n_vocab, self.temperature, settings.alpha,
                                                           settings.table_size, rungs, rung)
        self.ends = block_ends(settings.token_budget, settings.effective_block_size)
        # A proposal at m draws x'_m, x'_m+1, ... from the same distributions as the current
        # sequence did until it first differs from it: kept as tables, those cost no decoding.
        self.reuse_tables = settings.reuse_tables and settings.steps_per_block > 0
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
            seed=spec.seed,
            chain=spec.index,
            prompt_tokens=len(self.prompt),
        )
        self._start = time.perf_counter()
        self._rounds_without_decode = 0
        self._block = 0  # the block being run, and the chain's MH steps before its first
        self._block_first_step = 0
        self._steps_this_block = settings.steps_per_block
        self._steps_done = 0  # MH steps taken in the block so far
        # Events (ps_local.trace), only when a trace is written: a replica of a ladder names its rung.
        self.trace = spec.trace
        if self.trace is not None:
            replica = {"replica": rung, "alpha": settings.alpha} if rungs else {}
            self._trace_fields = self.trace.fields(chain=spec.index, **replica)

    # -- the chain ---------------------------------------------------------------------

    def run(self, prompt_logits: np.ndarray) -> ChainRun:
        """Algorithm 1. ``prompt_logits`` predict the first generated token; every slot
        already holds the prompt."""
        current = Trajectory(self.slots[0], cached=0)
        for block in range(1, len(self.ends) + 1):
            current = yield from self.run_block(current, block, prompt_logits if block == 1 else None)
            if current.end is not None:
                break
        return self._finish(current)

    def run_block(self, current: Trajectory, block: int, next_logits: np.ndarray | None) -> ChainRun:
        """Block ``block`` of Algorithm 1 from ``current``: extend it to the block's end (or an
        end of sequence), then the block's MH steps; returns the chain's new sequence.
        ``next_logits``: the logits that predict ``current``'s next token, when known."""
        yield from self.extend_block(current, block, next_logits)
        return (yield from self.take_steps(current, self._steps_this_block))

    def extend_block(self, current: Trajectory, block: int, next_logits: np.ndarray | None) -> ChainRun:
        """The first half of ``run_block``: extend ``current`` (in place) and fix the block's
        number of MH steps (``_steps_this_block``; a tempering ladder may set it for all its
        replicas before their first step)."""
        limit = self.ends[block - 1]
        self.rng = self.streams.start(EXTEND_STREAM, block)
        before = len(current.tokens)
        yield from self._extend(current, limit, next_logits)
        self._block, self._block_first_step = block, self.stats.mh_steps
        if self.trace is not None and self.settings.steps_per_block:
            self.trace.emit({"event": "block", **self._trace_fields, "block": block, "blocks": len(self.ends),
                             "end": limit, "tokens_before": before, "tokens": len(current.tokens),
                             "logp": current.cum_logp[-1], "ended": current.end,
                             "tokens_decoded": self.stats.tokens_decoded})
        # The count is fixed before the block's first step, from the extended sequence's length.
        self._steps_this_block = self.settings.block_steps(len(current.tokens))
        self._steps_done = 0

    def take_steps(self, current: Trajectory, count: int) -> ChainRun:
        """The second half of ``run_block``: up to ``count`` more of the block's MH steps from
        ``current`` (a tempering ladder swaps sequences between its replicas' calls); returns
        the chain's new sequence."""
        limit = self.ends[self._block - 1]
        stop = min(self._steps_this_block, self._steps_done + count)
        while self._steps_done < stop:
            decoded = self.stats.tokens_decoded
            current, used = yield from self._mh_round(current, limit, stop - self._steps_done)
            self._steps_done += used
            self._report(self._block, len(self.ends), self._steps_done, current)
            if self.stats.tokens_decoded == decoded:
                # Proposals drawn from stored tables need no decode, so a chain could run
                # thousands of steps without returning to its driver: pause now and then,
                # so that other chains advance and a cancellation is seen. Draws nothing.
                self._rounds_without_decode += 1
                if self._rounds_without_decode % PAUSE_EVERY == 0:
                    yield []
        return current

    def _extend(self, trajectory: Trajectory, limit: int, next_logits: np.ndarray | None) -> ChainRun:
        """Grow the current sequence from the proposal until ``limit`` tokens or an end."""
        while len(trajectory.tokens) < limit and trajectory.end is None:
            if next_logits is None:
                pending = trajectory.tokens[trajectory.cached :]
                (next_logits,) = yield [self._request(trajectory, pending)]
                trajectory.cached += len(pending)
                self.stats.tokens_decoded += len(pending)
            self._append(trajectory, next_logits)
            next_logits = None

    def _append(self, trajectory: Trajectory, logits: np.ndarray) -> None:
        draw, table = self.token_sampler.draw_with_table(logits, self.rng, with_table=self.reuse_tables)
        self._record(trajectory, draw, table)

    def _record(self, trajectory: Trajectory, draw: TokenDraw, table: TokenTable | None) -> None:
        trajectory.append(draw, table)
        trajectory.end = ending(self.engine, self.stops, trajectory.tokens)
        if self.on_token is not None and trajectory.end is None:
            # Not the token that ends it: a stop string it completes is cut from the final text.
            self.on_token(self.index, trajectory.tokens)

    def _round_width(self, steps_left: int) -> int:
        """How many proposals to decode together: about the expected number of rejections
        before an acceptance (1 / acceptance rate), so that few are wasted."""
        if self.max_round_width <= 1:
            return 1
        acceptance = (self.stats.accepted + 1) / (self.stats.mh_steps + 2)
        return max(1, min(int(1 / acceptance), self.max_round_width, steps_left))

    def _mh_round(self, current: Trajectory, limit: int, steps_left: int) -> ChainRun:
        """Up to ``steps_left`` MH steps from ``current``; returns (new current, steps used)."""
        n = len(current.tokens)
        log_n = math.log(n)
        free = [slot for slot in self.slots if slot != current.slot]
        moves = []
        for offset, slot in enumerate(free[: self._round_width(steps_left)]):
            # Step k of the chain draws from stream k whichever round it lands in, so a
            # proposal discarded after an acceptance is drawn again, identically, from the
            # new state: the chain is the width-1 chain token for token.
            rng = self.streams.start(MH_STREAM, self.stats.mh_steps + offset, slot=1 + offset)
            keep = int(rng.integers(1, n + 1)) - 1  # resample index m = keep + 1, uniform
            # Drawn before the proposal so that decoding can stop once rejection is certain.
            log_u = math.log(rng.random() or 5e-324)
            move = Move(current.prefix(slot, keep), keep, log_u, self._suffix_score(current, keep), rng=rng)
            if not self.reuse_tables:
                # The plain chain: decode x_{m-1} again for the logits that predict x_m.
                self._branch(move, current, keep - 1, "running")
                self.stats.tokens_reevaluated += 1
            moves.append(move)
        self.stats.widest_round = max(self.stats.widest_round, len(moves))

        used = 0
        while True:
            for move in moves[used:]:
                if move.state == "coupled":
                    self._walk(move, current, limit, log_n)
            # Decide moves in order; the first acceptance ends the round.
            while used < len(moves) and moves[used].state in ("finished", "hopeless"):
                move = moves[used]
                used += 1
                self._count(move)
                if move.state == "finished" and self._accepts(move, log_n):
                    self.stats.accepted += 1
                    proposal = move.proposal
                    moved = proposal.tokens != current.tokens or proposal.end != current.end
                    if moved:
                        self.stats.moved += 1
                    if self.trace is not None:
                        self._trace_step(move, current, log_n, True, moved)
                    if not move.owns_cache:
                        self._adopt_cache(proposal, current)
                    self._check_cache(proposal)
                    for discarded in moves[used:]:
                        self.stats.discarded_tokens += len(discarded.proposal.tokens) - discarded.keep
                    return move.proposal, used
                if self.trace is not None:
                    self._trace_step(move, current, log_n, False, False)
            if used == len(moves):
                return current, used
            waiting = [move for move in moves[used:] if move.state in ("running", "outside")]
            rows = yield [self._request(move.proposal, move.pending) for move in waiting]
            for move, row in zip(waiting, rows):
                move.proposal.cached += len(move.pending)
                self.stats.tokens_decoded += len(move.pending)
                if move.state == "outside":
                    draw, _ = self.token_sampler.draw_with_table(row, move.rng, with_table=False, exclude=move.table)
                    self._take(move, draw, move.table, current, limit, log_n)
                else:
                    draw, table = self.token_sampler.draw_with_table(row, move.rng, with_table=self.reuse_tables)
                    self._take(move, draw, table, None, limit, log_n)

    def _walk(self, move: Move, current: Trajectory, limit: int, log_n: float) -> None:
        """Draw a coupled proposal's tokens from the current sequence's tables until it
        differs from the current sequence, ends, or needs the model."""
        proposal = move.proposal
        while move.state == "coupled":
            position = len(proposal.tokens)
            if position == len(current.tokens):
                proposal.end = current.end  # the same sequence again
                move.state = "finished"
                return
            table = current.tables[position]
            draw = self.token_sampler.draw_from_table(table, move.rng) if table is not None else None
            if draw is None:
                # Outside the table: decode the token before this position again for the
                # full logits, then draw among the tokens the table leaves out.
                self._branch(move, current, position - 1, "outside")
                move.table = table
                self.stats.tokens_reevaluated += 1
                return
            self.stats.reused_tokens += 1
            self._take(move, draw, table, current, limit, log_n)

    def _take(
        self,
        move: Move,
        draw: TokenDraw,
        table: TokenTable | None,
        current: Trajectory | None,
        limit: int,
        log_n: float,
    ) -> None:
        """Add a drawn token to a proposal and move it on. ``current``: the sequence the
        proposal is still coupled to (None once it decodes its own tokens)."""
        proposal = move.proposal
        position = len(proposal.tokens)
        self._record(proposal, draw, table)
        if proposal.end is not None or len(proposal.tokens) >= limit:
            move.state = "finished"
        elif self.early_rejection and not self._may_accept(move, log_n):
            move.state = "hopeless"
        elif current is not None and draw.token == current.tokens[position]:
            # Equal to the current sequence again (also after a draw outside a table that
            # landed on the current token): back to its tables. Whatever the slot holds is
            # stale from here; the next divergence or an acceptance copies the cells anew.
            move.state = "coupled"
            move.owns_cache = False
        elif current is not None and not move.owns_cache:
            # The first token of its own: the cache needs the shared prefix, then this token.
            self._branch(move, current, position, "running")
        else:
            # Decoding its own tokens (or just past a draw outside a table, whose position's
            # logits it decoded into its own slot): the next token goes on top.
            move.state = "running"
            move.pending = [draw.token]

    def _adopt_cache(self, proposal: Trajectory, current: Trajectory) -> None:
        """An accepted proposal that never decoded: its slot takes the shared prefix's cache."""
        shared = 0
        for mine, theirs in zip(proposal.tokens, current.tokens):
            if mine != theirs:
                break
            shared += 1
        proposal.cached = min(shared, current.cached)
        self.engine.copy_prefix(current.slot, proposal.slot, len(self.prompt) + proposal.cached)

    def _branch(self, move: Move, current: Trajectory, shared: int, state: str) -> None:
        """Give the proposal's slot the current sequence's cache for the prompt and the first
        ``shared`` generated tokens, and queue the proposal's next token for decoding."""
        self.engine.copy_prefix(current.slot, move.proposal.slot, len(self.prompt) + shared)
        move.proposal.cached = shared
        # shared = -1 branches inside the prompt: its last token is decoded again.
        move.pending = [move.proposal.tokens[shared] if shared >= 0 else self.prompt[-1]]
        move.state = state
        move.owns_cache = True

    def _request(self, trajectory: Trajectory, tokens: list[int]) -> DecodeRequest:
        """A decode request appending ``tokens`` to a trajectory's slot, invariant checked:
        what it appends must be the trajectory's next tokens after its first ``cached``."""
        self._check_cache(trajectory)
        start = trajectory.cached
        following = (
            trajectory.tokens[start : start + len(tokens)]
            if start >= 0
            else self.prompt[-1:] + trajectory.tokens[: len(tokens) - 1]  # a branch inside the prompt
        )
        if tokens != following:
            raise CacheInvariantError(f"slot {trajectory.slot} would get tokens {tokens}, its trajectory has {following}")
        return trajectory.slot, tokens

    def _check_cache(self, trajectory: Trajectory) -> None:
        check_cache(self.engine, self.prompt, trajectory.slot, trajectory.tokens, trajectory.cached)

    def _may_accept(self, move: Move, log_n: float) -> bool:
        """Whether the move can still be accepted, whatever tokens would follow."""
        score = self._suffix_score(move.proposal, move.keep)
        if self.max_swap:
            return score > move.current_score  # log p only falls as the proposal grows
        bound = score - move.current_score + self._length_term(log_n, len(move.proposal.tokens))
        # The slack absorbs float rounding in weights that are <= 0 only mathematically.
        return bound + 1e-9 > move.log_u

    def _accepts(self, move: Move, log_n: float) -> bool:
        if self.max_swap:
            return self._suffix_score(move.proposal, move.keep) > move.current_score
        return move.log_u < self._log_accept(move, log_n)

    def _log_accept(self, move: Move, log_n: float) -> float:
        """log A of the MH ratio for a finished proposal (for one abandoned early: the bound on
        it that fell below log u)."""
        proposal_score = self._suffix_score(move.proposal, move.keep)
        return proposal_score - move.current_score + self._length_term(log_n, len(move.proposal.tokens))

    def _count(self, move: Move) -> None:
        self.stats.mh_steps += 1
        self.stats.proposal_tokens += len(move.proposal.tokens) - move.keep
        if move.state == "hopeless":
            self.stats.early_rejections += 1

    def _suffix_score(self, trajectory: Trajectory, keep: int) -> float:
        sums = trajectory.cum_logp if self.max_swap else trajectory.cum_weight
        return sums[-1] - sums[keep]

    def _length_term(self, log_n: float, proposal_length: int) -> float:
        return log_n - math.log(proposal_length) if self.settings.length_term else 0.0

    def _trace_step(self, move: Move, current: Trajectory, log_n: float, accepted: bool, moved: bool) -> None:
        """The event of one decided MH step (ps_local.trace)."""
        proposal = move.proposal
        logp_current, logp_proposal = current.cum_logp[-1], proposal.cum_logp[-1]
        if self.max_swap:
            # A = 1 when the proposal's suffix is likelier, else 0 (log A = -inf: null).
            log_accept = 0.0 if accepted else None
            target_current = target_proposal = None
        else:
            log_accept = self._log_accept(move, log_n)
            alpha = self.settings.alpha
            target_current, target_proposal = alpha * logp_current, alpha * logp_proposal
        self.trace.emit({  # type: ignore[union-attr]
            "event": "mh", **self._trace_fields, "block": self._block,
            "step": self.stats.mh_steps - self._block_first_step, "mh_step": self.stats.mh_steps,
            "m": move.keep + 1, "n": len(current.tokens), "n_proposal": len(proposal.tokens),
            "logp_current": logp_current, "logp_proposal": logp_proposal,
            "target_current": target_current, "target_proposal": target_proposal,
            "log_accept": log_accept, "log_u": move.log_u, "early_rejected": move.state == "hopeless",
            "accepted": accepted, "moved": moved, "tokens_decoded": self.stats.tokens_decoded,
        })

    # -- results -----------------------------------------------------------------------

    def _report(self, block: int, blocks: int, step: int, current: Trajectory) -> None:
        if self.progress is not None:
            self.progress(
                Progress(
                    chain=self.index,
                    block=block,
                    blocks=blocks,
                    mh_step=step,
                    mh_steps=self._steps_this_block,
                    accepted=self.stats.accepted,
                    proposals=self.stats.mh_steps,
                    tokens_decoded=self.stats.tokens_decoded,
                    elapsed_s=time.perf_counter() - self._start,
                    tokens=tuple(current.tokens),
                    logp=current.cum_logp[-1],
                )
            )

    def final_stats(self) -> SampleStats:
        """The chain's statistics, with its acceptance rate, once its last step is taken."""
        self.stats.acceptance_rate = self.stats.accepted / self.stats.mh_steps if self.stats.mh_steps else None
        return self.stats

    def _finish(self, current: Trajectory) -> Sample:
        return finished_sample(self.engine, self.stops, self.prompt, current.tokens, current.logp, current.end,
                               self.final_stats(), self._start)
