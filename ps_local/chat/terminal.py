"""The two front ends: an interactive terminal (readline) and a pipeline (one message a line)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable, TextIO


from ..errors import PsLocalError, UserError
from ..output import sample_json, summary_line
from ..settings import METHODS, Sample
from .session import COMMANDS, ChatSession, EndChat, SETTABLE
from .views import AnswerView, LiveAnswerView, NoView


@dataclass
class Output:
    """Where a chat writes: answers on stdout, everything else on stderr."""

    as_json: bool
    quiet: bool
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    def answer(self, sample: Sample) -> None:
        """The answer on stdout (followed by a blank line: a pipeline can split answers at blank
        lines; --json gives exactly one line per answer), its summary on stderr."""
        self.out.write(sample_json(sample) + "\n" if self.as_json else sample.text.strip() + "\n")
        self.out.flush()
        if not self.quiet:
            self.info(summary_line(sample))
        if not self.as_json:
            self.out.write("\n")
            self.out.flush()

    def info(self, text: str) -> None:
        """Command replies, notices: on stderr (only answers go to stdout)."""
        self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()


def run_pipe(chat: ChatSession, lines: Iterable[bytes], output: Output) -> None:
    """Standard input not a terminal: each line is the next message (or a command), each answer
    goes to stdout. A bad command ends the chat with its error (a script should not go on with
    settings it did not ask for)."""
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            raise UserError(f"line {number} of standard input is not valid UTF-8 (byte {error.start})") from None
        if not line.strip():
            continue
        if line.startswith("/") and not line.startswith("//"):
            try:
                reply = chat.command(line)
            except EndChat:
                return
            if not output.quiet:
                output.info(reply)
            continue
        sample = chat.answer(line[1:] if line.startswith("//") else line, NoView())
        if sample is None:  # Ctrl-C: a pipeline stops (status 130) rather than skip a message
            raise KeyboardInterrupt
        output.answer(sample)


def run_interactive(chat: ChatSession, output: Output, banner: str | None) -> None:
    """A terminal: line editing, commands, Ctrl-C stops an answer or clears the line, Ctrl-D
    (or /exit) leaves."""
    _line_editing()
    if banner:
        output.info(banner)
    engine = chat.model.session.engine
    view: AnswerView = (NoView() if output.quiet or not output.err.isatty()
                        else LiveAnswerView(output.err, engine.token_bytes, engine.is_end_of_generation))
    # input() draws its prompt on stdout; with stdout redirected, prompts go to the terminal.
    prompt_stream = None if output.out.isatty() else output.err
    while True:
        try:
            line = _read_message(prompt_stream)
        except KeyboardInterrupt:  # at the prompt: the line is dropped, a fresh prompt follows
            output.err.write("\n")
            continue
        except EOFError:  # Ctrl-D
            output.err.write("\n")
            return
        if not line.strip():
            continue
        try:
            if line.startswith("/") and not line.startswith("//"):
                output.info(chat.command(line))
                continue
            sample = chat.answer(line[1:] if line.startswith("//") else line, view)
        except EndChat:
            return
        except PsLocalError as error:  # a bad value, a message too long, a failed decode: one line
            output.info(f"error: {error}")
            continue
        except KeyboardInterrupt:  # Ctrl-C before the sampling started (the prompt tokenizing)
            sample = None
        if sample is None:
            output.info("(answer stopped; the message was not kept: Up brings it back)")
            continue
        output.answer(sample)


def _read_message(prompt_stream: TextIO | None) -> str:
    """One message; a line ending in a backslash continues on the next."""
    parts: list[str] = []
    while True:
        prompt = "... " if parts else "> "
        if prompt_stream is not None:
            prompt_stream.write(prompt)
            prompt_stream.flush()
            prompt = ""
        line = input(prompt)
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        return "\n".join([*parts, line])


def _line_editing() -> None:
    """Line editing for input(): the standard library's readline (GNU readline, or libedit on
    macOS). It gives what a chat prompt needs (editing, Up/Down history, Ctrl-R search,
    bracketed paste, the user's own ~/.inputrc) with no dependency and a few lines of code;
    prompt_toolkit would add multi-line editing and colours, but as a dependency with its own
    terminal handling, for turns that are single lines. Where readline is missing (Windows),
    input() still reads lines, without editing."""
    try:
        import readline
    except ImportError:
        return

    def complete(text: str, state: int) -> str | None:
        buffer = readline.get_line_buffer()
        words = buffer.split()
        position = len(words) if buffer.endswith(" ") or not words else len(words) - 1  # the word completed
        if position == 0:
            candidates = [*COMMANDS, *(f"/{name}" for name in SETTABLE)]
        elif words[0] == "/set" and position == 1:
            candidates = list(SETTABLE)
        elif (words[0], position) == ("/method", 1) or words[:2] == ["/set", "method"] and position == 2:
            candidates = list(METHODS)
        else:
            candidates = []
        matches = [candidate for candidate in candidates if candidate.startswith(text)]
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n")
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")


def banner(model: str, chat: ChatSession) -> str:
    settings = chat.settings
    mode = chat.format.description
    if chat.settings.method in ("power", "ppt"):
        shown = f"{settings.method}, alpha={settings.alpha:g} B={settings.block_size} N={settings.mcmc_steps}"
    else:
        shown = settings.method
    system = f"; system message: {chat.system!r}" if chat.system else ""
    return (f"ps-local chat with {model}: {mode}{system}\n"
            f"{shown}. /help for commands, /settings for the settings; Ctrl-C stops an answer, Ctrl-D leaves.")


# -- the command -----------------------------------------------------------------------------------
