"""The Python API under concurrent use (tiny GGUF through llama.cpp)."""

from __future__ import annotations

import pytest

import ps_local
from ps_local.scheduler import JobCancelled


def test_a_request_larger_than_the_busy_cache_waits_for_it_to_grow(tiny_gguf):
    """Finding 9: a second request that needs a larger cache than the one the first request
    sized used to be refused while the first ran; now it waits, the cache grows when idle, and
    both are answered."""
    with ps_local.load(str(tiny_gguf), threads=2) as model:
        small = model.submit("yes no", method="standard", max_tokens=4, seed=1)
        cells = model.session.scheduler.cells
        large = model.submit("yes no maybe", method="power", n=3, max_tokens=40, block_size=8, seed=2)
        assert model.session.pending() == 2
        later = model.submit("no", method="standard", max_tokens=4, seed=3)  # queues behind the large one
        model.wait([small, large, later])
        assert len(small.result()) == 1 and len(large.result()) == 3 and len(later.result()) == 1
        assert model.session.scheduler.cells > cells
        alone = model.generate("yes no maybe", method="power", n=3, max_tokens=40, block_size=8, seed=2)
        assert [s.tokens for s in large.result()] == [s.tokens for s in alone]


def test_a_request_waiting_for_room_can_be_cancelled(tiny_gguf):
    with ps_local.load(str(tiny_gguf), threads=2) as model:
        small = model.submit("yes no", method="standard", max_tokens=4, seed=1)
        large = model.submit("yes", method="standard", n=4, max_tokens=60, seed=2)
        large.cancel()
        model.wait([small, large])
        assert len(small.result()) == 1
        with pytest.raises(JobCancelled):
            large.result()
        assert model.session.pending() == 0
