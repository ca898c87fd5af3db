"""Parallel power tempering samples p^alpha: by enumeration its alpha replica matches exact
p^alpha on the numpy toy and through llama.cpp, also with one-token tables (draws from tables a
replica of another temperature built), with a swap sweep after every MH step or every few, and
with a ladder placed by a discarded pilot; without the swap correction it misses; where the MH
chain at tau = 1/alpha mixes slowly, the hot replicas help; on long sequences a placed ladder
swaps far more often than the geometric one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ps_local.engine import LlamaEngine
from ps_local.exact import enumerate_sequences, total_variation, tv_bound
from ps_local.scheduler import sample
from ps_local.settings import Sample, SamplingSettings
from ps_local.samplers import ppt
from ps_local.samplers.mh import Trajectory
from ps_local.samplers.ppt import place_ladder
from ps_local.samplers.proposal import TokenSampler
from ps_local.toy_engine import ToyEngine
from ps_local.trace import TraceWriter

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
    """A swap sweep after every MH step (15 sweeps in the one block)."""
    engine, prompt, exact = toy
    samples = ppt_samples(engine, prompt, swap_every=1)
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
    samples = ppt_samples(engine, prompt, seed=1, table_size=1, swap_every=1)
    assert sum(s.stats.tokens_reevaluated for s in samples) >= CHAINS
    assert tv(exact, samples) <= tv_bound(exact.power(ALPHA), CHAINS)


def test_an_explicit_ladder_in_wide_rounds_matches_p_alpha(toy):
    engine, prompt, exact = toy
    # A swap sweep after every 4 MH steps (and after the 15th): rounds of up to 3 proposals fit
    # between sweeps.
    settings = SamplingSettings(method="ppt", alpha=ALPHA, ladder=(1.0, 2.0, ALPHA), max_tokens=MAX_TOKENS,
                                block_size=MAX_TOKENS, mcmc_steps=STEPS, seed=2, swap_every=4)
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


# -- swap sweeps between MH steps, and a ladder placed for the sequence length ------------------


def traced_ppt(engine, prompt, chains: int, **options) -> tuple[list[Sample], list[dict]]:
    events: list[dict] = []
    settings = SamplingSettings(**{**dict(method="ppt", alpha=ALPHA, max_tokens=MAX_TOKENS, block_size=MAX_TOKENS,
                                          mcmc_steps=STEPS, seed=6), **options})
    with TraceWriter(events.append) as writer:
        samples = sample(engine, prompt, settings, chains, trace=writer)
    return samples, events


def test_a_swap_sweep_after_every_mh_step(toy):
    """swap_every=1 proposes STEPS times as many swaps per block as one sweep per block."""
    engine, prompt, _ = toy
    pairs = len(SamplingSettings(method="ppt", alpha=ALPHA).power_ladder) - 1
    counts = {}
    for every in (1, STEPS):
        samples, events = traced_ppt(engine, prompt, 4, swap_every=every)
        counts[every] = sum(e["event"] == "swap" for e in events)
    assert counts == {STEPS: 4 * pairs, 1: 4 * STEPS * pairs}  # one block per chain


def test_a_ladder_is_placed_for_the_energies():
    geometric = SamplingSettings(method="ppt", alpha=ALPHA).power_ladder
    target = -math.log(ppt.SWAP_TARGET)

    def costs(ladder, energy):  # -log of each pair's expected swap acceptance
        return [(b - a) * (energy(a) - energy(b)) for a, b in zip(ladder, ladder[1:])]

    def placed(energy, ladder=geometric):
        found = place_ladder(ladder, [energy(a) for a in ladder])
        assert len(found) == len(ladder) and found[-1] == ALPHA and found[0] >= 1
        assert all(b > a for a, b in zip(found, found[1:]))
        return found

    # Energies that fall steeply (a long sequence): the rungs crowd toward alpha, each pair at
    # the target.
    steep = placed(lambda a: 200 / a)
    assert steep[0] > 3 and costs(steep, lambda a: 200 / a) == pytest.approx([target] * 3, rel=1e-3)
    assert costs(geometric, lambda a: 200 / a)[0] > 20 * target  # what the geometric ladder costs
    # Flat energies: nothing to gain, the ladder spans 1..alpha (geometric).
    assert placed(lambda a: 5.0) == pytest.approx(geometric)
    # Gentle ones (a short sequence): 1..alpha meets the target, the pairs share it evenly.
    gentle = placed(lambda a: 4 / a)
    assert gentle[0] == 1 and max(costs(gentle, lambda a: 4 / a)) < target
    assert np.ptp(costs(gentle, lambda a: 4 / a)) < 1e-9
    # Energies that fall linearly: between the pilot's rungs, the costs come near the target.
    linear = placed(lambda a: 40 - 6 * a)
    assert 2 < linear[0] and costs(linear, lambda a: 40 - 6 * a) == pytest.approx([target] * 3, rel=0.5)
    # Noisy energies that rise somewhere, and a given ladder above 1: still a valid ladder.
    placed(lambda a: {1.0: 10, geometric[1]: 12, geometric[2]: 9, 4.0: 9.5}[a])
    assert placed(lambda a: 30 / a, (2.0, 3.0, ALPHA))[0] > 2


def test_a_placed_ladder_matches_p_alpha(toy, monkeypatch):
    """The pilot's ladder, different from chain to chain, then a real run with it: exact. A high
    target acceptance spreads the ladders (most bottoms above 1); one-token tables."""
    engine, prompt, exact = toy
    monkeypatch.setattr(ppt, "SWAP_TARGET", 0.97)
    chains = 2000
    samples = ppt_samples(engine, prompt, chains=chains, seed=7, table_size=1, ladder_warmup=4)
    ladders = np.array([s.stats.ladder for s in samples])
    assert (ladders[:, -1] == ALPHA).all() and (ladders[:, 0] >= 1).all() and (np.diff(ladders) > 0).all()
    assert (ladders[:, 0] > 1.05).mean() > 0.4 and len({tuple(ladder) for ladder in ladders}) > chains / 4
    assert tv(exact, samples) <= tv_bound(exact.power(ALPHA), chains)


def test_the_pilot_is_discarded_and_counted(toy):
    """One ladder event per chain; the pilot writes no other event (its MH steps are not the
    chain's); its decoded tokens count in the sample's; the samples do not depend on the batch."""
    engine, prompt, _ = toy
    samples, events = traced_ppt(engine, prompt, 4, ladder_warmup=5, swap_every=2)
    for index, found in enumerate(samples):
        mine = [e for e in events if e.get("chain") == index]
        (ladder,) = [e for e in mine if e["event"] == "ladder"]
        assert ladder["pilot_ladder"] == pytest.approx(SamplingSettings(method="ppt", alpha=ALPHA).power_ladder)
        assert ladder["ladder"] == found.stats.ladder and ladder["steps"] == 5 and ladder["sweeps"] == 3
        assert len(ladder["energies"]) == len(ladder["pilot_swap_acceptance"]) + 1 == 4
        steps = [e for e in mine if e["event"] == "mh"]
        assert len(steps) == 4 * STEPS and {e["alpha"] for e in steps} == set(found.stats.ladder)
        real = sum(max(e["tokens_decoded"] for e in steps if e["replica"] == k) for k in range(4))
        assert found.stats.tokens_decoded == real + ladder["tokens_decoded"] and ladder["tokens_decoded"] > 0
    again = sample(engine, prompt, SamplingSettings(method="ppt", alpha=ALPHA, max_tokens=MAX_TOKENS,
                                                    block_size=MAX_TOKENS, mcmc_steps=STEPS, seed=6, ladder_warmup=5,
                                                    swap_every=2), 4, chains_per_batch=1, max_round_width=3)
    assert [(s.tokens, s.stats.ladder, s.stats.swap_acceptance) for s in samples] == [
        (s.tokens, s.stats.ladder, s.stats.swap_acceptance) for s in again]


def test_a_placed_ladder_swaps_more_on_long_sequences():
    """32 tokens without EOS: log p spans tens of nats between alpha 1 and 4, and the geometric
    ladder hardly swaps; the ladder the pilot places does, at every pair."""
    engine = ToyEngine(["</s>"] + [f"w{k}" for k in range(8)], eos=0, scale=2.0, seed=3, eos_bias=-30)
    rates = {}
    for warmup in (0, 8):
        settings = SamplingSettings(method="ppt", alpha=ALPHA, max_tokens=32, block_size=32, mcmc_steps=8, seed=0,
                                    ladder_warmup=warmup)
        samples = sample(engine, [1, 2], settings, 12, chains_per_batch=12)
        rates[warmup] = np.mean([s.stats.swap_acceptance for s in samples], axis=0)
        if warmup:
            assert np.mean([s.stats.ladder[0] for s in samples]) > 1.3  # the rungs move toward alpha
    assert rates[8].min() > rates[0].min() + 0.15 and rates[8].mean() > rates[0].mean() + 0.15, rates


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
        (placed,) = model.generate("yes no", method="ppt", max_tokens=6, block_size=3, mcmc_steps=2, seed=1,
                                   ladder_warmup=3)  # the pilot's cells cut back to the prompt in llama.cpp
        (particle,) = model.generate("yes no", method="smc", particles=6, smc_ramp=3, max_tokens=6, seed=1)
        with pytest.raises(ps_local.UserError, match="must end at --alpha"):
            model.generate("yes no", method="ppt", ladder=[1, 2], max_tokens=6)
    assert tempered.stats.ladder == [1, 2, 4] and len(tempered.stats.swap_acceptance) == 2
    assert len(placed.stats.ladder) == 4 and placed.stats.ladder[-1] == 4 and len(placed.stats.swap_acceptance) == 3
    assert particle.stats.particles == 6
