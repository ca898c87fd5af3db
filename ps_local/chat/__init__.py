"""``ps-local chat MODEL``: a conversation, interactive in a terminal, one answer per line of input
in a pipeline.

Each turn the whole conversation is the prompt: through the GGUF's own chat template where it has
one (:func:`prompts.chat_tokens`, so a turn marker typed into a message stays text), otherwise as
a plain transcript for base models::

    SYSTEM MESSAGE            (--system, when given)

    User: first message
    Assistant: its answer
    User: next message
    Assistant:

ending at the stop string ``"\\nUser:"`` (or the model's EOS). When the conversation and the room
for an answer no longer fit the context, the oldest turns are left out (said once).

In-chat commands change the sampling settings between turns (``/method smc``, ``/alpha 2``,
``/set NAME VALUE``), show them (``/settings``), forget the conversation (``/clear``) or leave
(``/exit``). Ctrl-C while an answer is sampled stops that answer; Ctrl-D leaves.

The layers: :class:`ChatSession` holds the conversation and the settings and answers a message
(no terminal in it); :func:`run_interactive` and :func:`run_pipe` are the two front ends; an
:class:`AnswerView` shows an answer while it is being sampled (the seam for a live view of the
chain's text).

    formats.py   the conversation as a prompt: chat template or plain transcript
    session.py   ChatSession: the conversation, the settings, the in-chat commands
    views.py     what a terminal shows while an answer is sampled
    terminal.py  the interactive front end and the pipeline one
    command.py   the click command
"""

from .command import chat_command

__all__ = ["chat_command"]
