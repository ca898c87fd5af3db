"""The llama.cpp engine: branching the KV cache gives the logits of a from-scratch evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from ps_local.engine import EngineError, LlamaEngine

TOLERANCE = 1e-3  # float32 noise between batch layouts; a wrong cache is off by O(1)


def scratch_logits(path, tokens: list[int]) -> np.ndarray:
    """Logits after every token, evaluated one token at a time in a fresh context."""
    with LlamaEngine(path, n_threads=2) as engine:
        engine.allocate(len(tokens) + 8, 1)
        return np.stack([engine.decode([(0, [token])])[0] for token in tokens])


@pytest.fixture()
def engine(tiny_gguf):
    with LlamaEngine(tiny_gguf, n_threads=2) as engine:
        engine.allocate(128, 3)
        yield engine


def test_tokenize_adds_bos_and_handles_any_text(engine):
    tokens = engine.tokenize("yes no maybe!")
    assert tokens[0] == 1 and len(tokens) == 5
    assert b"".join(engine.token_bytes(t) for t in tokens) == b" yes no maybe!"
    # Text outside the word list falls back to byte tokens instead of aborting llama.cpp.
    assert b"".join(engine.token_bytes(t) for t in engine.tokenize("Héllo"))[-6:] == "Héllo".encode()
    assert engine.is_end_of_generation(2) and not engine.is_end_of_generation(259)


def test_branch_accept_and_reject_match_scratch(engine, tiny_gguf):
    prompt = engine.tokenize("yes no")
    current = prompt + [259, 261, 260, 262, 259, 260]  # prompt and six generated tokens
    engine.decode([(0, prompt)])
    engine.copy_prefix(0, 1, len(prompt))
    current_rows = [engine.decode([(1, [token])])[0] for token in current[len(prompt):]]

    # Branch at resample index m = 3: keep two generated tokens, re-decode the second.
    keep = 2
    branch = len(prompt) + keep - 1
    engine.copy_prefix(1, 2, branch)
    row = engine.decode([(2, [current[branch]])])[0]
    np.testing.assert_allclose(row, current_rows[keep - 1], atol=TOLERANCE)
    proposal = current[: branch + 1] + [262, 262, 261, 2]
    proposal_rows = [engine.decode([(2, [token])])[0] for token in proposal[branch + 1 :]]
    expected = scratch_logits(tiny_gguf, proposal)[branch + 1 :]
    np.testing.assert_allclose(np.stack(proposal_rows), expected, atol=TOLERANCE)

    # Rejected: the current sequence (slot 1) was not disturbed by the proposal.
    extension = [261, 259]
    rows = engine.decode([(1, extension)])
    expected = scratch_logits(tiny_gguf, current + extension)
    np.testing.assert_allclose(rows[0], expected[-1], atol=TOLERANCE)
    np.testing.assert_allclose(np.stack(current_rows), expected[len(prompt) : len(current)], atol=TOLERANCE)

    # Accepted: the proposal slot becomes current and grows on; the old slot is reused.
    grown = engine.decode([(2, [259])])[0]
    np.testing.assert_allclose(grown, scratch_logits(tiny_gguf, proposal + [259])[-1], atol=TOLERANCE)
    engine.copy_prefix(2, 1, len(prompt) + 1)
    row = engine.decode([(1, [proposal[len(prompt) + 1]])])[0]
    np.testing.assert_allclose(row, scratch_logits(tiny_gguf, proposal[: len(prompt) + 2])[-1], atol=TOLERANCE)


def test_batched_decode_of_several_slots_matches_scratch(engine, tiny_gguf):
    prompt = engine.tokenize("maybe")
    engine.decode([(0, prompt)])
    engine.copy_prefix(0, 1, len(prompt))
    engine.copy_prefix(0, 2, len(prompt))
    rows = engine.decode([(1, [259, 260]), (2, [261])])
    np.testing.assert_allclose(rows[0], scratch_logits(tiny_gguf, prompt + [259, 260])[-1], atol=TOLERANCE)
    np.testing.assert_allclose(rows[1], scratch_logits(tiny_gguf, prompt + [261])[-1], atol=TOLERANCE)


def test_a_wrong_cache_would_be_caught(engine, tiny_gguf):
    """Negative control: logits after a different history differ by far more than the tolerance."""
    prompt = engine.tokenize("yes")
    row = engine.decode([(0, prompt + [259, 260])])[0]
    other = scratch_logits(tiny_gguf, prompt + [261, 260])[-1]
    assert np.abs(row - other).max() > 100 * TOLERANCE


def test_copy_beyond_what_a_slot_holds_is_refused(engine):
    engine.decode([(0, [1, 259])])
    with pytest.raises(EngineError):
        engine.copy_prefix(0, 1, 5)


def test_one_batch_entry_carried_by_several_slots(tiny_gguf):
    """SMC particles with one sequence append their token through one entry: every slot takes
    it, and each continues on its own afterwards as if it had decoded the token alone."""
    with LlamaEngine(tiny_gguf, n_threads=2) as engine:
        engine.allocate(128, 4)
        prompt = engine.tokenize("yes no")
        engine.decode([(0, prompt)])
        for slot in (1, 2):
            engine.copy_prefix(0, slot, len(prompt))
        engine.decode([((1, 2), [259])])
        shared, = engine.decode([((1, 2), [261])])
        assert engine.length(1) == engine.length(2) == len(prompt) + 2
        one, two = engine.decode([(1, [260]), (2, [262])])
        engine.copy_prefix(1, 1, 0)  # the first sharer lets go; the second keeps the cells
        after, = engine.decode([(2, [259])])
        with pytest.raises(EngineError, match="share a decode"):
            engine.decode([((0, 2), [259])])  # slots of different lengths cannot share an entry
    expected = scratch_logits(tiny_gguf, prompt + [259, 261, 262, 259])
    # Batches of two sequences move these logits by 2.4e-3 with or without a shared entry
    # (measured); a token decoded onto a wrong cache is off by O(1).
    close = dict(atol=5 * TOLERANCE)
    np.testing.assert_allclose(shared, expected[len(prompt) + 1], **close)
    np.testing.assert_allclose(two, expected[len(prompt) + 2], **close)
    np.testing.assert_allclose(after, expected[len(prompt) + 3], **close)
    np.testing.assert_allclose(one, scratch_logits(tiny_gguf, prompt + [259, 261, 260])[-1], **close)
    assert np.abs(expected[-1] - expected[-2]).max() > 50 * TOLERANCE  # the negative control: rows differ


def test_the_toy_refuses_a_shared_entry_for_different_sequences():
    from ps_local.toy_engine import ToyEngine

    toy = ToyEngine(["</s>", "a", "b"], eos=0)
    toy.decode([(0, [1]), (1, [2])])
    with pytest.raises(ValueError, match="hold different tokens"):
        toy.decode([((0, 1), [1])])
