"""Random streams keyed by (chain seed, kind, index): one per MH step and per block extension.

A chain's tokens then depend only on its seed and the settings: an MH step draws the same
numbers whether it is decoded alone or in a wide round, beside other chains or not, in a
first run or a resumed one. Philox is counter-based, so stream (kind, index) simply starts
2^64 blocks away from every other: no two streams ever overlap.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1


class Streams:
    """Hands out generators positioned at the start of a stream.

    Building a Philox generator costs ~30 µs, setting one's state ~6 µs, and a chain starts a
    stream per MH step: generators are reused, ``slots`` of them live at once (the proposals
    of one round each hold one).
    """

    def __init__(self, chain_seed: int, slots: int):
        self.chain_seed = chain_seed
        self._generators = [np.random.Generator(np.random.Philox(key=0)) for _ in range(slots)]

    def start(self, kind: int, index: int, slot: int = 0) -> np.random.Generator:
        """Generator number ``slot``, reset to the first number of stream (kind, index); the
        generator it returned for that slot before stops being valid."""
        key = (self.chain_seed << 2) | kind
        generator = self._generators[slot]
        generator.bit_generator.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": np.array([0, index, 0, 0], dtype=np.uint64),  # index << 64
                "key": np.array([key & _MASK64, key >> 64], dtype=np.uint64),
            },
            "buffer": np.zeros(4, dtype=np.uint64),
            "buffer_pos": 4,  # empty: the next draw starts at the counter
            "has_uint32": 0,
            "uinteger": 0,
        }
        return generator


def stream(chain_seed: int, kind: int, index: int) -> np.random.Generator:
    """A fresh generator at the start of stream (kind, index): the definition ``Streams`` follows."""
    return np.random.Generator(np.random.Philox(key=(chain_seed << 2) | kind, counter=index << 64))


def member_seed(chain_seed: int, step: int, member: int) -> int:
    """The chain seed of one member's own streams at one step of a run (an SMC particle's
    rejuvenation moves after token ``step``): distinct for every (chain seed, step < 2^40,
    member < 2^8), so no two members, steps or runs share a stream."""
    assert 0 <= step < 1 << 40 and 0 <= member < 1 << 8
    return (((chain_seed << 40) | step) << 8) | member
