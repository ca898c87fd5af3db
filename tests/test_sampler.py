"""The sampler's mechanics on the numpy toy model (no llama.cpp)."""

from __future__ import annotations

import math
import numpy as np
import pytest

from ps_local.samplers.proposal import draw_token
from ps_local.samplers.mh import block_ends
from ps_local.scheduler import sample
from ps_local.settings import SamplingSettings
from ps_local.samplers.stops import StopMatcher
from ps_local.toy_engine import ToyEngine

VOCAB = ["</s>", "a", "b", "c", "d"]


def toy(**kwargs) -> ToyEngine:
    return ToyEngine(VOCAB, eos=0, **kwargs)


@pytest.mark.parametrize("temperature", [1.0, 0.25, 2.0])
def test_draw_token_samples_the_tempered_softmax(temperature):
    rng = np.random.default_rng(0)
    logits = np.array([1.0, -0.5, 2.0, 0.3, -3.0], dtype=np.float32)
    draws = 20000
    counts = np.bincount([draw_token(logits, temperature, 4.0, rng).token for _ in range(draws)], minlength=5)
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    # 5 standard errors per token: a wrong temperature misses by far more.
    assert np.all(np.abs(counts / draws - expected) <= 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-9)


def test_draw_token_across_blocks_of_a_large_vocabulary():
    rng = np.random.default_rng(7)
    logits = np.full(1300, -2.0, dtype=np.float32)  # three sampling blocks of 512, the last partial
    logits[[10, 600, 1299]] = [3.0, 3.5, 2.5]
    draws = 20000
    tokens = np.array([draw_token(logits, 1.0, 4.0, rng).token for _ in range(draws)])
    probs = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum()
    for token in (10, 600, 1299):
        observed = (tokens == token).mean()
        assert abs(observed - probs[token]) <= 5 * np.sqrt(probs[token] * (1 - probs[token]) / draws)
    assert tokens.max() < 1300  # never a padding entry


def test_draw_token_reports_log_p_and_the_log_z_identity():
    rng = np.random.default_rng(1)
    logits = np.array([0.5, 1.5, -1.0, 2.5], dtype=np.float32)
    alpha = 4.0
    log_p = logits - np.log(np.exp(logits.astype(np.float64)).sum())
    log_z = np.log(np.exp(alpha * log_p).sum())
    for _ in range(20):
        draw = draw_token(logits, 1 / alpha, alpha, rng)
        assert draw.logp == pytest.approx(log_p[draw.token], abs=1e-6)
        # With temperature 1/alpha, alpha log p - log q is log Z whatever the token.
        assert draw.log_weight == pytest.approx(log_z, abs=1e-6)
        assert draw.log_weight <= 0
    greedy = draw_token(logits, 0.0, alpha, rng)
    assert greedy.token == 3 and greedy.logp == pytest.approx(log_p[3], abs=1e-6)


def test_block_ends():
    assert block_ends(10, 4) == [4, 8, 10]
    assert block_ends(10, 100) == [10]
    assert block_ends(8, 4) == [4, 8]


def test_stop_strings_are_matched_across_tokens():
    pieces = {1: b" he", 2: b"llo", 3: b" world", 4: b"!"}
    matcher = StopMatcher(["hello", "!"], pieces.__getitem__)
    assert not matcher.completes_stop([1])
    assert matcher.completes_stop([1, 2])  # "hello" spans two tokens
    assert matcher.completes_stop([3, 4])
    assert not matcher.completes_stop([3])
    assert matcher.cut(b" hello world") == b" "


def run_chain(engine, settings, prompt=(1, 2)):
    samples = sample(engine, list(prompt), settings)
    return samples[0]


def test_counters_match_what_the_engine_decoded():
    engine = toy(scale=1.0, eos_bias=-50.0)  # no EOS: every block runs
    settings = SamplingSettings(max_tokens=12, block_size=4, mcmc_steps=5, seed=3, early_rejection=False)
    result = run_chain(engine, settings)
    stats = result.stats
    assert engine.tokens_decoded == stats.tokens_decoded + stats.prompt_tokens
    assert stats.mh_steps == 5 * 3
    # Growing the sequence decodes each token but the last. A proposal draws its tokens from
    # the current sequence's stored distributions until it differs from it (reused_tokens);
    # each token it draws from fresh logits cost one decode (of the token before it).
    assert stats.proposal_tokens - stats.reused_tokens + len(result.tokens) - 1 == stats.tokens_decoded
    assert stats.reused_tokens > 0
    assert stats.acceptance_rate == stats.accepted / stats.mh_steps
    assert len(result.tokens) == len(result.logprobs) <= 12


def test_baselines_decode_each_token_once():
    engine = toy(scale=1.0)
    for method in ("standard", "low-temp", "greedy"):
        engine.tokens_decoded = 0
        result = run_chain(engine, SamplingSettings(method=method, max_tokens=10, seed=0))
        assert result.stats.mh_steps == 0 and result.stats.tokens_reevaluated == 0
        # The last sampled token is never decoded: nothing would use its logits.
        assert result.stats.tokens_decoded == len(result.tokens) - 1


def test_same_seed_same_tokens_and_chains_differ():
    settings = SamplingSettings(max_tokens=10, block_size=5, mcmc_steps=4, seed=11)
    # No EOS: ten-token sequences, so independent chains almost surely differ (with EOS,
    # "a </s>" carries ~60% of p^alpha here and four chains often agree by chance).
    first = sample(toy(scale=0.5, eos_bias=-50.0), [1], settings, num_samples=4)
    second = sample(toy(scale=0.5, eos_bias=-50.0), [1], settings, num_samples=4)
    assert [s.tokens for s in first] == [s.tokens for s in second]
    assert len({tuple(s.tokens) for s in first}) > 1


def test_logprobs_are_the_models():
    engine = toy(scale=1.0)
    result = run_chain(engine, SamplingSettings(max_tokens=8, block_size=4, mcmc_steps=3, seed=5))
    history = [1, 2]
    for token, logp in zip(result.tokens, result.logprobs):
        row = engine.logits(history).astype(np.float64)
        assert logp == pytest.approx(row[token] - math.log(np.exp(row).sum()), abs=1e-5)
        history.append(token)


def test_early_rejection_decides_as_the_full_proposal_would():
    """One MH step from the same state and random stream: stopping a proposal early must
    give the same outcome as running it to the end."""
    early_stops = accepted = 0
    for seed in range(60):
        outcomes = []
        for early_rejection in (True, False):
            settings = SamplingSettings(max_tokens=8, block_size=8, mcmc_steps=1, seed=seed,
                                        early_rejection=early_rejection)
            outcomes.append(run_chain(toy(scale=1.2, eos_bias=-1.0), settings))
        assert outcomes[0].tokens == outcomes[1].tokens
        assert outcomes[0].stats.accepted == outcomes[1].stats.accepted
        assert outcomes[1].stats.early_rejections == 0
        early_stops += outcomes[0].stats.early_rejections
        accepted += outcomes[0].stats.accepted
        assert outcomes[0].stats.tokens_decoded <= outcomes[1].stats.tokens_decoded
    assert early_stops > 5 and accepted > 5, "the check needs both early stops and accepted moves"


def test_progress_line_reports_block_step_acceptance_and_speed():
    import io

    from ps_local.output import ProgressLine

    stream = io.StringIO()
    progress = ProgressLine(stream, interval_s=0.0)
    sample(toy(scale=1.0), [1, 2], SamplingSettings(max_tokens=8, block_size=4, mcmc_steps=3, seed=1),
           progress=progress)
    lines = [line for line in stream.getvalue().split("\r\x1b[K") if line]
    assert lines and lines[-1].startswith("sample 0: block ")
    assert "MH step 3/3" in lines[-1] and "accepted" in lines[-1] and "tok/s" in lines[-1]
