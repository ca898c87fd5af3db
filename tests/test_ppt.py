"""Parallel power tempering samples p^alpha: by enumeration its alpha replica matches exact
p^alpha on the numpy toy and through llama.cpp, also with one-token tables (draws from tables a
replica of another temperature built); without the swap correction it misses; where the MH
chain at tau = 1/alpha mixes slowly, the hot replicas help."""

from __future__ import annotations

import numpy as np
import pytest

from ps_local.engine import LlamaEngine
from ps_local.exact import enumerate_sequences, total_variation, tv_bound
from ps_local.scheduler import sample
from ps_local.settings import Sample, SamplingSettings
from ps_local.samplers.mh import Trajectory
from ps_local.samplers.proposal import TokenSampler
from ps_local.toy_engine import ToyEngine

from conftest import write_tiny_model

ALPHA = 4.0
MAX_TOKENS = 3
CHAINS = 3000
STEPS = 15


def toy_case():
    engine = ToyEngine(["</s>", "a", "b", "c"], eos=0, scale=2.5, seed=3, eos_bias=-0.5)
    prompt = [1, 2]
    return engine, prompt, enumerate_sequences(engine, prompt, MAX_TOKENS, ALPHA)


def ppt_samples(engine, prompt, chains: int = CHAINS, seed: int = 0, **options) -> list[Sample]:
    settings = SamplingSettings(**{**dict(method="ppt", alpha=ALPHA, max_tokens=MAX_TOKENS, block_size=MAX_TOKENS,
                                          mcmc_steps=STEPS, seed=seed), **options})
    return sample(engine, prompt, settings, chains, chains_per_batch=31, max_round_width=1)


def tv(exact, samples: list[Sample]) -> float:
    return total_variation([s.tokens for s in samples], exact, exact.power(ALPHA))


@pytest.fixture(scope="module")
def toy():
    return toy_case()


def test_the_alpha_replica_matches_p_alpha(toy):
    engine, prompt, exact = toy
    samples = ppt_samples(engine, prompt)
    assert tv(exact, samples) <= tv_bound(exact.power(ALPHA), CHAINS)
    stats = samples[0].stats
    assert stats.method == "ppt" and stats.ladder == pytest.approx([1, 4 ** (1 / 3), 4 ** (2 / 3), 4])
    assert len(stats.swap_acceptance) == 3 and all(0 <= rate <= 1 for rate in stats.swap_acceptance)
    rates = np.mean([s.stats.swap_acceptance for s in samples], axis=0)
    assert rates.min() > 0.05 and rates.max() < 1  # swaps happen, and some are refused


def test_one_token_tables_across_rungs_match_p_alpha(toy):
    """Tables of one token: a replica draws from tables that replicas of other temperatures
    built (the sequences swap), and most draws fall outside them."""
    engine, prompt, exact = toy
    samples = ppt_samples(engine, prompt, seed=1, table_size=1)
    assert sum(s.stats.tokens_reevaluated for s in samples) >= CHAINS
    assert tv(exact, samples) <= tv_bound(exact.power(ALPHA), CHAINS)


def test_an_explicit_ladder_in_wide_rounds_matches_p_alpha(toy):
    engine, prompt, exact = toy
    settings = SamplingSettings(method="ppt", alpha=ALPHA, ladder=(1.0, 2.0, ALPHA), max_tokens=MAX_TOKENS,
                                block_size=MAX_TOKENS, mcmc_steps=STEPS, seed=2)
    samples = sample(engine, prompt, settings, CHAINS, chains_per_batch=20, max_round_width=3)
    assert max(s.stats.widest_round for s in samples) > 1
    assert tv(exact, samples) <= tv_bound(exact.power(ALPHA), CHAINS)


def test_without_the_swap_correction_ppt_misses_p_alpha(toy):
    """Negative control: every swap accepted carries the alpha-1 replica's sequence to the top."""
    engine, prompt, exact = toy
    samples = ppt_samples(engine, prompt, chains=1000, swap_correction=False)
    assert tv(exact, samples) > 3 * tv_bound(exact.power(ALPHA), 1000)


def test_ppt_is_reproducible_whatever_the_batch(toy):
    engine, prompt, _ = toy
    first = ppt_samples(engine, prompt, chains=6, seed=5)
    settings = SamplingSettings(method="ppt", alpha=ALPHA, max_tokens=MAX_TOKENS, block_size=MAX_TOKENS,
                                mcmc_steps=STEPS, seed=5)
    again = sample(engine, prompt, settings, 6, chains_per_batch=2, max_round_width=4)
    assert [(s.tokens, s.stats.swap_acceptance) for s in first] == [(s.tokens, s.stats.swap_acceptance) for s in again]


def test_every_rung_scores_a_draw_as_its_own_sampler_would():
    """A token drawn by one replica carries each rung's MH weight alpha_j log p - log q_j, and
    its table each rung's proposal: what that rung's own sampler would have computed."""
    rng = np.random.default_rng(0)
    logits = (2 * rng.standard_normal(700)).astype(np.float32)  # two sampling blocks
    rungs = [(1.0, 1.0), (2.0, 0.5), (4.0, 0.25)]
    log_p = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    for builder in range(3):
        draw, table = TokenSampler(700, rungs[builder][1], rungs[builder][0], 8, rungs, builder).draw_with_table(
            logits, rng)
        for rung, (alpha, temperature) in enumerate(rungs):
            log_q = log_p / temperature - np.log(np.exp(log_p / temperature).sum())
            assert draw.rung_weights[rung] == pytest.approx(alpha * log_p[draw.token] - log_q[draw.token], abs=1e-5)
            cumulative, total = table.at(rung, temperature)
            weights = np.exp((logits - logits.max()).astype(np.float64) / temperature)
            assert total == pytest.approx(weights.sum(), rel=1e-6)
            np.testing.assert_allclose(cumulative, np.cumsum(weights[table.ids]), rtol=1e-6)
        assert draw.log_weight == draw.rung_weights[builder]
    # A sequence moved to another rung takes that rung's weights.
    trajectory = Trajectory(0)
    sampler = TokenSampler(700, 0.25, 4.0, 8, rungs, 2)
    draws = [sampler.draw_with_table(logits, rng)[0] for _ in range(5)]
    for one in draws:
        trajectory.append(one, None)
    trajectory.retarget(0)
    assert trajectory.cum_weight == pytest.approx(np.cumsum([0.0] + [d.rung_weights[0] for d in draws]).tolist())


@pytest.mark.parametrize("ladder, message", [
    ((1.0, 3.0), "must end at --alpha 4"),
    ((1.0, 4.0, 2.0, 4.0), "must rise strictly"),
    ((0.5, 4.0), ">= 1"),
    ((4.0,), "2 to 16 rungs"),
])
def test_a_bad_ladder_is_refused(ladder, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(method="ppt", ladder=ladder).validate()
    with pytest.raises(ValueError, match="alpha > 1"):
        SamplingSettings(method="ppt", alpha=1.0).validate()
    with pytest.raises(ValueError, match="proposal-temp"):
        SamplingSettings(method="ppt", proposal_temp=0.5).validate()


# -- through llama.cpp ---------------------------------------------------------------------


def gguf_case(path):
    engine = LlamaEngine(path, n_threads=2)
    prompt = engine.tokenize("yes no")
    engine.allocate(len(prompt) + 8 * MAX_TOKENS * 31 + 8, 1 + 8 * 31)
    return engine, prompt, enumerate_sequences(engine, prompt, MAX_TOKENS, ALPHA)


def test_ppt_matches_p_alpha_through_llama_cpp(tiny_gguf):
    engine, prompt, exact = gguf_case(tiny_gguf)
    with engine:
        samples = ppt_samples(engine, prompt, seed=3)
    assert tv(exact, samples) <= tv_bound(exact.power(ALPHA), CHAINS)


def test_hot_replicas_speed_up_a_slowly_mixing_chain(tmp_path):
    """The held-out tiny GGUF of the MH tests: half of p^4 sits on the empty answer, which the
    tau = 1/4 proposal of the MH chain almost never draws (its TV is still 0.44 after 30 steps). The
    alpha = 1 replica proposes it at temperature 1 and swaps carry it up: at the same number of
    MH steps per chain, PPT lands far closer to p^alpha."""
    path = write_tiny_model(tmp_path / "held-out.gguf", "--seed", "0", "--logit-scale", "0.3")
    engine, prompt, exact = gguf_case(path)
    with engine:
        tempered = ppt_samples(engine, prompt, seed=4)
        plain = ppt_samples(engine, prompt, seed=4, method="power")
    noise = tv_bound(exact.power(ALPHA), CHAINS)  # what sampling noise can move each TV by
    assert tv(exact, plain) > tv(exact, tempered) + 2 * noise, (tv(exact, plain), tv(exact, tempered))


def test_ppt_and_smc_through_the_python_api(tiny_gguf):
    import ps_local

    with ps_local.load(str(tiny_gguf), threads=2) as model:
        (tempered,) = model.generate("yes no", method="ppt", ladder=[1, 2, 4], max_tokens=6, block_size=3,
                                     mcmc_steps=2, seed=1)
        (particle,) = model.generate("yes no", method="smc", particles=6, smc_ramp=3, max_tokens=6, seed=1)
        with pytest.raises(ps_local.UserError, match="must end at --alpha"):
            model.generate("yes no", method="ppt", ladder=[1, 2], max_tokens=6)
    assert tempered.stats.ladder == [1, 2, 4] and len(tempered.stats.swap_acceptance) == 2
    assert particle.stats.particles == 6
