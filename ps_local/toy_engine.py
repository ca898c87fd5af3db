"""A numpy autoregressive toy model behind the engine protocol.

Its logits are a deterministic function of the whole prefix, so the sequence space of a
short generation can be enumerated and p^alpha computed exactly. Used by the tests.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from .protocol import DecodeRequest


class ToyEngine:
    def __init__(self, vocab: Sequence[str], eos: int, seed: int = 0, scale: float = 1.5, eos_bias: float = 0.0):
        self.vocab = list(vocab)
        self.n_vocab = len(self.vocab)
        self.eos = eos
        self.seed = seed
        self.scale = scale
        self.eos_bias = eos_bias
        self.slots: dict[int, list[int]] = {}
        self.tokens_decoded = 0

    def tokenize(self, text: str) -> list[int]:
        return [self.vocab.index(word) for word in text.split()]

    def token_bytes(self, token: int) -> bytes:
        return (" " + self.vocab[token]).encode()

    def is_end_of_generation(self, token: int) -> bool:
        return token == self.eos

    def logits(self, prefix: Sequence[int]) -> np.ndarray:
        digest = hashlib.blake2b(repr((self.seed, tuple(prefix))).encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        row = self.scale * rng.standard_normal(self.n_vocab)
        row[self.eos] += self.eos_bias
        return row.astype(np.float32)

    def length(self, slot: int) -> int:
        return len(self.slots.get(slot, []))

    def slot_tokens(self, slot: int) -> list[int]:
        """The tokens a slot holds (the sampler checks its cache invariant against them)."""
        return list(self.slots.get(slot, []))

    def reset(self) -> None:
        self.slots.clear()

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        source = self.slots.get(src, [])
        if length > len(source):
            raise ValueError(f"slot {src} holds {len(source)} positions, cannot copy {length}")
        self.slots[dst] = source[:length]

    def decode(self, requests: Sequence[DecodeRequest]) -> np.ndarray:
        rows = []
        for slot, tokens in requests:
            if not tokens:
                raise ValueError("decode needs at least one token")
            slots = slot if isinstance(slot, tuple) else (slot,)
            held = [self.slots.setdefault(s, []) for s in slots]
            if any(sequence != held[0] for sequence in held):
                raise ValueError(f"slots {slots} share a decode but hold different tokens")
            for sequence in held:
                sequence.extend(tokens)
            self.tokens_decoded += len(tokens)
            rows.append(self.logits(held[0]))
        return np.stack(rows)
