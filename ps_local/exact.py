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


def exact_sample_tvs(probs: np.ndarray, draws: int, repeats: int = 4000, seed: int = 12345) -> np.ndarray:
    """TV to ``probs`` of ``repeats`` simulated sets of ``draws`` exact samples: sampling noise alone."""
    rng = np.random.default_rng(seed)
    return 0.5 * np.abs(rng.multinomial(draws, probs, size=repeats) / draws - probs).sum(axis=1)


def noise_floor(probs: np.ndarray, draws: int) -> float:
    """Median TV of ``draws`` exact samples from ``probs``."""
    return float(np.median(exact_sample_tvs(probs, draws)))


def tv_bound(probs: np.ndarray, draws: int) -> float:
    """A TV that ``draws`` exact samples stay under: the 99.9th percentile of the simulated
    noise, and at least 3x its median. When a few sequences carry most of the mass the noise
    has a long tail, so 3x the median alone would fail exact samplers a few percent of the time."""
    tvs = exact_sample_tvs(probs, draws)
    return float(max(np.quantile(tvs, 0.999), 3 * np.median(tvs)))


def blockwise_limit(
    engine: Engine, prompt: Sequence[int], max_tokens: int, block_size: int, alpha: float
) -> tuple[ExactDistribution, np.ndarray]:
    """What Algorithm 1 converges to with B < T_max and unboundedly many MH steps per block.

    After block k the chain is distributed as pi_k = p^alpha over sequences of L_k tokens or
    shorter ones ending in EOS. A sequence that ends in EOS stops the chain there, so the
    result is a mixture: each block's EOS-ended sequences with the probability of stopping
    in that block, then pi_K for the chains that reach the last block. It equals p^alpha
    over the full space only when one block covers T_max.
    """
    from .samplers.mh import block_ends  # the same block boundaries the sampler uses

    final = enumerate_sequences(engine, prompt, max_tokens, alpha)
    index = final.index()
    limit = np.zeros(len(final.sequences))
    still_running = 1.0
    for end in block_ends(max_tokens, block_size)[:-1]:
        block = enumerate_sequences(engine, prompt, end, alpha)
        target = block.power(alpha)
        for sequence, probability, ended in zip(block.sequences, target, block.ended):
            if ended:
                limit[index[sequence]] += still_running * probability
        still_running *= 1.0 - float(target[block.ended].sum())
    return final, limit + still_running * final.power(alpha)
