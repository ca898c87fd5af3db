"""Which text a SentencePiece vocabulary without byte fall-back cannot encode.

llama.cpp's SPM tokenizer merges characters pairwise into vocabulary pieces (best score
first) and encodes a character that ends up in no piece through its byte tokens
(``<0xE9>``); when a vocabulary lacks those, it throws inside ``llama_tokenize`` and the whole
process aborts. This module replays the merging (llm_tokenizer_spm in llama-vocab.cpp) so the
engine can refuse such a prompt with one line before llama.cpp sees it. Only vocabularies
missing some of the 256 byte tokens need it: with all of them, any text encodes.
"""

from __future__ import annotations

import heapq
from typing import Mapping

SPACE = "\u2581"  # SentencePiece's escaped space


def byte_fallback(pieces: Mapping[str, float], byte: int) -> bool:
    """Whether a byte has a token to fall back to (``<0xXX>``, or the byte itself)."""
    return f"<0x{byte:02X}>" in pieces or (byte < 0x80 and chr(byte) in pieces)


def unencodable_character(text: str, pieces: Mapping[str, float], add_space_prefix: bool = True) -> str | None:
    """The first character of ``text`` that llama.cpp's SPM tokenizer would need a missing
    byte token for, or None when the text encodes. ``pieces``: token text -> score."""
    if not text:
        return None
    escaped = ((" " if add_space_prefix else "") + text).replace(" ", SPACE)
    symbols = list(escaped)  # one symbol per character to begin with
    alive = [True] * len(symbols)
    following = list(range(1, len(symbols))) + [-1]
    preceding = list(range(-1, len(symbols) - 1))
    queue: list[tuple[float, int, int, str]] = []

    def try_pair(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        joined = symbols[left] + symbols[right]
        if joined in pieces:
            # Highest score first, then the leftmost pair, as llm_bigram_spm orders them.
            heapq.heappush(queue, (-pieces[joined], left, right, joined))

    for index in range(1, len(symbols)):
        try_pair(index - 1, index)
    while queue:
        _, left, right, joined = heapq.heappop(queue)
        if not (alive[left] and alive[right]) or symbols[left] + symbols[right] != joined:
            continue  # one side was merged into something else since
        symbols[left] = joined
        alive[right] = False
        following[left] = following[right]
        if following[right] >= 0:
            preceding[following[right]] = left
        try_pair(preceding[left], left)
        try_pair(left, following[left])
    for index, symbol in enumerate(symbols):
        # A merged symbol is a piece by construction; a lone character may not be.
        if alive[index] and symbol not in pieces:
            if not all(byte_fallback(pieces, byte) for byte in symbol.encode("utf-8")):
                return " " if symbol == SPACE else symbol
    return None
