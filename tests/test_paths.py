"""Every path of the sampler, made common on purpose: draws that fall outside a stored table
(one-token tables, flat vocabularies of hundreds of tokens, proposal temperature 1), proposals
that return to the current sequence after such a draw, and wide MH rounds. Each run checks the
cache invariant at every decode (the toy engine also compares the slot's tokens), and the
returned log-probabilities against a from-scratch evaluation.

Also the reproducibility the README states: chain i's tokens depend only on (seed, i) and the
settings, not on -n, the chains that share a batch, the round width or a resume (bit for bit
on the numpy toy, where numerics do not depend on the batch).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ps_local.engine import LlamaEngine
from ps_local.scheduler import sample
from ps_local.settings import Sample, SamplingSettings
from ps_local.toy_engine import ToyEngine

from conftest import llama_scratch_logprobs, write_tiny_model


def flat_toy(n_vocab: int = 300, scale: float = 0.3) -> ToyEngine:
    """Hundreds of nearly equally likely tokens: at temperature 1 a table of 256 misses ~15%
    of the mass, a table of one token misses almost all of it."""
    return ToyEngine(["</s>"] + [f"t{i}" for i in range(1, n_vocab)], eos=0, scale=scale, eos_bias=-3.0)


def scratch_logprobs(engine: ToyEngine, prompt: list[int], tokens: list[int]) -> list[float]:
    history, result = list(prompt), []
    for token in tokens:
        row = engine.logits(history).astype(np.float64)
        result.append(float(row[token] - row.max() - math.log(np.exp(row - row.max()).sum())))
        history.append(token)
    return result


def settings(**options) -> SamplingSettings:
    base = dict(max_tokens=24, block_size=8, mcmc_steps=6, seed=0, proposal_temp=1.0)
    return SamplingSettings(**{**base, **options})


@pytest.mark.parametrize("table_size", [1, 4, 256])
@pytest.mark.parametrize("round_width", [1, 4])
def test_table_misses_keep_the_cache_and_the_scores_right(table_size, round_width):
    engine = flat_toy()
    prompt = [1, 2]
    samples = sample(engine, prompt, settings(table_size=table_size), num_samples=6, chains_per_batch=3,
                     max_round_width=round_width)
    misses = sum(s.stats.tokens_reevaluated for s in samples)
    proposal_tokens = sum(s.stats.proposal_tokens for s in samples)
    # The rare branch is common here: a good share of proposal tokens fell outside a table.
    assert misses >= 0.05 * proposal_tokens if table_size < 256 else misses > 0
    if round_width > 1:
        assert max(s.stats.widest_round for s in samples) > 1
    for result in samples:
        np.testing.assert_allclose(result.logprobs, scratch_logprobs(engine, prompt, result.tokens), atol=2e-5)
        assert result.stats.moved <= result.stats.accepted


def test_one_token_tables_on_three_tokens_recouple_often():
    """Tables of one token over three flat tokens: a draw outside the table lands on the
    current token half the time, so proposals go back to "coupled" after owning a slot (the
    path that once decoded onto a slot lacking the shared stretch)."""
    engine = ToyEngine(["</s>", "a", "b", "c"], eos=0, scale=0.2, eos_bias=-4.0)
    prompt = [1]
    for seed in range(5):
        samples = sample(engine, prompt, settings(table_size=1, seed=seed, max_tokens=30, block_size=30,
                                                  mcmc_steps=40), num_samples=4, max_round_width=3)
        for result in samples:
            assert result.stats.tokens_reevaluated > 10
            np.testing.assert_allclose(result.logprobs, scratch_logprobs(engine, prompt, result.tokens), atol=2e-5)


# -- reproducibility: (seed, chain index, settings) decide a chain's tokens -----------------


def key(result: Sample) -> tuple:
    return tuple(result.tokens), tuple(result.logprobs), result.stats.accepted, result.stats.mh_steps


@pytest.mark.parametrize("options", [{}, {"table_size": 1}, {"proposal_temp": None, "alpha": 2.0}])
def test_a_chain_does_not_depend_on_batch_width_or_resume(options):
    engine = flat_toy(n_vocab=40, scale=1.0)
    prompt = [3, 4]
    chosen = settings(**options)
    reference = [key(s) for s in sample(engine, prompt, chosen, num_samples=6, chains_per_batch=6)]
    assert len(set(reference)) > 1  # chains differ from each other
    variants = {
        "one chain at a time": sample(engine, prompt, chosen, 6, chains_per_batch=1),
        "wide rounds": sample(engine, prompt, chosen, 6, chains_per_batch=2, max_round_width=8),
        "-n 8": sample(engine, prompt, chosen, 8, chains_per_batch=8, max_round_width=2)[:6],
    }
    for name, results in variants.items():
        assert [key(s) for s in results] == reference, name
    resumed = sample(engine, prompt, chosen, 6, chain_indices=[4, 1], max_round_width=3)
    assert [key(s) for s in resumed] == [reference[4], reference[1]]
    assert max(s.stats.widest_round for s in variants["wide rounds"]) > 1


def test_a_different_seed_gives_different_chains():
    """Negative control for the test above: the comparison can fail."""
    engine = flat_toy(n_vocab=40, scale=1.0)
    first = [key(s) for s in sample(engine, [3, 4], settings(seed=1), 4)]
    second = [key(s) for s in sample(engine, [3, 4], settings(seed=2), 4)]
    assert first != second


# -- the same paths through llama.cpp -------------------------------------------------------


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory):
    """A tiny GGUF flat over 300 words (wider than a table of 256)."""
    return write_tiny_model(tmp_path_factory.mktemp("wide") / "wide.gguf", "--extra-words", "296",
                            "--logit-scale", "0.05")


@pytest.mark.parametrize("table_size, round_width", [(1, 1), (256, 4)])
def test_table_misses_on_llama_cpp(wide_gguf, table_size, round_width):
    with LlamaEngine(wide_gguf, n_threads=2) as engine:
        prompt = engine.tokenize("yes no")
        chosen = settings(table_size=table_size, max_tokens=16, block_size=8, mcmc_steps=5)
        chains = 3
        engine.allocate(len(prompt) + (1 + round_width) * chosen.max_tokens * chains + 8, 1 + (1 + round_width) * chains)
        samples = sample(engine, prompt, chosen, chains, chains_per_batch=chains, max_round_width=round_width)
        assert sum(s.stats.tokens_reevaluated for s in samples) > 0
        for result in samples:  # each token scored from scratch, the whole sequence in one fresh slot
            expected = llama_scratch_logprobs(engine, prompt, result.tokens)
            np.testing.assert_allclose(result.logprobs, expected, atol=1e-3)


def test_reused_generators_give_the_streams_they_stand_for():
    from ps_local.samplers.streams import Streams, stream

    streams = Streams(chain_seed=987654321, slots=2)
    streams.start(1, 5, slot=0).random(7)  # a used generator, reset below
    for kind, index in ((0, 0), (1, 5), (1, 2**40)):
        expected = stream(987654321, kind, index)
        generator = streams.start(kind, index, slot=0)
        assert generator.random(5).tolist() == expected.random(5).tolist()
        assert generator.integers(1, 100, 3).tolist() == expected.integers(1, 100, 3).tolist()
    assert streams.start(1, 6).random() != stream(987654321, 1, 5).random()


class ForgetfulEngine(ToyEngine):
    """A broken cache: copying a prefix loses its last position."""

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        super().copy_prefix(src, dst, max(0, length - 1) if src != 0 else length)


def test_the_invariant_check_catches_a_broken_cache():
    """Negative control: were the cache wrong, sampling stops with CacheInvariantError instead
    of scoring tokens in the wrong context."""
    from ps_local.samplers.mh import CacheInvariantError

    engine = ForgetfulEngine(["</s>"] + [f"t{i}" for i in range(1, 40)], eos=0, scale=0.3, eos_bias=-3.0)
    with pytest.raises(CacheInvariantError):
        sample(engine, [1, 2], settings(), num_samples=2)
