"""The numeric bounds of SamplingSettings.validate: nothing that reaches sampling overflows.

The proposal tempers float32 logits by float32(1/tau), tau = 1/alpha unless set: past
float32's range every weight turns NaN. The bounds stop well short of that, and at the bounds
the samplers still draw what they should (greedy's tokens where the target is the argmax).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from ps_local.samplers.proposal import TokenSampler, draw_token
from ps_local.scheduler import sample
from ps_local.settings import MAX_ALPHA, MAX_TEMP, MIN_TEMP, SamplingSettings
from ps_local.toy_engine import ToyEngine

VOCAB = ["</s>", "a", "b", "c", "d"]
ABOVE_MAX_ALPHA = math.nextafter(MAX_ALPHA, math.inf)
BELOW_MIN_TEMP = math.nextafter(MIN_TEMP, 0)
ABOVE_MAX_TEMP = math.nextafter(MAX_TEMP, math.inf)


def refused(settings: SamplingSettings, option: str) -> str:
    with pytest.raises(ValueError) as error:
        settings.validate()
    message = str(error.value)
    assert message.startswith(option) and "\n" not in message, message
    return message


# -- the bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["power", "smc", "ppt", "low-temp", "standard", "greedy"])
def test_alpha_up_to_the_bound_is_accepted_past_it_refused(method):
    SamplingSettings(method=method, alpha=MAX_ALPHA).validate()
    for alpha in (ABOVE_MAX_ALPHA, 1e39, 1e300, math.nan, math.nextafter(1.0, 0), -math.inf):
        assert ">= 1 and <= 1e+30, or inf" in refused(SamplingSettings(method=method, alpha=alpha), "--alpha")


def test_max_swap_stays_allowed():
    SamplingSettings(method="power", alpha=math.inf).validate()
    SamplingSettings(method="low-temp", alpha=math.inf).validate()


@pytest.mark.parametrize("method", ["power", "smc", "standard"])
def test_proposal_temperature_within_the_bounds_only(method):
    for temperature in (MIN_TEMP, 1.0, MAX_TEMP):
        SamplingSettings(method=method, proposal_temp=temperature).validate()
    for temperature in (BELOW_MIN_TEMP, 2.9e-39, 0.0, -1.0, ABOVE_MAX_TEMP, math.inf, math.nan):
        message = refused(SamplingSettings(method=method, proposal_temp=temperature), "--proposal-temp")
        assert ">= 1e-30 and <= 1e+30" in message


def test_ladder_rungs_within_the_bounds_only():
    SamplingSettings(method="ppt", alpha=MAX_ALPHA, ladder=(1.0, 1e15, MAX_ALPHA)).validate()
    message = refused(SamplingSettings(method="ppt", alpha=MAX_ALPHA, ladder=(1.0, ABOVE_MAX_ALPHA, MAX_ALPHA)),
                      "--ladder")
    assert ">= 1 and <= 1e+30" in message
    refused(SamplingSettings(method="ppt", alpha=4.0, ladder=(1.0, math.nan, 4.0)), "--ladder")
    refused(SamplingSettings(method="ppt", alpha=4.0, ladder=(0.5, 4.0)), "--ladder")


# -- why: the float32 overflow the bounds keep away from --------------------------------------


def test_past_float32_the_proposal_weights_are_nan_and_inside_the_bounds_finite():
    """The measurement behind the bounds: the top token's weight is exp(0 * float32(1/tau)),
    NaN once 1/tau overflows float32 (tau < 2.94e-39, i.e. default tau = 1/alpha, alpha > 3.4e38)."""
    logits = np.array([1.0, -0.5, 2.0, 0.3, -3.0], dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.isnan(TokenSampler(5, 2.9e-39, 4.0).prepare(logits).weights).any()
        assert np.isfinite(TokenSampler(5, 3.0e-39, 4.0).prepare(logits).weights).all()
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(1 / 2.9e-39)) and np.isfinite(np.float32(1 / MIN_TEMP))
    # 1/tau = 0 at a huge temperature turns a -inf logit's weight into 0 * -inf = NaN.
    assert np.float32(1 / 1e46) == 0 and np.float32(1 / MAX_TEMP) > np.finfo(np.float32).tiny


def test_draws_at_the_smallest_temperature_are_argmax_without_overflow():
    rng = np.random.default_rng(0)
    # Logit gaps of 1e8 still scale to finite numbers at tau = 1e-30 (no overflow warning).
    logits = np.array([0.0, -1e8, 5.0, 5.0, -3.0, -np.inf], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draws = [draw_token(logits, MIN_TEMP, 1 / MIN_TEMP, rng) for _ in range(400)]
    tokens = np.array([draw.token for draw in draws])
    assert set(tokens) == {2, 3}  # the two tied maxima, each about half the time
    assert 150 < (tokens == 2).sum() < 250
    assert all(math.isfinite(draw.logp) and math.isfinite(draw.log_weight) for draw in draws)


def test_draws_at_the_largest_temperature_are_uniform_and_never_an_impossible_token():
    rng = np.random.default_rng(1)
    logits = np.array([0.0, -50.0, 5.0, 30.0, -np.inf], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draws = [draw_token(logits, MAX_TEMP, 1.0, rng) for _ in range(4000)]
    counts = np.bincount([draw.token for draw in draws], minlength=5)
    assert counts[4] == 0  # log p = -inf stays impossible
    assert np.all(np.abs(counts[:4] / 4000 - 0.25) < 0.03)
    assert all(math.isfinite(draw.log_weight) for draw in draws)


# -- the samplers at the bounds, on the numpy toy -------------------------------------------


def toy() -> ToyEngine:
    return ToyEngine(VOCAB, eos=0, scale=1.5, eos_bias=-2.0)


def run(seed: int = 1, **options) -> list:
    settings = SamplingSettings(**{"max_tokens": 8, "block_size": 4, "mcmc_steps": 4, "seed": seed, **options})
    settings.validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in numpy is a RuntimeWarning: fail on it
        return sample(toy(), [1, 2], settings)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("method", ["power", "smc", "ppt", "low-temp"])
def test_the_largest_alpha_samples_the_argmax_like_greedy(method, seed):
    """At alpha = 1e30 the proposal (tau = 1/alpha) is greedy's, and so is every sampler's
    result; before the bounds, alpha = 1e39 ended in NaN weights (IndexError, ValueError)."""
    greedy = run(seed, method="greedy")[0]
    result = run(seed, method=method, alpha=MAX_ALPHA)[0]
    assert result.tokens == greedy.tokens
    assert np.allclose(result.logprobs, greedy.logprobs)
    stats = result.stats
    for value in (stats.acceptance_rate, stats.log_normalizer, stats.ess_min, *(stats.swap_acceptance or [])):
        assert value is None or math.isfinite(value)


@pytest.mark.parametrize("method", ["standard", "power", "smc"])
def test_the_smallest_temperature_proposes_greedy_tokens(method):
    greedy = run(method="greedy")[0]
    assert run(method=method, proposal_temp=MIN_TEMP)[0].tokens == greedy.tokens


@pytest.mark.parametrize("seed", range(6))
def test_the_largest_alpha_with_a_warm_proposal_is_max_swap(seed):
    """alpha = 1e30 with tau = 1 accepts exactly the proposals that raise log p, as max-swap
    (alpha = inf) does: the same chain, token for token."""
    large = run(seed, alpha=MAX_ALPHA, proposal_temp=1.0, mcmc_steps=6)[0]
    max_swap = run(seed, alpha=math.inf, proposal_temp=1.0, mcmc_steps=6)[0]
    assert large.tokens == max_swap.tokens and large.stats.moved == max_swap.stats.moved


@pytest.mark.parametrize("method", ["standard", "power", "smc"])
def test_the_largest_temperature_samples_finitely(method):
    results = run(method=method, proposal_temp=MAX_TEMP, alpha=2.0)
    assert all(math.isfinite(logp) for logp in results[0].logprobs)


def test_the_alpha_ramp_up_to_the_largest_alpha_stays_finite():
    result = run(method="smc", alpha=MAX_ALPHA, smc_ramp=4, particles=8)[0]
    assert math.isfinite(result.stats.log_normalizer) and math.isfinite(result.stats.ess_min)
    assert all(math.isfinite(logp) for logp in result.logprobs)


# -- the default method and SMC's default particles -------------------------------------------


def test_the_default_method_is_smc_and_the_dataclass_keeps_power():
    import inspect

    from ps_local import api, cli
    from ps_local.settings import DEFAULT_METHOD

    assert DEFAULT_METHOD == "smc"
    assert SamplingSettings().method == "power" and SamplingSettings().particles is None
    for function in (api.Model.generate, api.Model.submit, api.Model.settings):
        assert inspect.signature(function).parameters["method"].default == "smc"
    generate = {p.name: p for p in cli.cli.commands["generate"].params}
    assert generate["method"].default == "smc" and generate["particles"].default is None


def test_default_particles_budget_arithmetic():
    from ps_local.settings import (DEFAULT_PARTICLES, MIN_DEFAULT_PARTICLES, SMC_KV_BUDGET, default_particles)

    smc = SamplingSettings(method="smc")
    assert (DEFAULT_PARTICLES, MIN_DEFAULT_PARTICLES, SMC_KV_BUDGET) == (128, 16, 2 << 30)
    assert smc.particle_count == 128  # unfitted: what no session has fitted yet
    cell = 18 * 1024  # Gemma 3 270M at f16
    assert default_particles(smc, 96, cell).particles == 128  # 128 x 96 cells: 216 MiB
    assert default_particles(smc, 3072, cell).particles == SMC_KV_BUDGET // (3072 * cell) == 37
    assert default_particles(smc, 4096, cell).particles == 28
    # Exactly at the budget: 128 particles of 4096 cells of 4 KiB are 2 GiB; one cell more is too many.
    assert default_particles(smc, 4096, 4096).particles == 128
    assert default_particles(smc, 4097, 4096).particles == 127
    assert default_particles(smc, 4096, 1 << 20).particles == 16  # 0 would fit: never under 16
    assert default_particles(smc, 0, cell).particles == 128  # an empty budget of tokens counts as 1
    assert default_particles(smc, 3072, None).particles == 128  # cell size unknown: the default
    fitted = default_particles(smc, 3072, cell)
    assert fitted == SamplingSettings(method="smc", particles=37)  # nothing else changes
    fitted.validate()


def test_default_particles_with_rejuvenation_count_two_sequences_each():
    from ps_local.settings import MAX_REJUVENATED_PARTICLES, default_particles

    smc = SamplingSettings(method="smc", smc_rejuvenate=2)
    assert smc.particle_count == MAX_REJUVENATED_PARTICLES == 127  # 255 sequences at most, one is the prompt's
    cell = 18 * 1024
    assert default_particles(smc, 96, cell).particles == 127
    assert default_particles(smc, 3072, cell).particles == (2 << 30) // (2 * 3072 * cell) == 18
    assert default_particles(smc, 4096, 4096).particles == 64  # half of what fits without
    assert default_particles(smc, 4096, 1 << 20).particles == 16
    default_particles(smc, 3072, cell).validate()


def test_default_particles_keep_explicit_particles_and_other_methods():
    from ps_local.settings import default_particles

    for particles in (1, 20, 200, 255):
        asked = SamplingSettings(method="smc", particles=particles)
        assert default_particles(asked, 4096, 1 << 20) is asked  # far past the budget: as given
        assert default_particles(asked, 8, 1).particles == particles  # far within it: as given
    for method in ("power", "ppt", "low-temp", "standard", "greedy"):
        other = SamplingSettings(method=method)
        assert default_particles(other, 3072, 18 * 1024) is other and other.particles is None
