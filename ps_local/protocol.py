"""The small engine protocol the sampler runs on (llama.cpp or a numpy toy model)."""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import numpy as np

# (slot, tokens to append to it); or (slots, tokens): several slots that hold one same sequence
# take the same tokens, evaluated once (one batch entry carried by all of them).
Slots = int | tuple[int, ...]
DecodeRequest = tuple[Slots, Sequence[int]]


class SpecialToken(NamedTuple):
    """A token llama.cpp splits out of text before tokenizing the rest."""

    id: int
    text: str
    control: bool  # control or unknown: split out only when parsing special text (user-defined: always)
    lstrip: bool  # whitespace before it is dropped
    rstrip: bool  # whitespace after it is dropped


class Engine(Protocol):
    """A model with a KV cache split into numbered slots (llama.cpp sequences).

    Each slot holds a token sequence (prompt included) whose keys and values are cached.
    """

    n_vocab: int

    def tokenize(self, text: str) -> list[int]:
        """Token ids as the model's own tokenizer gives them (BOS where the model asks for it)."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for in generated text."""
        ...

    def is_end_of_generation(self, token: int) -> bool:
        ...

    def length(self, slot: int) -> int:
        """How many positions a slot caches (prompt included)."""
        ...

    def reset(self) -> None:
        """Empty every slot."""
        ...

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Make slot ``dst`` hold the first ``length`` cached positions of slot ``src``.

        Nothing is evaluated: the cached keys and values are shared or copied.
        """
        ...

    def decode(self, requests: Sequence[DecodeRequest]) -> np.ndarray:
        """Append tokens to slots, all in one model evaluation.

        Returns one row of raw logits per request: those predicting the token after the
        last one appended to that slot. A request for a tuple of slots, which must hold the
        same tokens, appends to each of them and costs what one slot's request costs.
        """
        ...
