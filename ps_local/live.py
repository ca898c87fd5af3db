"""The live view on a terminal while a sample is drawn: a status line and, above it, the chain's
current text (dim: an MH step may still change it), redrawn in place and erased at the end.

Only ever drawn on a terminal: a ``LiveView`` on a stream that is not a TTY writes nothing.
"""

from __future__ import annotations

import codecs
import os
import shutil
import time
import unicodedata
from typing import Callable, Sequence, TextIO

from .samplers.base import Progress

DIM, RESET = "\x1b[2m", "\x1b[0m"
PLAIN_MARK = "| "  # what marks the provisional text where NO_COLOR forbids dim


def char_width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def clean(text: str) -> str:
    """The text with tabs as spaces and no control characters (the model's text must not move
    the cursor or change colours); newlines stay."""
    text = text.replace("\t", "    ")
    return "".join(c if c == "\n" or unicodedata.category(c) not in ("Cc", "Cf") else " " for c in text)


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` columns: ``text`` split at its newlines and cut where too wide."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line, used = "", 0
        for char in paragraph:
            w = char_width(char)
            if used + w > width:
                lines.append(line)
                line, used = "", 0
            line, used = line + char, used + w
        lines.append(line)
    return lines


def fit(line: str, width: int) -> str:
    """``line`` cut to ``width`` columns."""
    used = 0
    for i, char in enumerate(line):
        used += char_width(char)
        if used > width:
            return line[: max(0, i - 1)] + "…" if width > 0 else ""
    return line


def terminal_size(stream: TextIO) -> os.terminal_size:
    try:
        return os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size()


class LiveView:
    """A status line (block, MH step, moved/accepted, tokens decoded, tokens/s, elapsed) and the
    text of one chain, drawn on ``stream`` and redrawn in place at most every ``interval_s``.

    ``progress`` is a sampler progress callback (it is also the object's ``__call__``), ``token``
    a token callback (plain decoding: ``(chain, tokens so far)``). ``clear`` erases what is drawn
    (call it before printing anything); the next report draws again. ``token_bytes`` turns a
    token id into its bytes; ``hidden`` says which tokens the text leaves out (EOS).
    Several chains: the status of each (#chain b block s MH step a accepted), chain 0's text
    (or the latest to report). ``color``: None follows NO_COLOR. Writes nothing when ``stream`` is not a terminal.
    """

    def __init__(self, stream: TextIO, token_bytes: Callable[[int], bytes], *,
                 hidden: Callable[[int], bool] | None = None, color: bool | None = None,
                 interval_s: float = 0.1, text_lines: int = 4, clock: Callable[[], float] = time.monotonic,
                 size: Callable[[], os.terminal_size] | None = None):
        self.stream = stream
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.token_bytes = token_bytes
        self.hidden = hidden or (lambda token: False)
        self.color = (not os.environ.get("NO_COLOR")) if color is None else color
        self.interval_s = interval_s
        self.text_lines = text_lines
        self.clock = clock
        self.size = size or (lambda: terminal_size(stream))
        self.method = self.hint = ""
        self.started = clock()
        self.reports: dict[int, Progress] = {}  # each unfinished chain's latest progress
        self.texts: dict[int, tuple[int, ...]] = {}  # each unfinished chain's latest tokens
        self.latest: int | None = None  # the chain that reported last
        self.finished_decoded = 0  # what the chains that have ended decoded (at their last report)
        self.drawn = 0  # lines on the screen now
        self.last_draw: float | None = None

    # -- what the sampler reports

    def start(self, method: str, hint: str = "") -> None:
        """A request begins: forget the last one's chains, show that sampling is under way
        (and ``hint``, until the first report)."""
        self.method, self.hint, self.started = method, hint, self.clock()
        self.reports.clear()
        self.texts.clear()
        self.finished_decoded = 0
        self.latest = None
        self.draw(force=True)

    def progress(self, progress: Progress) -> None:
        self.reports[progress.chain] = progress
        self.texts[progress.chain] = tuple(progress.tokens)
        self.latest = progress.chain
        self.draw()

    __call__ = progress

    def token(self, chain: int, tokens: Sequence[int]) -> None:
        self.texts[chain] = tuple(tokens)
        self.latest = chain
        self.draw()

    def done(self, chain: int) -> None:
        """Chain ``chain`` has ended: it leaves the view (erased; the next report draws the others)."""
        report = self.reports.pop(chain, None)
        self.finished_decoded += report.tokens_decoded if report else 0
        self.texts.pop(chain, None)
        if self.latest == chain:
            self.latest = None
        self.clear()

    # -- drawing

    def text_of(self, tokens: Sequence[int]) -> str:
        data = b"".join(self.token_bytes(t) for t in tokens if not self.hidden(t))
        # final=False: a character whose bytes are not all drawn yet waits for the rest
        return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False)

    def shown_chain(self) -> int | None:
        if 0 in self.texts:
            return 0
        if self.latest in self.texts:
            return self.latest
        return min(self.texts) if self.texts else None

    def status(self) -> str:
        elapsed = max(0.0, self.clock() - self.started)
        decoded = self.finished_decoded + sum(p.tokens_decoded for p in self.reports.values())
        rate = decoded / elapsed if elapsed > 0 else 0.0
        totals = f"{decoded} tok decoded, {rate:.1f} tok/s, {elapsed:.1f} s"
        if not self.reports:
            chains = f"{len(self.texts)} chains, " if len(self.texts) > 1 else ""
            tokens = f"{max(len(t) for t in self.texts.values())} tokens, " if self.texts else ""
            hint = f" ... {self.hint}" if self.hint else ""
            return f"sampling ({self.method}): {chains}{tokens}{elapsed:.1f} s{hint}"
        if len(self.reports) == 1:
            (p,) = self.reports.values()
            return f"{self.chain_status(p)} | {totals}"
        parts = "; ".join(f"#{p.chain} {self.chain_status(p, short=True)}" for _, p in sorted(self.reports.items()))
        return f"{totals} | {parts}"

    @staticmethod
    def chain_status(p: Progress, short: bool = False) -> str:
        if p.method == "smc":
            if short:
                return f"t{p.mh_step}/{p.mh_steps} ESS {p.ess:.0f}/{p.particles}"
            return (f"token {p.mh_step}/{p.mh_steps}, ESS {p.ess:.1f} of {p.particles} particles, "
                    f"{p.resamples} resampling{'' if p.resamples == 1 else 's'}")
        moved = getattr(p, "moved", None)  # not every Progress carries it
        if short:
            return f"b{p.block}/{p.blocks} s{p.mh_step}/{p.mh_steps} a{p.accepted}/{p.proposals}"
        moves = f"moved {moved}/{p.proposals}, " if moved is not None else ""
        return (f"block {p.block}/{p.blocks}, MH step {p.mh_step}/{p.mh_steps}, "
                f"{moves}accepted {p.accepted}/{p.proposals}")

    def frame(self) -> list[str]:
        """The lines to draw: the shown chain's last text lines (dim), then the status line."""
        size = self.size()
        width = max(10, size.columns - 1)  # never the last column: no automatic wrap
        lines: list[str] = []
        chain = self.shown_chain()
        if chain is not None:
            room = max(0, min(self.text_lines, size.lines - 2))
            text = wrap(clean(self.text_of(self.texts[chain])), width - (0 if self.color else len(PLAIN_MARK)))
            while text and not text[0]:
                text.pop(0)
            for line in text[-room:] if room else []:
                lines.append(f"{DIM}{line}{RESET}" if self.color else PLAIN_MARK + line)
        lines.append(fit(self.status(), width))
        return lines

    def draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and self.last_draw is not None and now - self.last_draw < self.interval_s:
            return
        self.last_draw = now
        lines = self.frame()
        self.stream.write(self._erase() + "\n".join(lines))
        self.stream.flush()
        self.drawn = len(lines)

    def _erase(self) -> str:
        if not self.drawn:
            return ""
        # line by line, bottom to top (not "clear to the end of the screen", which some terminals,
        # tmux among them, take as clearing the whole screen when the view starts at its top)
        return "\r\x1b[K" + "\x1b[1A\x1b[K" * (self.drawn - 1)

    def clear(self) -> None:
        """Erase what is drawn, leaving the cursor where the view began."""
        if self.enabled and self.drawn:
            self.stream.write(self._erase())
            self.stream.flush()
            self.drawn = 0
            self.last_draw = None  # the next report draws at once

    stop = clear
