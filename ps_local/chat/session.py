"""The conversation, its sampling settings and the in-chat commands; no terminal in it."""

from __future__ import annotations

import json
import re
import shlex
import signal
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import click

from ..errors import UserError
from ..settings import DEFAULT_MAX_TOKENS, Sample, SamplingSettings, check_request
from .formats import PromptFormat, TRANSCRIPT_STOP, Turn
from .views import AnswerView

if TYPE_CHECKING:
    from ..api import Model
    from ..scheduler import Job


SETTABLE = ("method", "alpha", "block-size", "mcmc-steps", "max-tokens", "proposal-temp", "seed", "stop",
            "particles", "ess-threshold", "resample-every", "alpha-ramp", "rejuvenate", "ladder", "swap-every",
            "ladder-warmup", "steps-per-token")
# What None means for the settings whose default depends on others.
DEFAULT_SHOWN = {"max-tokens": f"{DEFAULT_MAX_TOKENS}, or what fits", "proposal-temp": "1/alpha",
                 "seed": "random", "ladder": "4 rungs, geometric from 1 to alpha",
                 "particles": "128, fewer where their KV cache would pass 2 GiB"}
COMMANDS = ("/help", "/settings", "/set", "/clear", "/system", "/exit", "/quit")
HELP = """\
Commands (anything else is a message; start a message with // to send one beginning with /):
  /settings                 the current sampling settings
  /set NAME VALUE           change one: /set alpha 2 (or /alpha 2, /method smc, /seed 7)
  /NAME VALUE               the same; VALUE default: back to the value the chat started with
                            settings: {settings}
  /stop TEXT...             stop strings (shell quoting, \\n for a newline); /stop none: none
  /system [TEXT | none]     show or change the system message
  /clear                    forget the conversation (the system message stays)
  /exit, /quit              leave (also Ctrl-D)
Ctrl-C stops the answer being sampled; at the prompt it clears the line.
A line ending in \\ continues on the next line."""


class EndChat(Exception):
    """/exit or /quit."""


# -- how the conversation becomes the prompt ------------------------------------------------------


@dataclass
class ChatSession:
    """A conversation with one model: its turns, the system message and the sampling settings.

    ``options`` are the sampling options by their click parameter names (as ``generate`` gets
    them), so that ``cli.settings_from`` builds the settings from them and a change is parsed
    by the option's own click type.
    """

    model: "Model"
    format: PromptFormat
    method: str
    options: dict[str, Any]
    parameters: dict[str, click.Parameter]  # the command's options, by setting name
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
    said_trimmed: bool = False
    notice: Callable[[str], None] = lambda line: None

    def __post_init__(self) -> None:
        from ..cli import settings_from

        self.settings = check_request(settings_from(self.options, self.method), 1)
        self.initial = (self.method, dict(self.options))  # what /NAME default goes back to

    # -- answering

    @property
    def context_limit(self) -> int:
        session = self.model.session
        return session.options.ctx or session.engine.n_ctx_train

    def answer_room(self) -> int:
        """Tokens kept free for the answer: --max-tokens, or the default's (up to half the context)."""
        limit = self.context_limit
        return self.settings.max_tokens or min(DEFAULT_MAX_TOKENS, limit // 2)

    def prompt(self, message: str) -> tuple[list[int], int]:
        """The prompt's tokens for ``message`` after the conversation, and how many of the oldest
        turns had to be left out for it and the answer's room to fit the context."""
        limit, room = self.context_limit, self.answer_room()
        for dropped in range(len(self.turns) + 1):
            tokens = self.format.tokens(self.system, self.turns[dropped:], message)
            if len(tokens) + room <= limit:
                return tokens, dropped
        framing = "the system message and the chat's framing" if self.system else "the chat's framing"
        raise UserError(f"the message is too long: with {framing} it is {len(tokens)} tokens, which with "
                        f"{room} more for the answer do not fit the context of {limit} tokens")

    def turn_settings(self) -> SamplingSettings:
        return replace(self.settings, stop=tuple(dict.fromkeys(self.settings.stop + self.format.stops)))

    def answer(self, message: str, view: AnswerView) -> Sample | None:
        """Sample the answer to ``message`` and add the turn; None when Ctrl-C stopped it (the
        conversation is then as it was)."""
        tokens, dropped = self.prompt(message)
        if dropped and not self.said_trimmed:
            self.said_trimmed = True
            self.notice(f"ps-local: the conversation no longer fits the context of {self.context_limit} tokens "
                        f"(with {self.answer_room()} for the answer): the oldest turns are left out from now on")
        settings = self.turn_settings()
        job = self.model.submit(tokens, settings=settings, progress=view.progress)
        view.start(settings)
        try:
            interrupted = wait_interruptibly(self.model, job)
        finally:
            view.stop()
        if interrupted or job.cancelled:
            return None
        (sample,) = job.result()
        del self.turns[:dropped]
        self.turns.append(Turn(message, sample.text.strip()))
        return sample

    # -- commands

    def command(self, line: str) -> str:
        """Carry out an in-chat command; what to show. UserError for a bad one (nothing changed)."""
        name, _, rest = line[1:].strip().partition(" ")
        name, rest = name.lower(), rest.strip()
        if name in ("exit", "quit"):
            raise EndChat
        if name in ("help", "h", "?"):
            return HELP.format(settings=", ".join(SETTABLE))
        if name == "settings":
            return self.describe()
        if name == "clear":
            self.turns.clear()
            return "the conversation is forgotten" + (" (the system message stays)" if self.system else "")
        if name == "system":
            if rest:
                system = None if rest.lower() == "none" else rest
                self.format.tokens(system, [], "hello")  # a template that refuses it says so now
                self.system = system
            return f"system message: {self.system!r}" if self.system else "no system message"
        if name == "set":
            name, _, rest = rest.partition(" ")
            name, rest = name.lower(), rest.strip()
            if not name:
                raise UserError("/set needs a setting and a value, e.g. /set alpha 2 (/settings lists them)")
        name = name.replace("_", "-")
        if name not in SETTABLE:
            raise UserError(f"unknown command /{name}; /help lists the commands")
        if not rest:
            return self.describe(only=name)
        return self.change(name, rest)

    def change(self, name: str, text: str) -> str:
        from ..cli import METHOD_OPTIONS, settings_from

        method, options = self.method, dict(self.options)
        key = name.replace("-", "_")
        parameter = self.parameters[key]
        try:
            if text.lower() == "default":
                value = self.initial[0] if key == "method" else self.initial[1][key]
            elif key == "stop":
                value = () if text.lower() == "none" else tuple(_unescape(part) for part in _split(text))
            elif text.lower() == "none" and parameter.default is None:
                value = None
            else:
                value = parameter.type.convert(text, parameter, None)
        except click.BadParameter as error:
            raise UserError(f"/{name}: {error.message}") from None
        except ValueError as error:  # shlex: an unclosed quote
            raise UserError(f"/{name}: {error}") from None
        if key == "method":
            method = value
        else:
            options[key] = value
        try:
            settings = check_request(settings_from(options, method), 1)
        except UserError as error:
            raise UserError(_as_commands(str(error))) from None
        self.method, self.options, self.settings = method, options, settings
        shown = self.describe(only=name, mark_unused=False)
        users = METHOD_OPTIONS.get(key)
        if users and method not in users:
            shown += f" (kept, but {method} does not use it: {', '.join(users)} do{'es' if len(users) == 1 else ''})"
        return shown

    def describe(self, only: str | None = None, mark_unused: bool = True) -> str:
        from ..cli import METHOD_OPTIONS

        lines = []
        for name in SETTABLE if only is None else (only,):
            key = name.replace("-", "_")
            value = self.method if key == "method" else self.options[key]
            if key == "stop":
                shown = " ".join(json.dumps(stop, ensure_ascii=False) for stop in value) or "none"
                if self.format.stops:
                    shown += f" (and the transcript's {json.dumps(TRANSCRIPT_STOP)})"
            elif value is None:
                shown = f"default ({DEFAULT_SHOWN[name]})"
            elif isinstance(value, float):
                shown = f"{value:g}"
            else:
                shown = str(value)
            users = METHOD_OPTIONS.get(key)
            if mark_unused and users and self.method not in users:
                shown += f"  (not used by {self.method})"
            lines.append(f"{name:<15} {shown}")
        return "\n".join(lines)


def _split(text: str) -> list[str]:
    """Words as a shell splits them (quotes group), backslashes kept for _unescape."""
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    return list(lexer)


def _unescape(text: str) -> str:
    r"""\n, \t and \\ in a typed stop string (a newline cannot be typed into the chat)."""
    return re.sub(r"\\([nt\\])", lambda match: {"n": "\n", "t": "\t", "\\": "\\"}[match.group(1)], text)


def _as_commands(message: str) -> str:
    """A settings error as the chat's commands name the settings (/alpha, not --alpha)."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: f"/{m.group(1)}" if m.group(1) in SETTABLE else m.group(0), message)


def wait_interruptibly(model: "Model", job: "Job") -> bool:
    """Step until ``job`` ends; whether Ctrl-C stopped it.

    The first Ctrl-C cancels the job, which the scheduler then drops at its next step, so the
    scheduler is never interrupted half-way (its prompt cache survives). A second Ctrl-C raises
    KeyboardInterrupt at once, for a step that does not end (a long prompt decoding):
    ``Scheduler.run_until_done`` then fails every job and empties the cache, usable again.
    """
    interrupted = False

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True
        job.cancel()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        model.wait([job])
    except KeyboardInterrupt:
        interrupted = True
        job.cancel()  # in case it came between steps, outside the scheduler
    finally:
        signal.signal(signal.SIGINT, previous)
    return interrupted


# -- the front ends --------------------------------------------------------------------------------
