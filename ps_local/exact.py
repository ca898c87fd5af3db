"""Exact p^alpha on models whose sequence space can be enumerated (a handful of tokens).

Used by the exactness tests and scripts/exactness.py to check that the sampler's output
distribution is the target, within sampling noise.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .protocol import Engine

NEGLIGIBLE = 1e-12  # tokens below this probability are not enumerated (their mass is reported)


def _log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    shifted = row - row.max()
    return shifted - math.log(np.exp(shifted).sum())


@dataclass
class ExactDistribution:
    sequences: list[tuple[int, ...]]
    logp: np.ndarray  # log p(sequence | prompt)
    log_low_temp: np.ndarray  # log-probability under token-wise temperature 1/alpha sampling
    ended: np.ndarray  # whether the sequence ends with EOS
    dropped_mass: float  # p-mass of the tokens skipped as negligible

    def power(self, alpha: float) -> np.ndarray:
        """Exact p^alpha over the enumerated sequences, normalized."""
        weights = alpha * self.logp
        weights = np.exp(weights - weights.max())
        return weights / weights.sum()

    def base(self) -> np.ndarray:
        return self.power(1.0)

    def low_temp(self) -> np.ndarray:
        return np.exp(self.log_low_temp)

    def index(self) -> dict[tuple[int, ...], int]:
        return {sequence: i for i, sequence in enumerate(self.sequences)}


def enumerate_sequences(engine: Engine, prompt: Sequence[int], max_tokens: int, alpha: float) -> ExactDistribution:
    """Every continuation of ``prompt`` of ``max_tokens`` tokens, or shorter and ending in EOS."""
    engine.reset()
    (root,) = engine.decode([(0, list(prompt))])
    sequences: list[tuple[int, ...]] = []
    logps: list[float] = []
    low_temps: list[float] = []
    ended: list[bool] = []
    dropped = 0.0
    # Depth-first over prefixes; each node's logits come from decoding its prefix in slot 1.
    stack: list[tuple[tuple[int, ...], float, float, np.ndarray]] = [((), 0.0, 0.0, root)]
    while stack:
        prefix, logp, log_low, row = stack.pop()
        log_probs = _log_softmax(row)
        log_sharp = _log_softmax(row.astype(np.float64) * alpha)
        for token in np.flatnonzero(np.exp(log_probs) > NEGLIGIBLE):
            token = int(token)
            sequence = prefix + (token,)
            child_logp, child_low = logp + log_probs[token], log_low + log_sharp[token]
            if engine.is_end_of_generation(token) or len(sequence) == max_tokens:
                sequences.append(sequence)
                logps.append(child_logp)
                low_temps.append(child_low)
                ended.append(engine.is_end_of_generation(token))
            else:
                engine.copy_prefix(0, 1, len(prompt))
                (child_row,) = engine.decode([(1, list(sequence))])
                stack.append((sequence, child_logp, child_low, child_row))
        dropped += math.exp(logp) * float(np.exp(log_probs)[np.exp(log_probs) <= NEGLIGIBLE].sum())
    return ExactDistribution(sequences, np.array(logps), np.array(low_temps), np.array(ended), dropped)


def total_variation(samples: Iterable[Sequence[int]], exact: ExactDistribution, probs: np.ndarray) -> float:
    """TV distance between the empirical distribution of ``samples`` and ``probs``."""
    counts = Counter(tuple(s) for s in samples)
    total = sum(counts.values())
    index = exact.index()
    empirical = np.zeros(len(probs))
    outside = 0.0  # samples the enumeration does not contain count fully against
    for sequence, count in counts.items():
        if sequence in index:
            empirical[index[sequence]] = count / total
        else:
            outside += count / total
    return 0.5 * (float(np.abs(empirical - probs).sum()) + outside)


def noise_floor(probs: np.ndarray, draws: int, rng: np.random.Generator, repeats: int = 200) -> float:
    """Median TV between ``draws`` exact samples from ``probs`` and ``probs`` itself."""
    tvs = []
    for _ in range(repeats):
        empirical = rng.multinomial(draws, probs) / draws
        tvs.append(0.5 * float(np.abs(empirical - probs).sum()))
    return float(np.median(tvs))
