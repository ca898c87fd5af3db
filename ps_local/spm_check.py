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
import re
from typing import Mapping, Sequence

SPACE = "\u2581"  # SentencePiece's escaped space


def byte_fallback(pieces: Mapping[str, float], byte: int) -> bool:
    """Whether a byte has a token to fall back to (``<0xXX>``, or the byte itself)."""
    return f"<0x{byte:02X}>" in pieces or (byte < 0x80 and chr(byte) in pieces)


def fragments(text: str, specials: Sequence[str]) -> list[tuple[str, bool]]:
    """``text`` split around special-token texts as llama.cpp splits it before tokenizing:
    (fragment, whether a special token or the start precedes it)."""
    pattern = "|".join(re.escape(special) for special in sorted(specials, key=len, reverse=True) if special)
    parts = re.split(f"({pattern})", text) if pattern else [text]
    result, after_special = [], True
    for index, part in enumerate(parts):
        if index % 2:  # a special token's own text: encoded as that token
            after_special = True
        elif part:
            result.append((part, after_special))
            after_special = False
    return result


def unencodable_character(
    text: str, pieces: Mapping[str, float], add_space_prefix: bool = True, specials: Sequence[str] = ()
) -> str | None:
    """The first character of ``text`` that llama.cpp's SPM tokenizer would need a missing
    byte token for, or None when the text encodes. ``pieces``: token text -> score;
    ``specials``: texts llama.cpp encodes as one special token (split off first)."""
    for fragment, after_special in fragments(text, specials):
        # llama.cpp prefixes a space to a fragment at the start or after a special token.
        char = _unencodable_in_fragment((" " if add_space_prefix and after_special else "") + fragment, pieces)
        if char is not None:
            return char
    return None


def _unencodable_in_fragment(text: str, pieces: Mapping[str, float]) -> str | None:
    if not text:
        return None
    escaped = text.replace(" ", SPACE)
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
