"""Power-SMC samples p^alpha: by enumeration, its error falls as N grows, on the numpy toy and
through llama.cpp; every path (resampling at every token, resampling before or after drawing,
the alpha-ramp, proposal temperature 1) lands within the noise of exact draws; the two speed
levers (shared batch entries, kept proposals) change no sample at all. Resample-move
(rejuvenation): MH moves of the particles keep the target, rescue runs with few particles and
keep more distinct sequences."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from ps_local.engine import LlamaEngine
from ps_local.exact import enumerate_sequences, total_variation, tv_bound
from ps_local.scheduler import sample
from ps_local.settings import Sample, SamplingSettings
from ps_local.samplers import slots_per_chain
from ps_local.samplers.proposal import TokenSampler
from ps_local.samplers.smc import effective_sample_size, systematic_ancestors
from ps_local.trace import TraceWriter
from ps_local.trace_report import format_summary, read_trace, summarize
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
    return sample(engine, prompt, settings, runs, chains_per_batch=max(1, 255 // slots_per_chain(settings, 0)))


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


# -- resample-move: MH rejuvenation of the particles ---------------------------------------

REJUVENATION_RUNS = 1000  # the MH moves cost ~0.1 ms each on the toy: fewer runs than RUNS


def test_rejuvenation_rescues_few_particles(case):
    """Two particles are far from p^alpha (every resampling leaves copies of one or two
    sequences); eight MH moves per particle after each resampling bring the draws within the
    noise of exact ones. Resampling at every token and one-token tables: nearly every move runs
    the rare paths (draws outside a table, their re-evaluation, sequences of other lengths).
    Negative control: the kernel without log n - log n' (the target's sequences have 1 to 3
    tokens) misses by far."""
    options = dict(ess_threshold=1.0, table_size=1)
    runs = REJUVENATION_RUNS
    plain = smc_samples(case, 2, seed=5, runs=runs, **options)
    moved = smc_samples(case, 2, seed=5, runs=runs, smc_rejuvenate=8, **options)
    wrong = smc_samples(case, 2, seed=5, runs=runs, smc_rejuvenate=8, length_term=False, **options)
    limit = bound(case, runs)
    assert tv(case, plain) > 2 * limit
    assert tv(case, moved) <= limit
    assert tv(case, wrong) > 3 * limit
    stats = [s.stats for s in moved]
    assert all(st.rejuvenations >= 1 and st.mh_steps == 8 * 2 * st.rejuvenations for st in stats)
    assert sum(st.tokens_reevaluated for st in stats) > 0  # draws outside the one-token tables
    assert 0 < sum(st.moved for st in stats) < sum(st.accepted for st in stats) < sum(st.mh_steps for st in stats)


@pytest.mark.parametrize("particles, moves, table_size", [(4, 4, 1), (8, 2, 256)], ids=["N4-K4-tables1", "N8-K2"])
def test_rejuvenation_matches_p_alpha_with_resampling_at_every_token(case, particles, moves, table_size):
    samples = smc_samples(case, particles, seed=6, runs=REJUVENATION_RUNS, ess_threshold=1.0, table_size=table_size,
                          smc_rejuvenate=moves)
    assert tv(case, samples) <= bound(case, REJUVENATION_RUNS)
    assert np.mean([s.stats.rejuvenations for s in samples]) >= 2


def test_rejuvenation_keeps_more_distinct_sequences():
    """Resampling at every token leaves copies of a few ancestors; their MH moves spread them
    out again: more distinct sequences in the final population, on the same seeds."""
    engine = ToyEngine(["</s>"] + [f"w{i}" for i in range(1, 12)], eos=0, scale=1.0, seed=5, eos_bias=-3.0)
    settings = SamplingSettings(method="smc", alpha=ALPHA, max_tokens=10, particles=16, seed=4, ess_threshold=1.0)
    plain = sample(engine, [1, 2], settings, 20, chains_per_batch=7)
    moved = sample(engine, [1, 2], replace(settings, smc_rejuvenate=2), 20, chains_per_batch=7)
    distinct_plain = np.mean([s.stats.distinct_sequences for s in plain])
    distinct_moved = np.mean([s.stats.distinct_sequences for s in moved])
    assert distinct_moved > 1.3 * distinct_plain, (distinct_plain, distinct_moved)
    assert all(s.stats.rejuvenations is None and s.stats.mh_steps == 0 for s in plain)
    assert sum(s.stats.moved for s in moved) > 0


def test_rejuvenation_is_reproducible_and_reports_its_moves(tmp_path):
    """The particles' moves draw from streams of their own (chain seed, token, particle): the
    same samples however many runs share a batch; statistics and trace events count them."""
    engine = ToyEngine(["</s>"] + [f"w{i}" for i in range(1, 12)], eos=0, scale=1.0, seed=5, eos_bias=-3.0)
    settings = SamplingSettings(method="smc", alpha=ALPHA, max_tokens=8, particles=8, seed=7, ess_threshold=0.9,
                                smc_rejuvenate=3)
    path = tmp_path / "trace.jsonl"
    with TraceWriter(path) as writer:
        first = sample(engine, [1, 2], settings, 4, chains_per_batch=4, trace=writer)
    again = sample(engine, [1, 2], settings, 4, chains_per_batch=1)
    assert [(s.tokens, s.logprobs) for s in first] == [(s.tokens, s.logprobs) for s in again]
    # Neither the shared entries (regrouped after the moves) nor early rejection change a sample.
    for lever in ({"smc_shared_decode": False}, {"early_rejection": False}):
        other = sample(engine, [1, 2], replace(settings, **lever), 4, chains_per_batch=2)
        assert [(s.tokens, s.logprobs) for s in other] == [(s.tokens, s.logprobs) for s in first]
    events = [json.loads(line) for line in path.read_text().splitlines()]
    sweeps = [e for e in events if e["event"] == "rejuvenate"]
    for index, found in enumerate(first):
        stats = found.stats
        mine = [e for e in sweeps if e["chain"] == index]
        assert stats.rejuvenations == len(mine) >= 1 and stats.mcmc_steps == 3
        assert stats.mh_steps == sum(e["moves"] for e in mine) == 3 * 8 * len(mine)
        assert stats.accepted == sum(e["accepted"] for e in mine) and stats.moved == sum(e["moved"] for e in mine)
        assert stats.acceptance_rate == pytest.approx(stats.accepted / stats.mh_steps)
        assert 1 <= stats.distinct_sequences <= 8
        for event in mine:
            assert set(event) == {"event", "job", "chain", "t", "moves", "accepted", "moved", "particles_changed",
                                  "distinct_before", "distinct_after", "tokens_decoded"}
            assert 0 <= event["particles_changed"] <= 8 and 1 <= event["distinct_after"] <= 8
    assert sum(e["tokens_decoded"] for e in sweeps) > 0
    summary = summarize(read_trace(path))
    chains = summary["jobs"][0]["chains"]
    assert [c["smc"]["rejuvenation"]["moves"] for c in chains] == [s.stats.mh_steps for s in first]
    assert "rejuvenation:" in format_summary(summary)


def test_without_rejuvenation_no_table_is_built(case, monkeypatch):
    """The default path pays nothing for rejuvenation: no tables, one slot per particle."""
    def refuse(*args):
        raise AssertionError("a table was built without rejuvenation")

    monkeypatch.setattr(TokenSampler, "table_of", refuse)
    assert len(smc_samples(case, 8, runs=5, ess_threshold=1.0)) == 5
    settings = SamplingSettings(method="smc", particles=8)
    assert slots_per_chain(settings, 0) == 8 and slots_per_chain(replace(settings, smc_rejuvenate=1), 0) == 16


@pytest.mark.parametrize("options, message", [
    ({"particles": 128}, "--particles must be at most 127"),
    ({"proposal_temp": 1.0}, "drop --proposal-temp"),
    ({"smc_ramp": 3}, "drop --alpha-ramp"),
])
def test_rejuvenation_settings_are_checked(options, message):
    settings = SamplingSettings(method="smc", smc_rejuvenate=2, **options)
    with pytest.raises(ValueError, match=message):
        settings.validate()
    replace(settings, smc_rejuvenate=0).validate()  # fine without rejuvenation


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


def test_rejuvenation_matches_p_alpha_through_llama_cpp(tiny_gguf):
    """Two particles with MH moves after each resampling, through llama.cpp: spare slots, slot
    swaps after accepted moves and shared entries regrouped after them."""
    runs = 600
    with LlamaEngine(tiny_gguf, n_threads=2) as engine:
        prompt = engine.tokenize("yes no")
        engine.allocate(len(prompt) + 160 * MAX_TOKENS + 8, 1 + 160)
        exact = enumerate_sequences(engine, prompt, MAX_TOKENS, ALPHA)
        settings = SamplingSettings(method="smc", alpha=ALPHA, max_tokens=MAX_TOKENS, particles=2, seed=1,
                                    ess_threshold=1.0, smc_rejuvenate=6)
        moved = sample(engine, prompt, settings, runs, chains_per_batch=40)
        plain = sample(engine, prompt, replace(settings, smc_rejuvenate=0), runs, chains_per_batch=40)
    target = exact.power(ALPHA)
    assert sum(s.stats.moved for s in moved) > 0
    assert total_variation([s.tokens for s in moved], exact, target) <= tv_bound(target, runs)
    assert total_variation([s.tokens for s in plain], exact, target) > tv_bound(target, runs)


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory):
    """A tiny GGUF flat over 300 words: particles diverge at temperature 1."""
    return write_tiny_model(tmp_path_factory.mktemp("wide-smc") / "wide.gguf", "--extra-words", "296",
                            "--logit-scale", "0.05")


@pytest.mark.parametrize("temperature, moves", [(None, 0), (1.0, 0), (None, 2)], ids=["tau-1/alpha", "tau-1", "moves"])
def test_shared_entries_score_tokens_in_their_own_context_on_llama_cpp(wide_gguf, temperature, moves):
    """Each returned token's log p equals a from-scratch evaluation of its sequence, whether its
    particle's tokens went through shared entries, split off, came from a resampled copy, or
    from an MH move (rejuvenation) decoded in the particle's spare slot."""
    with LlamaEngine(wide_gguf, n_threads=2) as engine:
        prompt = engine.tokenize("yes no")
        settings = SamplingSettings(method="smc", alpha=ALPHA, max_tokens=10, particles=12, seed=2, ess_threshold=0.9,
                                    proposal_temp=temperature, smc_rejuvenate=moves)
        slots = 2 * slots_per_chain(settings, 0)
        engine.allocate(len(prompt) + slots * 10 + 8, 1 + slots)
        samples = sample(engine, prompt, settings, 4, chains_per_batch=2)
        assert sum(s.stats.resamples for s in samples) > 0
        if moves:
            assert sum(s.stats.moved for s in samples) > 0
        for result in samples:  # each token scored from scratch, the whole sequence in one fresh slot
            expected = llama_scratch_logprobs(engine, prompt, result.tokens)
            np.testing.assert_allclose(result.logprobs, expected, atol=1e-3)
