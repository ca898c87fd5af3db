"""Recent prompts kept in their KV slots, for later requests that share a prefix with them.

The same question asked again, or a chat's system prompt and template, is then copied from the
cache (``seq_cp``) instead of decoded. Entries are only ever a convenience: they are dropped,
least recently used first, whenever their slot or cells are needed, and at most ``capacity``
are kept. Dropping an entry gives back only the cells no one else holds (the ledger decides).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

PROMPT_CACHE = 4  # prompts kept after their chains start


def cache_holder(entry: int) -> tuple[str, int]:
    """The ledger holder of a cache entry."""
    return ("cache", entry)


@dataclass
class PromptCache:
    capacity: int = PROMPT_CACHE
    _entries: OrderedDict[int, tuple[int, ...]] = field(default_factory=OrderedDict)  # LRU first
    _next: int = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        """(entry, tokens), least recently used first."""
        return iter(list(self._entries.items()))

    def holds(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self._entries.values()

    def add(self, tokens: Sequence[int]) -> int:
        """A new entry, most recently used."""
        entry = self._next
        self._next += 1
        self._entries[entry] = tuple(tokens)
        return entry

    def touch(self, entry: int) -> None:
        self._entries.move_to_end(entry)

    def oldest(self) -> int | None:
        return next(iter(self._entries), None)

    def remove(self, entry: int) -> None:
        del self._entries[entry]

    def over_capacity(self) -> bool:
        return len(self._entries) > self.capacity

    def copy(self) -> "PromptCache":
        return PromptCache(self.capacity, OrderedDict(self._entries), self._next)
