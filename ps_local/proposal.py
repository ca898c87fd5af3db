"""Drawing one token from raw logits, with what the MH ratio needs about it.

The proposal is plain temperature sampling over the whole vocabulary, q(v) ∝ p(v)^(1/τ):
no top-k, top-p or min-p, because the acceptance ratio must describe q exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenDraw:
    token: int
    logp: float  # log p(token) under the base model (temperature 1)
    log_weight: float  # alpha * log p - log q: the token's share of log A


def draw_token(logits: np.ndarray, temperature: float, alpha: float, rng: np.random.Generator) -> TokenDraw:
    """Sample a token from softmax(logits / temperature); temperature 0 means argmax."""
    logits = np.asarray(logits)
    peak = float(logits.max())
    shifted = logits - peak
    base_weights = np.exp(shifted, dtype=np.float64)
    log_norm = math.log(float(base_weights.sum()))
    if temperature == 0.0:
        token = int(logits.argmax())
        logp = float(shifted[token]) - log_norm
        return TokenDraw(token, logp, 0.0 if math.isinf(alpha) else alpha * logp)
    if temperature == 1.0:
        weights = base_weights
    else:
        weights = np.exp(shifted / temperature, dtype=np.float64)
    cumulative = np.cumsum(weights)
    total = float(cumulative[-1])
    token = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
    logp = float(shifted[token]) - log_norm
    log_q = float(shifted[token]) / temperature - math.log(total)
    # For alpha = inf the chain compares sums of log p instead (max-swap).
    log_weight = 0.0 if math.isinf(alpha) else alpha * logp - log_q
    return TokenDraw(token, logp, log_weight)
