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

BLOCK = 512  # tokens per block of the two-level inverse-CDF sampling


@dataclass(frozen=True)
class TokenDraw:
    token: int
    logp: float  # log p(token) under the base model (temperature 1)
    log_weight: float  # alpha * log p - log q: the token's share of log A


class TokenSampler:
    """Samples from softmax(logits / temperature); temperature 0 means argmax."""

    def __init__(self, n_vocab: int, temperature: float, alpha: float):
        self.temperature = temperature
        self.alpha = alpha
        self.n_vocab = n_vocab
        padded = -(-n_vocab // BLOCK) * BLOCK
        # Zero padding up to a whole number of blocks: padded entries have no weight.
        self._weights = np.zeros(padded, dtype=np.float32)
        self._shifted = np.empty(n_vocab, dtype=np.float32)

    def draw(self, logits: np.ndarray, rng: np.random.Generator) -> TokenDraw:
        shifted = np.subtract(logits, logits.max(), out=self._shifted)
        weights = self._weights[: self.n_vocab]
        np.exp(shifted, out=weights)
        log_norm = math.log(float(weights.sum(dtype=np.float64)))
        if self.temperature == 0.0:
            token = int(shifted.argmax())
            logp = float(shifted[token]) - log_norm
            return TokenDraw(token, logp, 0.0 if math.isinf(self.alpha) else self.alpha * logp)
        if self.temperature != 1.0:
            np.multiply(shifted, 1.0 / self.temperature, out=weights)
            np.exp(weights, out=weights)
        token, log_total = self._inverse_cdf(rng.random())
        shifted_token = float(logits[token]) - float(logits.max())
        logp = shifted_token - log_norm
        log_q = shifted_token / self.temperature - log_total
        # For alpha = inf the chain compares sums of log p instead (max-swap).
        log_weight = 0.0 if math.isinf(self.alpha) else self.alpha * logp - log_q
        return TokenDraw(token, logp, log_weight)

    def _inverse_cdf(self, u: float) -> tuple[int, float]:
        """The token whose cumulative weight first exceeds u * total, and log(total)."""
        block_sums = self._weights.reshape(-1, BLOCK).sum(axis=1, dtype=np.float64)
        cumulative = np.cumsum(block_sums)
        total = float(cumulative[-1])
        target = u * total
        block = min(int(np.searchsorted(cumulative, target, side="right")), len(block_sums) - 1)
        start = block * BLOCK
        within = target - (float(cumulative[block - 1]) if block else 0.0)
        local = np.cumsum(self._weights[start : start + BLOCK], dtype=np.float64)
        offset = int(np.searchsorted(local, within, side="right"))
        if offset >= BLOCK:
            # Rounding put the target past the block's last weight: take its last real token.
            offset = int(np.flatnonzero(self._weights[start : start + BLOCK])[-1])
        return start + offset, math.log(total)


def draw_token(logits: np.ndarray, temperature: float, alpha: float, rng: np.random.Generator) -> TokenDraw:
    """One draw with a throwaway sampler (tests and one-off use)."""
    return TokenSampler(len(logits), temperature, alpha).draw(np.asarray(logits, dtype=np.float32), rng)
