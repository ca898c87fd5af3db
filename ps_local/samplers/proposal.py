"""Drawing one token from raw logits, with what the MH ratio needs about it.

The proposal is plain temperature sampling over the whole vocabulary, q(v) ∝ p(v)^(1/τ):
no top-k, top-p or min-p, because the acceptance ratio must describe q exactly.

This runs once per generated token on a vocabulary of up to ~262k entries (Gemma), so it
makes a few float32 passes into preallocated buffers and samples through block sums
instead of a full cumulative sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
from ..settings import TABLE_SIZE

BLOCK = 512  # tokens per block of the two-level inverse-CDF sampling
TABLE_FLOOR = 1e-7  # tokens with less than this share of the proposal's mass stay out of tables


@dataclass(frozen=True)
class TokenDraw:
    token: int
    logp: float  # log p(token) under the base model (temperature 1)
    log_weight: float  # alpha * log p - log q: the token's share of log A


@dataclass(frozen=True)
class TokenTable:
    """The proposal at one position, kept compactly: its likely tokens with their weights.

    A proposal that resamples the same prefix draws from the table instead of decoding it
    again; a draw that lands in the mass outside the table needs the full logits (rare).
    """

    ids: np.ndarray  # token ids, most of the proposal's mass
    shifted: np.ndarray  # their logits minus the row maximum
    cumulative: np.ndarray  # running sum of their proposal weights (float64)
    total: float  # the row's whole proposal weight
    log_norm: float  # log of sum(exp(shifted)) over the whole row


class TokenSampler:
    """Samples from softmax(logits / temperature); temperature 0 means argmax."""

    def __init__(self, n_vocab: int, temperature: float, alpha: float, table_size: int = TABLE_SIZE):
        self.temperature = temperature
        self.table_size = table_size
        self.alpha = alpha
        self.n_vocab = n_vocab
        padded = -(-n_vocab // BLOCK) * BLOCK
        # Zero padding up to a whole number of blocks: padded entries have no weight.
        self._weights = np.zeros(padded, dtype=np.float32)
        self._shifted = np.empty(n_vocab, dtype=np.float32)

    def draw(self, logits: np.ndarray, rng: np.random.Generator) -> TokenDraw:
        return self.draw_with_table(logits, rng, with_table=False)[0]

    def draw_with_table(
        self, logits: np.ndarray, rng: np.random.Generator, with_table: bool = True, exclude: TokenTable | None = None
    ) -> tuple[TokenDraw, TokenTable | None]:
        """Draw a token; also return the position's table when asked.

        ``exclude``: draw only among the tokens outside that table (its complement), the
        second stage of a draw that landed outside it.
        """
        peak = float(logits.max())
        if not math.isfinite(peak):
            # NaN anywhere makes the maximum NaN; +inf makes it inf; all -inf leaves no token.
            raise ModelError(f"the model returned non-finite logits (maximum {peak}); its weights or build may be broken")
        shifted = np.subtract(logits, peak, out=self._shifted)
        weights = self._weights[: self.n_vocab]
        np.exp(shifted, out=weights)
        log_norm = math.log(float(weights.sum(dtype=np.float64)))
        if self.temperature == 0.0:
            token = int(shifted.argmax())
            return self._scored(token, float(shifted[token]), log_norm, 0.0), None
        if self.temperature != 1.0:
            np.multiply(shifted, 1.0 / self.temperature, out=weights)
            np.exp(weights, out=weights)
        block_sums = self._weights.reshape(-1, BLOCK).sum(axis=1, dtype=np.float64)
        total = float(block_sums.sum())
        table = self._table(shifted, total, log_norm) if with_table else None
        if exclude is not None:
            weights[exclude.ids] = 0.0
            block_sums = self._weights.reshape(-1, BLOCK).sum(axis=1, dtype=np.float64)
            if not block_sums.sum() > 0:
                # Rounding alone sent the draw outside a table that holds all the mass: draw
                # inside it again (its most likely token if rounding strikes twice).
                inside = self.draw_from_table(exclude, rng)
                if inside is None:
                    inside = self._scored(int(exclude.ids[0]), float(exclude.shifted[0]), log_norm, math.log(total))
                return inside, table
        token = self._inverse_cdf(block_sums, rng.random())
        return self._scored(token, float(shifted[token]), log_norm, math.log(total)), table

    def draw_from_table(self, table: TokenTable, rng: np.random.Generator) -> TokenDraw | None:
        """A draw from the position's full proposal, or None when it falls outside the table."""
        target = rng.random() * table.total
        index = int(np.searchsorted(table.cumulative, target, side="right"))
        if index == len(table.ids):
            return None
        return self._scored(int(table.ids[index]), float(table.shifted[index]), table.log_norm, math.log(table.total))

    def _scored(self, token: int, shifted_token: float, log_norm: float, log_total: float) -> TokenDraw:
        logp = shifted_token - log_norm
        if math.isinf(self.alpha):
            return TokenDraw(token, logp, 0.0)  # max-swap compares sums of log p instead
        if self.temperature == 0.0:
            return TokenDraw(token, logp, self.alpha * logp)
        log_q = shifted_token / self.temperature - log_total
        return TokenDraw(token, logp, self.alpha * logp - log_q)

    def _table(self, shifted: np.ndarray, total: float, log_norm: float) -> TokenTable:
        weights = self._weights[: self.n_vocab]
        ids = np.flatnonzero(weights > total * TABLE_FLOOR)
        if len(ids) > self.table_size:
            ids = ids[np.argpartition(weights[ids], -self.table_size)[-self.table_size :]]
        ids = ids[np.argsort(-weights[ids], kind="stable")]
        cumulative = np.cumsum(weights[ids], dtype=np.float64)
        return TokenTable(ids, shifted[ids].copy(), cumulative, total, log_norm)

    def _inverse_cdf(self, block_sums: np.ndarray, u: float) -> int:
        """The token whose cumulative weight first exceeds u times the total weight."""
        cumulative = np.cumsum(block_sums)
        target = u * float(cumulative[-1])
        block = min(int(np.searchsorted(cumulative, target, side="right")), len(block_sums) - 1)
        start = block * BLOCK
        within = target - (float(cumulative[block - 1]) if block else 0.0)
        local = np.cumsum(self._weights[start : start + BLOCK], dtype=np.float64)
        offset = int(np.searchsorted(local, within, side="right"))
        if offset >= BLOCK:
            # Rounding put the target past the block's last weight: take its last real token.
            offset = int(np.flatnonzero(self._weights[start : start + BLOCK])[-1])
        return start + offset


def draw_token(logits: np.ndarray, temperature: float, alpha: float, rng: np.random.Generator) -> TokenDraw:
    """One draw with a throwaway sampler (tests and one-off use)."""
    return TokenSampler(len(logits), temperature, alpha).draw(np.asarray(logits, dtype=np.float32), rng)
