"""The click command `ps-local chat`."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import UserError
from ..settings import DEFAULT_METHOD, METHODS, check_request
from .formats import TemplateFormat, TranscriptFormat
from .session import ChatSession
from .terminal import Output, banner, run_interactive, run_pipe


def chat_command() -> click.Command:
    """``ps-local chat``, built on cli.py's option decorators (cli.py adds it to its group: a
    function, so that cli.py may import this module while it is itself being imported)."""
    from ..cli import sampling_options

    @click.command("chat")
    @click.argument("model")
    @click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
                  help="smc: Power-SMC (nearest p^alpha per token decoded); power: the paper's MH on p^alpha; "
                       "ppt: parallel power tempering; "
                       "baselines: low-temp (T=1/alpha), standard (T=1), greedy.")
    @sampling_options
    @click.option("--system", default=None, help="System message (in the plain transcript: its first paragraph).")
    @click.option("--transcript", is_flag=True,
                  help="Use the plain User:/Assistant: transcript even when the model has a chat template.")
    @click.option("--json", "as_json", is_flag=True,
                  help="Each answer as one JSON object on one line (as generate --json).")
    @click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors and the replies to commands.")
    @click.pass_context
    def chat(context: click.Context, model: str, method: str, system: str | None, transcript: bool,
             as_json: bool, quiet: bool, **options: Any) -> None:
        """Talk with MODEL: each message is answered by power sampling, the whole conversation
        being the prompt (the model's chat template, or a plain User:/Assistant: transcript).

        In a terminal: line editing and history, in-chat commands (/help; /alpha 2, /method smc,
        /settings, /clear, /exit), Ctrl-C stops an answer, Ctrl-D leaves. With standard input
        not a terminal: one message per line, each answer on stdout followed by a blank line (or
        one JSON line with --json), nothing else on stdout.
        """
        run_chat(context, model, method, system, transcript, Output(as_json, quiet), options)

    return chat


def run_chat(context: click.Context, model: str, method: str, system: str | None, transcript: bool,
             output: Output, options: dict[str, Any]) -> None:
    from ..api import load  # loads llama.cpp: keep --help fast
    from ..cli import check_explicit_options, runtime_from, settings_from

    check_request(settings_from(options, method), 1)
    check_explicit_options(context, (method,))
    if sys.stdin is None:
        raise UserError("ps-local chat needs standard input (a terminal, or one message per line)")
    interactive = sys.stdin.isatty()
    loading = interactive and not output.quiet and output.err.isatty()
    if loading:
        output.err.write(f"loading {model} ...")
        output.err.flush()
    try:
        loaded = load(model, options=runtime_from(options))
    finally:
        if loading:
            output.err.write("\r\x1b[K")
    with loaded:
        templated = not transcript and loaded.session.engine.chat_template() is not None
        chosen = TemplateFormat(loaded) if templated else TranscriptFormat(loaded)
        parameters = {p.name: p for p in context.command.params if p.name}
        session = ChatSession(loaded, chosen, method, dict(options), parameters, system=system,
                              notice=(lambda line: None) if output.quiet else output.info)
        chosen.tokens(system, [], "hello")  # a template that refuses the system message says so now
        if interactive:
            run_interactive(session, output, None if output.quiet else banner(model, session))
        else:
            run_pipe(session, sys.stdin.buffer, output)
