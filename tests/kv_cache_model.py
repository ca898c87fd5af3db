"""A model of llama.cpp's unified KV cache, behind the engine protocol, for tests of the books.

llama.cpp keeps every sequence in one pool of cells. A cell holds one position and the set of
sequences that hold it: ``seq_cp`` adds a sequence to existing cells (nothing is copied),
``seq_rm`` removes it, and a cell is free again only when no sequence holds it. A decode takes
one free cell per batch entry (an entry carried by several sequences takes one cell for all of
them) and fails when the pool has too few: the capacity is hard. Logits come from the numpy toy,
so samples can be compared bit for bit with runs on the toy alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ps_local.engine import EngineError
from ps_local.protocol import DecodeRequest
from ps_local.toy_engine import ToyEngine


class UnifiedKvCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.cells: list[tuple[int, set[int]] | None] = [None] * capacity  # (position, sequences)

    def used(self) -> int:
        return sum(cell is not None for cell in self.cells)

    def free(self) -> int:
        return self.capacity - self.used()

    def positions(self, sequence: int) -> list[int]:
        return sorted(cell[0] for cell in self.cells if cell is not None and sequence in cell[1])

    def seq_rm(self, sequence: int) -> None:
        for number, cell in enumerate(self.cells):
            if cell is not None and sequence in cell[1]:
                cell[1].discard(sequence)
                if not cell[1]:
                    self.cells[number] = None  # its last holder let go

    def seq_cp(self, source: int, destination: int, end: int) -> None:
        for cell in self.cells:
            if cell is not None and source in cell[1] and cell[0] < end:
                cell[1].add(destination)

    def add(self, position: int, sequences: Sequence[int]) -> None:
        for number, cell in enumerate(self.cells):
            if cell is None:
                self.cells[number] = (position, set(sequences))
                return
        raise EngineError("llama_decode failed: the KV cache is full")


class KvModelEngine(ToyEngine):
    """The toy model over a unified KV cache of ``capacity`` cells."""

    def __init__(self, vocab: Sequence[str], eos: int, capacity: int, seed: int = 0, scale: float = 1.5,
                 nan_prefix: Sequence[int] | None = None):
        super().__init__(vocab, eos, seed=seed, scale=scale)
        self.kv = UnifiedKvCache(capacity)
        self.nan_prefix = None if nan_prefix is None else list(nan_prefix)
        self.peak_cells = 0

    def logits(self, prefix: Sequence[int]) -> np.ndarray:
        row = super().logits(prefix)
        if self.nan_prefix is not None and list(prefix[: len(self.nan_prefix)]) == self.nan_prefix \
                and len(prefix) > len(self.nan_prefix) + 1:
            return np.full_like(row, np.nan)  # a job whose model output breaks mid-chain
        return row

    def reset(self) -> None:
        super().reset()
        self.kv = UnifiedKvCache(self.kv.capacity)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        super().copy_prefix(src, dst, length)  # checks the source holds ``length`` positions
        if src == dst:
            # seq_rm of the rest: positions past ``length``; with length 0, all of them
            kept = [cell for cell in self.kv.cells if cell is not None and dst in cell[1] and cell[0] < length]
            self.kv.seq_rm(dst)
            for cell in kept:
                cell[1].add(dst)
            return
        self.kv.seq_rm(dst)
        self.kv.seq_cp(src, dst, length)

    def decode(self, requests: Sequence[DecodeRequest]) -> np.ndarray:
        needed = sum(len(tokens) for _, tokens in requests)
        if needed > self.kv.free():
            raise EngineError("llama_decode failed: the KV cache is full")
        for slot, tokens in requests:
            slots = slot if isinstance(slot, tuple) else (slot,)
            start = self.length(slots[0])
            for offset in range(len(tokens)):
                self.kv.add(start + offset, slots)
        rows = super().decode(requests)
        self.peak_cells = max(self.peak_cells, self.kv.used())
        return rows

    def check(self) -> None:
        """Every slot holds exactly the positions 0 .. length - 1, one cell each."""
        for slot, tokens in self.slots.items():
            positions = self.kv.positions(slot)
            assert positions == list(range(len(tokens))), f"slot {slot} holds positions {positions[:8]}..."
