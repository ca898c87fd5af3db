"""Power-SMC samples p^alpha: by enumeration, its error falls as N grows, on the numpy toy and
through llama.cpp; every path (resampling at every token, resampling before or after drawing,
the alpha-ramp, proposal temperature 1) lands within the noise of exact draws; the two speed
levers (shared batch entries, kept proposals) change no sample at all."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ps_local.engine import LlamaEngine
from ps_local.exact import enumerate_sequences, total_variation, tv_bound
from ps_local.scheduler import sample
from ps_local.settings import Sample, SamplingSettings
from ps_local.samplers.smc import effective_sample_size, systematic_ancestors
from ps_local.toy_engine import ToyEngine

from conftest import llama_scratch_logprobs, write_tiny_model

ALPHA = 4.0
MAX_TOKENS = 3
RUNS = 2000


@pytest.fixture(scope="module")
def case():
    engine = ToyEngine(["</s>", "a", "b", "c"], eos=0, scale=2.5, seed=3, eos_bias=-0.5)
    prompt = [1, 2]
    return engine, prompt, enumerate_sequences(engine, prompt, MAX_TOKENS, ALPHA)


def smc_samples(case, particles: int, seed: int = 0, runs: int = RUNS, **options) -> list[Sample]:
    engine, prompt, _ = case
    settings = SamplingSettings(method="smc", alpha=ALPHA, max_tokens=MAX_TOKENS, particles=particles, seed=seed,
                                **options)
    return sample(engine, prompt, settings, runs, chains_per_batch=max(1, 255 // particles))


def tv(case, samples: list[Sample]) -> float:
    exact = case[2]
    return total_variation([s.tokens for s in samples], exact, exact.power(ALPHA))


def bound(case, runs: int = RUNS) -> float:
    return tv_bound(case[2].power(ALPHA), runs)


@pytest.fixture(scope="module")
def tv_by_particles(case):
    return {n: tv(case, smc_samples(case, n)) for n in (1, 4, 16, 64, 255)}


def test_smc_error_falls_as_particles_grow(case, tv_by_particles):
    """N = 1 is plain sampling from q (low temperature): far off. The error then falls with N
    and is within the noise of exact draws from N = 16 to the most particles a run may have."""
    tvs = tv_by_particles
    assert tvs[1] > 3 * bound(case)  # one particle: no correction at all
    assert tvs[1] > tvs[4] > tvs[64], tvs
    assert tvs[16] <= bound(case) and tvs[64] <= bound(case) and tvs[255] <= bound(case), tvs


@pytest.mark.parametrize("options", [
    {"smc_resample_first": True},  # weigh with log Z_t, resample, then each copy draws its own token
    {"smc_resample_first": False},  # draw, weigh, then resample: copies share the drawn token
    {"smc_ramp": 3},  # alpha rises 2, 3, 4 over the three tokens
    {"smc_ramp": 5},  # a ramp longer than the sequences: the final correction to p^alpha
    {"proposal_temp": 1.0},  # weights that depend on the token: resampling after drawing
], ids=["resample-first", "draw-first", "ramp", "unfinished-ramp", "tau-1"])
def test_every_smc_path_matches_p_alpha_with_resampling_at_every_token(case, options):
    """An ESS threshold of 1 resamples whenever the weights differ at all: the rare branch made
    the common one."""
    samples = smc_samples(case, 64, seed=5, ess_threshold=1.0, **options)
    assert np.mean([s.stats.resamples for s in samples]) >= 0.9  # resampled in nearly every run
    assert tv(case, samples) <= bound(case)


def test_smc_without_weights_misses_p_alpha(case):
    """Negative control: particles resampled without their weights are draws from q."""
    assert tv(case, smc_samples(case, 16, smc_weights=False)) > 3 * bound(case)


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
    assert 0 < stats.tokens_decoded <= stats.particle_tokens


def test_the_log_normalizer_estimates_the_sum_of_p_alpha(case):
    """log Z = log sum_x p(x)^alpha over the enumerated space: the estimates average to it."""
    exact = case[2]
    log_z = float(np.log(np.exp(ALPHA * exact.logp).sum()))
    estimates = [s.stats.log_normalizer for s in smc_samples(case, 64, seed=9, runs=200)]
    # Unbiased in Z (not in log Z): the mean of exp(estimate) matches, within its standard error.
    ratios = np.exp(np.array(estimates) - log_z)
    assert abs(ratios.mean() - 1) <= 4 * ratios.std() / math.sqrt(len(ratios)) + 1e-3


# -- the levers change nothing -------------------------------------------------------------


def flat_toy(n_vocab: int = 300) -> ToyEngine:
    """Hundreds of nearly equally likely tokens: at temperature 1 particles diverge at once."""
    return ToyEngine(["</s>"] + [f"t{i}" for i in range(1, n_vocab)], eos=0, scale=0.3, eos_bias=-3.0)


@pytest.mark.parametrize("engine_kind, temperature", [("peaked", None), ("flat", 1.0), ("flat", 0.25)])
def test_shared_batch_entries_change_no_sample(engine_kind, temperature):
    """Particles with one sequence append their token through one batch entry (the toy checks
    that the slots sharing it really hold the same tokens): bit for bit the samples of one entry
    per particle, for fewer tokens decoded. Peaked: sharing everywhere; flat at temperature 1:
    particles diverge at once, so entries split and resampled copies rejoin them."""
    engine = (ToyEngine(["</s>", "a", "b", "c"], eos=0, scale=2.5, seed=3, eos_bias=-0.5) if engine_kind == "peaked"
              else flat_toy())
    settings = SamplingSettings(method="smc", alpha=ALPHA, max_tokens=8, particles=16, seed=3, ess_threshold=1.0,
                                proposal_temp=temperature)
    shared = sample(engine, [1, 2], settings, 12, chains_per_batch=4)
    engine.tokens_decoded = 0
    alone = sample(engine, [1, 2], SamplingSettings(**{**settings.__dict__, "smc_shared_decode": False}), 12,
                   chains_per_batch=4)
    assert [(s.tokens, s.logprobs) for s in shared] == [(s.tokens, s.logprobs) for s in alone]
    assert sum(s.stats.resamples for s in shared) >= 12  # copies were made, and shared or split
    assert all(s.stats.tokens_decoded == s.stats.particle_tokens for s in alone)
    decoded, carried = sum(s.stats.tokens_decoded for s in shared), sum(s.stats.particle_tokens for s in shared)
    assert decoded < carried
    if engine_kind == "peaked":
        assert decoded < carried / 3


def test_proposals_prepared_again_give_the_same_samples(case, monkeypatch):
    """Resampling first keeps each sequence's prepared proposal for its copies' draws, unless
    they would take too much memory: then they are prepared again, with the same draws."""
    kept = smc_samples(case, 32, seed=11, runs=40, ess_threshold=1.0)
    monkeypatch.setattr("ps_local.samplers.smc.KEEP_PREPARED_BYTES", 0)
    again = smc_samples(case, 32, seed=11, runs=40, ess_threshold=1.0)
    assert [(s.tokens, s.logprobs) for s in kept] == [(s.tokens, s.logprobs) for s in again]


# -- through llama.cpp ---------------------------------------------------------------------


def test_smc_matches_p_alpha_through_llama_cpp(tiny_gguf):
    """The tiny GGUF of the MH exactness tests, with shared batch entries and resampling first."""
    with LlamaEngine(tiny_gguf, n_threads=2) as engine:
        prompt = engine.tokenize("yes no")
        engine.allocate(len(prompt) + 64 * MAX_TOKENS * 3 + 8, 1 + 64 * 3)
        exact = enumerate_sequences(engine, prompt, MAX_TOKENS, ALPHA)
        settings = SamplingSettings(method="smc", alpha=ALPHA, max_tokens=MAX_TOKENS, particles=64, seed=1)
        samples = sample(engine, prompt, settings, RUNS, chains_per_batch=3)
        # Negative control: one particle is plain low-temperature sampling.
        single = sample(engine, prompt, SamplingSettings(**{**settings.__dict__, "particles": 1}), RUNS,
                        chains_per_batch=64)
    target = exact.power(ALPHA)
    assert sum(s.stats.tokens_decoded for s in samples) < sum(s.stats.particle_tokens for s in samples) / 4
    assert total_variation([s.tokens for s in samples], exact, target) <= tv_bound(target, RUNS)
    assert total_variation([s.tokens for s in single], exact, target) > tv_bound(target, RUNS)


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory):
    """A tiny GGUF flat over 300 words: particles diverge at temperature 1."""
    return write_tiny_model(tmp_path_factory.mktemp("wide-smc") / "wide.gguf", "--extra-words", "296",
                            "--logit-scale", "0.05")


@pytest.mark.parametrize("temperature", [None, 1.0])
def test_shared_entries_score_tokens_in_their_own_context_on_llama_cpp(wide_gguf, temperature):
    """Each returned token's log p equals a from-scratch evaluation of its sequence, whether its
    particle's tokens went through shared entries, split off, or came from a resampled copy."""
    with LlamaEngine(wide_gguf, n_threads=2) as engine:
        prompt = engine.tokenize("yes no")
        settings = SamplingSettings(method="smc", alpha=ALPHA, max_tokens=10, particles=12, seed=2, ess_threshold=0.9,
                                    proposal_temp=temperature)
        engine.allocate(len(prompt) + 12 * 10 * 2 + 8, 1 + 12 * 2)
        samples = sample(engine, prompt, settings, 4, chains_per_batch=2)
        assert sum(s.stats.resamples for s in samples) > 0
        for result in samples:  # each token scored from scratch, the whole sequence in one fresh slot
            expected = llama_scratch_logprobs(engine, prompt, result.tokens)
            np.testing.assert_allclose(result.logprobs, expected, atol=1e-3)
