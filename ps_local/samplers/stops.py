"""Stop strings: the token that completes one ends the sequence, like EOS."""

from __future__ import annotations

from typing import Callable, Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str], token_bytes: Callable[[int], bytes]):
        self.stops = [s.encode("utf-8") for s in stops]
        self._token_bytes = token_bytes
        self._longest = max((len(s) for s in self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def completes_stop(self, tokens: Sequence[int]) -> bool:
        """Whether the last token of ``tokens`` completes a stop string.

        Earlier tokens never did (the sequence would have ended there), so only a match
        that reaches into the last token counts.
        """
        if not self.stops or not tokens:
            return False
        last = self._token_bytes(tokens[-1])
        before = self._tail(tokens[:-1], self._longest - 1)
        window = before + last
        return any(window.find(stop, max(0, len(before) - len(stop) + 1)) >= 0 for stop in self.stops)

    def _tail(self, tokens: Sequence[int], size: int) -> bytes:
        pieces: list[bytes] = []
        length = 0
        for token in reversed(tokens):
            if length >= size:
                break
            piece = self._token_bytes(token)
            pieces.append(piece)
            length += len(piece)
        return b"".join(reversed(pieces))[-size:] if size > 0 else b""

    def cut(self, text: bytes) -> bytes:
        """The text before the first stop string."""
        ends = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[: min(ends)] if ends else text
