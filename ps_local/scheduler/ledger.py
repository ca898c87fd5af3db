"""Who holds every KV slot and cell: the scheduler's one set of books.

llama.cpp keeps all sequences in one unified KV cache. ``seq_cp`` does not copy cells, it adds a
sequence to them, so a prompt decoded once is held at the same time by its own slot, by every
chain that copied it, by the prompt cache, and by later prompts that copied a prefix of it. A
cell goes back to the cache only when the last sequence holding it lets go. The ledger mirrors
that: every slot, every prompt cell and every worst-case reservation has a named holder, and
the free count is computed from the holders, never adjusted by hand.

Prompt cells are exact: they are decoded once, so their count is known. They form a tree of
segments (a later prompt that copies the first ``k`` positions of an earlier one hangs its own
segment under the segment holding position ``k - 1``, splitting it there if needed); a segment
lives while a holder holds it or a segment below it. Everything a chain decodes after the prompt
is a worst-case reservation (its slots times its token budget), so a running chain never finds
the cache full.

Pure bookkeeping: nothing here touches an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

Holder = Hashable  # ("prompt", job), ("chain", job, index), ("cache", entry): who holds what


class LedgerError(RuntimeError):
    """A bug in ps-local: the books were asked for something they do not allow."""


@dataclass(eq=False)
class _Segment:
    """Prompt cells at positions ``start`` .. ``end - 1``, decoded once and shared by every
    sequence whose prompt runs through them."""

    start: int
    end: int
    parent: "_Segment | None"
    holders: int = 0  # holders whose prompt ends in this segment
    children: int = 0  # live segments hanging below it

    @property
    def cells(self) -> int:
        return self.end - self.start

    def path(self) -> list["_Segment"]:
        """This segment and every one above it, root last."""
        segments, segment = [], self
        while segment is not None:
            segments.append(segment)
            segment = segment.parent
        return segments


@dataclass
class KvLedger:
    """``slots`` KV sequences and (None: not counted) ``cells`` KV cells, with their holders."""

    slots: int
    cells: int | None
    _slot_holder: dict[int, Holder] = field(default_factory=dict)
    _prompt: dict[Holder, _Segment] = field(default_factory=dict)  # the last segment of each holder's prompt
    _reserved: dict[Holder, int] = field(default_factory=dict)  # worst-case cells beyond the prompt
    _prompt_cells: int = 0  # cells of live segments

    # -- what is free ----------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._slot_holder)

    @property
    def free_cells(self) -> int | None:
        if self.cells is None:
            return None
        return self.cells - self._prompt_cells - sum(self._reserved.values())

    @property
    def used_cells(self) -> int:
        """Cells that holders hold or reserve (the upper bound on what the cache physically holds)."""
        return self._prompt_cells + sum(self._reserved.values())

    def fits(self, slots: int, cells: int) -> bool:
        free = self.free_cells
        return slots <= self.free_slots and (free is None or cells <= free)

    # -- slots -----------------------------------------------------------------------------

    def take_slots(self, holder: Holder, count: int) -> list[int]:
        """The ``count`` lowest free slots, now held by ``holder``."""
        if count > self.free_slots:
            raise LedgerError(f"{holder} asked for {count} slots, {self.free_slots} are free")
        taken = [slot for slot in range(self.slots) if slot not in self._slot_holder][:count]
        for slot in taken:
            self._slot_holder[slot] = holder
        return taken

    def slots_of(self, holder: Holder) -> list[int]:
        return sorted(slot for slot, owner in self._slot_holder.items() if owner == holder)

    def holder_of(self, slot: int) -> Holder | None:
        return self._slot_holder.get(slot)

    # -- prompt cells ----------------------------------------------------------------------

    def add_prompt(self, holder: Holder, length: int, source: Holder | None = None, shared: int = 0) -> None:
        """``holder`` holds a prompt of ``length`` cells whose first ``shared`` were copied from
        ``source``'s prompt; the rest are new cells it decodes."""
        if holder in self._prompt:
            raise LedgerError(f"{holder} holds a prompt already")
        parent = None
        if shared:
            if source not in self._prompt:
                raise LedgerError(f"{holder} copies from {source}, which holds no prompt")
            if shared > self._prompt[source].end or shared > length:
                raise LedgerError(f"{holder} copies {shared} cells of a {self._prompt[source].end}-cell prompt")
            parent = self._split_at(self._prompt[source], shared)
        if length == shared:
            self._hold(holder, parent)  # type: ignore[arg-type]
            return
        segment = _Segment(shared, length, parent)
        if parent is not None:
            parent.children += 1
        self._prompt_cells += segment.cells
        self._hold(holder, segment)

    def share_prompt(self, holder: Holder, source: Holder) -> None:
        """``holder`` holds the same prompt cells as ``source`` (a chain's copies of its prompt)."""
        if holder in self._prompt:
            raise LedgerError(f"{holder} holds a prompt already")
        self._hold(holder, self._prompt[source])

    def prompt_length(self, holder: Holder) -> int:
        segment = self._prompt.get(holder)
        return 0 if segment is None else segment.end

    def _hold(self, holder: Holder, segment: _Segment) -> None:
        segment.holders += 1
        self._prompt[holder] = segment

    def _split_at(self, last: _Segment, position: int) -> _Segment:
        """The segment on ``last``'s path that ends at ``position``, splitting one if needed."""
        for segment in last.path():
            if segment.start < position <= segment.end:
                if position == segment.end:
                    return segment
                # The first part becomes a segment of its own above the rest: holders of
                # ``segment`` still run through both.
                top = _Segment(segment.start, position, segment.parent, children=1)
                segment.start, segment.parent = position, top
                return top
        raise LedgerError(f"no segment holds position {position - 1}")

    def _let_go(self, segment: _Segment) -> None:
        segment.holders -= 1
        while segment is not None and segment.holders == 0 and segment.children == 0:
            self._prompt_cells -= segment.cells
            parent = segment.parent
            if parent is not None:
                parent.children -= 1
            segment = parent  # type: ignore[assignment]

    # -- reservations ----------------------------------------------------------------------

    def reserve(self, holder: Holder, cells: int) -> None:
        """Worst-case cells ``holder`` may decode beyond its prompt."""
        self._reserved[holder] = self._reserved.get(holder, 0) + cells

    # -- letting go ------------------------------------------------------------------------

    def release(self, holder: Holder) -> list[int]:
        """``holder`` lets go of everything; the slots it held (to be emptied in the engine)."""
        slots = self.slots_of(holder)
        for slot in slots:
            del self._slot_holder[slot]
        segment = self._prompt.pop(holder, None)
        if segment is not None:
            self._let_go(segment)
        self._reserved.pop(holder, None)
        return slots

    def transfer(self, holder: Holder, new_holder: Holder) -> None:
        """Everything ``holder`` holds is now ``new_holder``'s (a job's prompt joins the cache)."""
        if new_holder in self._prompt or new_holder in self._reserved or self.slots_of(new_holder):
            raise LedgerError(f"{new_holder} holds something already")
        for slot in self.slots_of(holder):
            self._slot_holder[slot] = new_holder
        if holder in self._prompt:
            self._prompt[new_holder] = self._prompt.pop(holder)
        if holder in self._reserved:
            self._reserved[new_holder] = self._reserved.pop(holder)

    def holders(self) -> set[Holder]:
        return set(self._slot_holder.values()) | set(self._prompt) | set(self._reserved)

    def copy(self) -> "KvLedger":
        """An independent copy (admission plans on one; segments shared by holders stay shared)."""
        clones: dict[int, _Segment] = {}

        def clone(segment: _Segment | None) -> _Segment | None:
            if segment is None:
                return None
            twin = clones.get(id(segment))
            if twin is None:
                twin = clones[id(segment)] = _Segment(segment.start, segment.end, None, segment.holders,
                                                      segment.children)
                twin.parent = clone(segment.parent)
            return twin

        return KvLedger(self.slots, self.cells, dict(self._slot_holder),
                        {holder: clone(segment) for holder, segment in self._prompt.items()},  # type: ignore[misc]
                        dict(self._reserved), self._prompt_cells)

    # -- invariants ------------------------------------------------------------------------

    def check(self) -> None:
        """LedgerError unless the books add up: live segments are exactly those held, directly
        or below, their cells are the prompt count, and nothing is over-committed."""
        live: dict[int, _Segment] = {}
        for segment in self._prompt.values():
            for member in segment.path():
                live[id(member)] = member
        holders = {key: 0 for key in live}
        children = {key: 0 for key in live}
        for segment in self._prompt.values():
            holders[id(segment)] += 1
        for segment in live.values():
            if segment.parent is not None:
                children[id(segment.parent)] += 1
                if segment.parent.end != segment.start:
                    raise LedgerError("a prompt segment does not start where its parent ends")
            elif segment.start != 0:
                raise LedgerError("a top prompt segment does not start at position 0")
        for key, segment in live.items():
            if segment.holders != holders[key] or segment.children != children[key] or segment.cells <= 0:
                raise LedgerError(f"segment {segment.start}..{segment.end} miscounts its holders or children")
        if sum(segment.cells for segment in live.values()) != self._prompt_cells:
            raise LedgerError("the prompt cell count drifted from the live segments")
        if self.free_slots < 0 or (self.free_cells is not None and self.free_cells < 0):
            raise LedgerError(f"over-committed: {self.free_slots} slots, {self.free_cells} cells free")
        if any(cells < 0 for cells in self._reserved.values()):
            raise LedgerError("a negative reservation")
