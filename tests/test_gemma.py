"""The default model (Gemma 3 270M, from the demo extra): assembly and KV branching past
its 512-token sliding attention window."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ps_local.default_model import DEFAULT_MODEL_SHA256, assemble, chunk_paths, default_model_path
from ps_local.engine import LlamaEngine
from ps_local.errors import UserError

TOLERANCE = 2e-2  # logits are O(10); a broken cache moves them by O(1)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return default_model_path(tmp_path_factory.mktemp("cache"))


def test_default_model_is_assembled_and_checked(gemma):
    digest = hashlib.sha256(gemma.read_bytes()).hexdigest()
    assert digest == DEFAULT_MODEL_SHA256
    assert default_model_path(gemma.parent) == gemma  # reused, not assembled again


def test_a_damaged_chunk_leaves_no_file(tmp_path):
    chunks = chunk_paths()
    damaged = tmp_path / "damaged.part"
    damaged.write_bytes(chunks[1].read_bytes()[:-1] + b"\0")
    target = tmp_path / "model.gguf"
    with pytest.raises(UserError, match="sha256"):
        assemble([chunks[0], damaged, *chunks[2:]], target, DEFAULT_MODEL_SHA256)
    assert list(tmp_path.iterdir()) == [damaged]


def test_branching_beyond_the_sliding_window_matches_scratch(gemma):
    with LlamaEngine(gemma, n_threads=2) as engine:
        prompt = engine.tokenize(", ".join(str(i) for i in range(300)))
        assert len(prompt) > 600  # past the 512-token sliding window
        generated = engine.tokenize(" and then 301, 302", special=False)[1:]
        engine.allocate(len(prompt) + 2 * len(generated) + 16, 3)
        engine.decode([(0, prompt)])
        engine.copy_prefix(0, 1, len(prompt))
        rows = np.stack([engine.decode([(1, [t])])[0] for t in generated])
        # Branch after the second generated token: keep one, re-decode it, decode the rest.
        engine.copy_prefix(1, 2, len(prompt) + 1)
        branched = np.stack([engine.decode([(2, [t])])[0] for t in generated[1:]])
        # The current sequence survives the proposal's decoding.
        tail = engine.decode([(1, [generated[0]])])[0]

    with LlamaEngine(gemma, n_threads=2) as fresh:
        fresh.allocate(len(prompt) + len(generated) + 16, 1)
        fresh.decode([(0, prompt)])
        scratch = np.stack([fresh.decode([(0, [t])])[0] for t in generated])
        after_tail = fresh.decode([(0, [generated[0]])])[0]
    np.testing.assert_allclose(rows, scratch, atol=TOLERANCE)
    np.testing.assert_allclose(branched, scratch[1:], atol=TOLERANCE)
    np.testing.assert_allclose(tail, after_tail, atol=TOLERANCE)
    # Negative control: the rows differ from each other far beyond the tolerance.
    assert np.abs(scratch[1] - scratch[2]).max() > 50 * TOLERANCE


def test_a_q8_0_cache_samples(gemma):
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ps_local.cli", "generate", str(gemma), "The sky is",
                             "--max-tokens", "6", "--method", "power", "--mcmc-steps", "2", "--block-size", "6",
                             "--cache-type", "q8_0",
                             "--seed", "1", "--json", "--threads", "2"],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"]) == 6
