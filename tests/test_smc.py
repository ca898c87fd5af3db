"""Power-SMC samples p^alpha: by enumeration on the numpy toy, its error falls as N grows."""

from __future__ import annotations

import numpy as np
import pytest

from ps_local.exact import enumerate_sequences, total_variation, tv_bound
from ps_local.scheduler import sample
from ps_local.settings import SamplingSettings
from ps_local.samplers.smc import effective_sample_size, systematic_ancestors
from ps_local.toy_engine import ToyEngine

ALPHA = 4.0
MAX_TOKENS = 3
RUNS = 2000


@pytest.fixture(scope="module")
def case():
    engine = ToyEngine(["</s>", "a", "b", "c"], eos=0, scale=2.5, seed=3, eos_bias=-0.5)
    prompt = [1, 2]
    return engine, prompt, enumerate_sequences(engine, prompt, MAX_TOKENS, ALPHA)


def smc_draws(case, particles: int, seed: int = 0, **options) -> list[tuple[int, ...]]:
    engine, prompt, _ = case
    settings = SamplingSettings(method="smc", alpha=ALPHA, max_tokens=MAX_TOKENS, particles=particles, seed=seed,
                                **options)
    samples = sample(engine, prompt, settings, RUNS, chains_per_batch=max(1, 255 // particles))
    return [tuple(s.tokens) for s in samples]


@pytest.fixture(scope="module")
def tv_by_particles(case):
    exact = case[2]
    return {n: total_variation(smc_draws(case, n), exact, exact.power(ALPHA)) for n in (1, 4, 16, 64)}


def test_smc_error_falls_as_particles_grow(case, tv_by_particles):
    """N = 1 is plain sampling from q (low temperature): far off. The error then falls with N
    and is within the noise of exact draws at the largest N."""
    exact = case[2]
    bound = tv_bound(exact.power(ALPHA), RUNS)
    tvs = tv_by_particles
    assert tvs[1] > 3 * bound  # one particle: no correction at all
    assert tvs[1] > tvs[4] > tvs[64], tvs
    assert tvs[16] <= bound and tvs[64] <= bound, tvs


def test_smc_without_weights_misses_p_alpha(case):
    """Negative control: particles resampled without their weights are draws from q."""
    exact = case[2]
    draws = smc_draws(case, 16, smc_weights=False)
    assert total_variation(draws, exact, exact.power(ALPHA)) > 3 * tv_bound(exact.power(ALPHA), RUNS)


def test_systematic_resampling_and_ess():
    weights = np.array([0.1, 0.0, 0.6, 0.3])
    ancestors = systematic_ancestors(weights, 0.2)
    assert list(ancestors) == [0, 2, 2, 3]  # points 0.05, 0.3, 0.55, 0.8 against cumsum 0.1, 0.1, 0.7, 1
    assert effective_sample_size(np.log(np.array([1.0, 1.0, 1.0, 1.0]))) == pytest.approx(4.0)
    assert effective_sample_size(np.array([0.0, -np.inf, -np.inf])) == pytest.approx(1.0)


def test_smc_reports_its_diagnostics_and_is_reproducible(case):
    engine, prompt, _ = case
    settings = SamplingSettings(method="smc", alpha=ALPHA, max_tokens=MAX_TOKENS, particles=16, seed=7)
    first = sample(engine, prompt, settings, 3, chains_per_batch=3)
    again = sample(engine, prompt, settings, 3, chains_per_batch=1)
    assert [s.tokens for s in first] == [s.tokens for s in again]
    stats = first[0].stats
    assert stats.method == "smc" and stats.particles == 16
    assert 1 <= stats.ess_min <= 16 and stats.resamples >= 0 and 1 <= stats.distinct_ancestors <= 16
    assert np.isfinite(stats.log_normalizer)
