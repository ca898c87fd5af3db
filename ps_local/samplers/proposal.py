"""Drawing one token from raw logits, with what the MH ratio and the SMC weights need about it.

The proposal is plain temperature sampling over the whole vocabulary, q(v) ∝ p(v)^(1/τ):
no top-k, top-p or min-p, because the acceptance ratio must describe q exactly.

This runs once per generated token on a vocabulary of up to ~262k entries (Gemma), so it
makes a few float32 passes into preallocated buffers and samples through block sums
instead of a full cumulative sum.

A sampler may belong to a ladder of targets (parallel tempering: replica j samples p^α_j with
its own temperature τ_j). A sequence then moves between replicas, so every draw also scores its
token for every rung, and every table keeps each rung's normalizer: whichever replica holds the
sequence can weigh it and draw from its tables without decoding anything again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import ModelError
from ..settings import TABLE_SIZE

BLOCK = 512  # tokens per block of the two-level inverse-CDF sampling
TABLE_FLOOR = 1e-7  # tokens with less than this share of the proposal's mass stay out of tables

Rung = tuple[float, float]  # (alpha, temperature) of one replica of a ladder


@dataclass(frozen=True)
class TokenDraw:
    token: int
    logp: float  # log p(token) under the base model (temperature 1)
    log_weight: float  # alpha * log p - log q: the token's share of log A
    rung_weights: np.ndarray | None = None  # the same for every rung of a ladder (None without one)


@dataclass
class TokenTable:
    """The proposal at one position, kept compactly: its likely tokens with their weights.

    A proposal that resamples the same prefix draws from the table instead of decoding it
    again; a draw that lands in the mass outside the table needs the full logits (rare).
    """

    ids: np.ndarray  # token ids, most of the proposal's mass
    shifted: np.ndarray  # their logits minus the row maximum
    cumulative: np.ndarray  # running sum of their proposal weights (float64), at the builder's rung
    total: float  # the row's whole proposal weight, at the builder's rung
    log_norm: float  # log of sum(exp(shifted)) over the whole row
    rung: int = 0  # the ladder rung whose sampler built it
    log_totals: np.ndarray | None = None  # log of the row's proposal weight at every rung of a ladder
    _other_rungs: dict[int, np.ndarray] = field(default_factory=dict)  # cumulative sums, made when needed

    def at(self, rung: int, temperature: float) -> tuple[np.ndarray, float]:
        """(cumulative weights, the row's total weight) of this position's proposal at ``rung``."""
        if rung == self.rung:
            return self.cumulative, self.total
        assert self.log_totals is not None, "a table built without a ladder serves its own rung only"
        cumulative = self._other_rungs.get(rung)
        if cumulative is None:
            weights = np.exp(np.multiply(self.shifted, np.float32(1.0 / temperature)))
            cumulative = self._other_rungs[rung] = np.cumsum(weights, dtype=np.float64)
        return cumulative, math.exp(float(self.log_totals[rung]))  # type: ignore[index]


@dataclass
class Prepared:
    """One position's proposal, ready for any number of draws (``TokenSampler.prepare``)."""

    shifted: np.ndarray  # logits minus their maximum
    weights: np.ndarray  # proposal weights, zero-padded to whole blocks
    block_sums: np.ndarray  # the weights' sum per block (float64)
    log_norm: float  # log sum(exp(shifted)): log p = shifted - log_norm
    log_total: float  # log of the proposal's total weight

    def log_z(self, alpha: float) -> float:
        """alpha log p(v) - log q(v) for every v, when the proposal's temperature is 1/alpha:
        log Z = log sum_v p(v)^alpha, known before any token is drawn."""
        return self.log_total - alpha * self.log_norm


class TokenSampler:
    """Samples from softmax(logits / temperature); temperature 0 means argmax.

    ``rungs``: the (alpha, temperature) of every replica of a tempering ladder this sampler is
    rung ``rung`` of; draws then carry ``rung_weights`` and tables every rung's normalizer.
    """

    def __init__(self, n_vocab: int, temperature: float, alpha: float, table_size: int = TABLE_SIZE,
                 rungs: Sequence[Rung] = (), rung: int = 0):
        self.temperature = temperature
        self.table_size = table_size
        self.alpha = alpha
        self.n_vocab = n_vocab
        self.rungs = list(rungs)
        self.rung = rung
        self._padded = -(-n_vocab // BLOCK) * BLOCK
        # Zero padding up to a whole number of blocks: padded entries have no weight.
        self._weights = np.zeros(self._padded, dtype=np.float32)
        self._shifted = np.empty(n_vocab, dtype=np.float32)
        self._scratch = np.zeros(self._padded, dtype=np.float32) if self.rungs else None

    def retargeted(self, temperature: float, alpha: float) -> "TokenSampler":
        """A sampler of another temperature and alpha sharing this one's buffers (draws are
        made one at a time, so they never need both at once)."""
        assert not self.rungs, "a ladder's rungs fix each sampler's temperature and alpha"
        other = object.__new__(TokenSampler)
        other.__dict__.update(self.__dict__, temperature=temperature, alpha=alpha)
        return other

    def draw(self, logits: np.ndarray, rng: np.random.Generator) -> TokenDraw:
        return self.draw_with_table(logits, rng, with_table=False)[0]

    def prepare(self, logits: np.ndarray, keep: bool = False) -> Prepared:
        """The proposal of one logits row (temperature > 0). Without ``keep`` it lives in this
        sampler's buffers, valid until its next call; with ``keep`` in arrays of its own."""
        peak = float(logits.max())
        if not math.isfinite(peak):
            # NaN anywhere makes the maximum NaN; +inf makes it inf; all -inf leaves no token.
            raise ModelError(f"the model returned non-finite logits (maximum {peak}); its weights or build may be broken")
        padded = np.zeros(self._padded, dtype=np.float32) if keep else self._weights
        shifted = np.subtract(logits, peak, out=None if keep else self._shifted, dtype=np.float32)
        weights = padded[: self.n_vocab]
        np.exp(shifted, out=weights)
        log_norm = math.log(float(weights.sum(dtype=np.float64)))
        if self.temperature != 1.0 and self.temperature != 0.0:
            _temper(shifted, self.temperature, weights)  # at temperature 1 the pass above gave them
        block_sums = _block_sums(padded)
        return Prepared(shifted, padded, block_sums, log_norm, math.log(float(block_sums.sum())))

    def table_of(self, prepared: Prepared) -> TokenTable:
        """The table of a prepared proposal: the one ``draw_with_table`` keeps for the same row
        (no ladder). Particles that share the row may share it."""
        assert not self.rungs, "a ladder's tables keep every rung's normalizer: use draw_with_table"
        return self._table(prepared.shifted, float(prepared.block_sums.sum()), prepared.log_norm, None,
                           prepared.weights[: self.n_vocab])

    def draw_prepared(self, prepared: Prepared, u: float) -> TokenDraw:
        """The token at uniform ``u`` of a prepared proposal (no tables, no ladder)."""
        token = self._inverse_cdf(prepared.weights, prepared.block_sums, u)
        return self._scored(token, float(prepared.shifted[token]), prepared.log_norm, prepared.log_total)

    def draw_with_table(
        self, logits: np.ndarray, rng: np.random.Generator, with_table: bool = True, exclude: TokenTable | None = None
    ) -> tuple[TokenDraw, TokenTable | None]:
        """Draw a token; also return the position's table when asked.

        ``exclude``: draw only among the tokens outside that table (its complement), the
        second stage of a draw that landed outside it.
        """
        prepared = self.prepare(logits)
        shifted, log_norm = prepared.shifted, prepared.log_norm
        if self.temperature == 0.0:
            token = int(shifted.argmax())
            return self._scored(token, float(shifted[token]), log_norm, 0.0), None
        log_totals = self._rung_log_totals(prepared)
        total = float(prepared.block_sums.sum())
        table = self._table(shifted, total, log_norm, log_totals) if with_table else None
        block_sums = prepared.block_sums
        if exclude is not None:
            self._weights[exclude.ids] = 0.0
            block_sums = _block_sums(self._weights)
            if not block_sums.sum() > 0:
                # Rounding alone sent the draw outside a table that holds all the mass: draw
                # inside it again (its most likely token if rounding strikes twice).
                inside = self.draw_from_table(exclude, rng)
                if inside is None:
                    inside = self._scored(int(exclude.ids[0]), float(exclude.shifted[0]), log_norm,
                                          prepared.log_total, log_totals)
                return inside, table
        token = self._inverse_cdf(self._weights, block_sums, rng.random())
        return self._scored(token, float(shifted[token]), log_norm, prepared.log_total, log_totals), table

    def draw_from_table(self, table: TokenTable, rng: np.random.Generator) -> TokenDraw | None:
        """A draw from the position's full proposal, or None when it falls outside the table."""
        cumulative, total = table.at(self.rung, self.temperature)
        target = rng.random() * total
        index = int(np.searchsorted(cumulative, target, side="right"))
        if index == len(table.ids):
            return None
        return self._scored(int(table.ids[index]), float(table.shifted[index]), table.log_norm, math.log(total),
                            table.log_totals)

    def _rung_log_totals(self, prepared: Prepared) -> np.ndarray | None:
        """log of the row's proposal weight at every rung (this one's is already known)."""
        if not self.rungs:
            return None
        scratch = self._scratch
        totals = np.empty(len(self.rungs))
        for number, (_, temperature) in enumerate(self.rungs):
            if number == self.rung:
                totals[number] = prepared.log_total
                continue
            # The same passes and the same summation order as that rung's own prepare().
            _temper(prepared.shifted, temperature, scratch[: self.n_vocab])  # type: ignore[index]
            totals[number] = math.log(float(_block_sums(scratch).sum()))  # type: ignore[arg-type]
        return totals

    def _scored(self, token: int, shifted_token: float, log_norm: float, log_total: float,
                log_totals: np.ndarray | None = None) -> TokenDraw:
        logp = shifted_token - log_norm
        if math.isinf(self.alpha):
            return TokenDraw(token, logp, 0.0)  # max-swap compares sums of log p instead
        if self.temperature == 0.0:
            return TokenDraw(token, logp, self.alpha * logp)
        if log_totals is not None:
            rung_weights = np.array([alpha * logp - (shifted_token / temperature - log_totals[number])
                                     for number, (alpha, temperature) in enumerate(self.rungs)])
            return TokenDraw(token, logp, float(rung_weights[self.rung]), rung_weights)
        log_q = shifted_token / self.temperature - log_total
        return TokenDraw(token, logp, self.alpha * logp - log_q)

    def _table(self, shifted: np.ndarray, total: float, log_norm: float, log_totals: np.ndarray | None,
               weights: np.ndarray | None = None) -> TokenTable:
        if weights is None:
            weights = self._weights[: self.n_vocab]
        ids = np.flatnonzero(weights > total * TABLE_FLOOR)
        if len(ids) > self.table_size:
            ids = ids[np.argpartition(weights[ids], -self.table_size)[-self.table_size :]]
        ids = ids[np.argsort(-weights[ids], kind="stable")]
        cumulative = np.cumsum(weights[ids], dtype=np.float64)
        return TokenTable(ids, shifted[ids].copy(), cumulative, total, log_norm, self.rung, log_totals)

    def _inverse_cdf(self, weights: np.ndarray, block_sums: np.ndarray, u: float) -> int:
        """The token whose cumulative weight first exceeds u times the total weight."""
        cumulative = np.cumsum(block_sums)
        target = u * float(cumulative[-1])
        block = min(int(np.searchsorted(cumulative, target, side="right")), len(block_sums) - 1)
        start = block * BLOCK
        within = target - (float(cumulative[block - 1]) if block else 0.0)
        local = np.cumsum(weights[start : start + BLOCK], dtype=np.float64)
        offset = int(np.searchsorted(local, within, side="right"))
        if offset >= BLOCK:
            # Rounding put the target past the block's last weight: take its last real token.
            offset = int(np.flatnonzero(weights[start : start + BLOCK])[-1])
        return start + offset


def _temper(shifted: np.ndarray, temperature: float, out: np.ndarray) -> None:
    """Proposal weights exp(shifted / temperature) into ``out`` (float32)."""
    if temperature == 1.0:
        np.exp(shifted, out=out)
    else:
        np.multiply(shifted, 1.0 / temperature, out=out)
        np.exp(out, out=out)


def _block_sums(padded: np.ndarray) -> np.ndarray:
    """Sums of zero-padded weights per block of the two-level sampling (float64)."""
    return padded.reshape(-1, BLOCK).sum(axis=1, dtype=np.float64)


def draw_token(logits: np.ndarray, temperature: float, alpha: float, rng: np.random.Generator) -> TokenDraw:
    """One draw with a throwaway sampler (tests and one-off use)."""
    return TokenSampler(len(logits), temperature, alpha).draw(np.asarray(logits, dtype=np.float32), rng)
