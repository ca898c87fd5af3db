"""The KV cache ps-local will allocate for a model, computed from its GGUF metadata.

The engine (engine.py) asks llama.cpp for one unified cache of ``cells`` positions shared by
``slots`` sequences, with ``swa_full`` set: sliding-window layers keep every cell too, since
branching removes a suffix and must find the prefix still there. So every attention layer
keeps every cell, and the cache is ``cells × Σ_layers (K row + V row)`` bytes.

Not modelled: MLA caches (DeepSeek 2/3 store a compressed latent instead of per-head K/V)
and layers that share another layer's cache (Gemma 3n); their estimate is an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .errors import UserError
from .gguf_file import architecture

# Bytes per block of elements of a cache type: f16 is 2 bytes each; q8_0 stores 32 int8
# values with one f16 scale, 34 bytes per 32 (ggml's block_q8_0).
CACHE_TYPES: dict[str, tuple[int, int]] = {"f16": (1, 2), "q8_0": (32, 34)}
SPARE_CELLS = 8  # session.py allocates a few cells beyond the longest possible run
CTX_PADDING = 256  # llama.cpp rounds the context it is asked for up to a multiple of this (0.3.36 build)


@dataclass(frozen=True)
class KvShape:
    """What the KV cache's size depends on: per-layer KV head counts and head sizes."""

    architecture: str
    head_count_kv: tuple[int, ...]  # one per layer; 0 for a layer without attention
    key_length: int
    value_length: int
    context_length: int

    @property
    def n_layer(self) -> int:
        return len(self.head_count_kv)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, object]) -> "KvShape":
        """The shape from ``{arch}.*`` keys, with llama.cpp's defaults for the optional ones.

        UserError, one line, when a key it needs is missing or malformed.
        """
        arch = architecture(metadata)

        def integer(name: str, default: int | None = None) -> int:
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise UserError(f"the model's GGUF metadata has no {arch}.{name}")
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"the model's GGUF metadata {arch}.{name} is {value!r}, not an integer")
            return value

        n_layer = integer("block_count")
        n_head = metadata.get(f"{arch}.attention.head_count", 0)
        heads = n_head if isinstance(n_head, list) else [n_head] * n_layer
        kv = metadata.get(f"{arch}.attention.head_count_kv", heads)  # absent: no grouped-query attention
        kv_heads = kv if isinstance(kv, list) else [kv] * n_layer
        if len(kv_heads) != n_layer or not all(isinstance(h, int) for h in kv_heads):
            raise UserError(f"the model's GGUF metadata {arch}.attention.head_count_kv is not one count per layer")
        # The head size defaults to embedding / heads (llama.cpp's n_embd_head_k), from layer 0's count.
        first_heads = heads[0] if heads and heads[0] else 0
        default_head = integer("embedding_length") // first_heads if first_heads else None
        return cls(
            architecture=arch,
            head_count_kv=tuple(int(h) for h in kv_heads),
            key_length=integer("attention.key_length", default_head),
            value_length=integer("attention.value_length", default_head),
            context_length=integer("context_length"),
        )


def _row_bytes(elements: int, cache_type: str) -> int:
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {cache_type!r}; known: {', '.join(CACHE_TYPES)}")
    block, size = CACHE_TYPES[cache_type]
    return -(-elements // block) * size


def kv_bytes_per_cell(shape: KvShape, cache_type: str = "f16") -> int:
    """Bytes one cache cell (one position of one sequence) takes over all layers, K and V.

    Each layer's K and V are one row of ``heads × head size`` elements per cell (ggml's row
    size). Whether llama.cpp accepts the type for this model at all is check_cache_type's job.
    """
    return sum(
        _row_bytes(heads * shape.key_length, cache_type) + _row_bytes(heads * shape.value_length, cache_type)
        for heads in shape.head_count_kv
    )


def check_cache_type(shape: KvShape, cache_type: str) -> None:
    """UserError unless llama.cpp can store this model's K and V as ``cache_type``.

    llama.cpp refuses a block type whose block size does not divide the head size (it logs
    the reason and returns no context, which otherwise reads like running out of memory).
    """
    if cache_type not in CACHE_TYPES:
        raise UserError(f"unknown KV cache type {cache_type!r}; choose one of {', '.join(CACHE_TYPES)}")
    block = CACHE_TYPES[cache_type][0]
    for what, length in (("key", shape.key_length), ("value", shape.value_length)):
        if length % block:
            raise UserError(
                f"--cache-type {cache_type} needs attention heads whose size is a multiple of {block}; "
                f"this model's {what} heads are {length} long: use --cache-type f16"
            )


@dataclass(frozen=True)
class CachePlan:
    """The cache one ps-local run allocates: ``cells`` is what it asks llama.cpp for."""

    cells: int
    slots: int
    bytes_per_cell: int | None  # None: an architecture whose cache layout is not known here
    cache_type: str

    @property
    def allocated_cells(self) -> int:
        """The cells llama.cpp really allocates (its n_ctx): ``cells`` padded up."""
        return -(-self.cells // CTX_PADDING) * CTX_PADDING

    @property
    def bytes(self) -> int | None:
        return None if self.bytes_per_cell is None else self.allocated_cells * self.bytes_per_cell

    def describe(self) -> str:
        """E.g. ``KV cache: 6,152 cells (6,400 allocated) × 72 KiB = 450 MiB (f16), 10 sequences``."""
        padded = f" ({self.allocated_cells:,} allocated)" if self.allocated_cells != self.cells else ""
        if self.bytes is None or self.bytes_per_cell is None:
            size = "size unknown for this architecture"
        else:
            size = f"× {format_bytes(self.bytes_per_cell)} = {format_bytes(self.bytes)}"
        return f"KV cache: {self.cells:,} cells{padded} {size} ({self.cache_type}), {self.slots} sequences"


def plan_cache(
    shape: KvShape | None,
    prompt_tokens: int,
    max_tokens: int,
    chains: int = 1,
    slots_per_chain: int = 1,
    cache_type: str = "f16",
) -> CachePlan:
    """The cache for ``chains`` chains of up to ``max_tokens`` tokens after the prompt.

    Same sizing as Session.generate: the prompt once, then for every chain ``slots_per_chain``
    sequences of up to ``max_tokens`` cells each (an MH chain's sequence and one per proposal in
    flight; 1 for the baselines; one per SMC particle; that for each PPT replica).
    """
    cells = prompt_tokens + slots_per_chain * max_tokens * chains + SPARE_CELLS
    return CachePlan(
        cells=cells,
        slots=1 + slots_per_chain * chains,
        bytes_per_cell=None if shape is None else kv_bytes_per_cell(shape, cache_type),
        cache_type=cache_type,
    )


def format_bytes(count: int | float) -> str:
    """Binary units, about three significant figures: ``512 B``, ``72 KiB``, ``1.41 GiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    if value == int(value):
        return f"{int(value):,} {unit}"
    return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"
