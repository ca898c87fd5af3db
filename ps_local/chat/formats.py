"""How a conversation becomes the prompt: the GGUF's chat template, or a plain transcript."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence


from ..prompts import chat_tokens

if TYPE_CHECKING:
    from ..api import Model


TRANSCRIPT_STOP = "\nUser:"

@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str


class PromptFormat(Protocol):
    description: str  # for the banner
    stops: tuple[str, ...]  # stop strings of the format itself

    def tokens(self, system: str | None, turns: Sequence[Turn], message: str) -> list[int]: ...


class TemplateFormat:
    """The GGUF's own chat template; content is tokenized as text (no forged turn markers)."""

    description = "the model's chat template"
    stops: tuple[str, ...] = ()

    def __init__(self, model: "Model"):
        self.engine = model.session.engine

    def tokens(self, system: str | None, turns: Sequence[Turn], message: str) -> list[int]:
        messages = [{"role": "system", "content": system}] if system else []
        for turn in turns:
            messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        messages.append({"role": "user", "content": message})
        return chat_tokens(self.engine, messages)


class TranscriptFormat:
    """A plain "User: ... / Assistant: ..." transcript, for base models (no chat template)."""

    description = "plain User:/Assistant: transcript (the model has no chat template)"
    stops = (TRANSCRIPT_STOP,)

    def __init__(self, model: "Model"):
        self.model = model

    @staticmethod
    def text(system: str | None, turns: Sequence[Turn], message: str) -> str:
        head = f"{system}\n\n" if system else ""
        body = "".join(f"User: {turn.user}\nAssistant: {turn.assistant}\n" for turn in turns)
        return f"{head}{body}User: {message}\nAssistant:"

    def tokens(self, system: str | None, turns: Sequence[Turn], message: str) -> list[int]:
        return self.model.tokens(self.text(system, turns, message))


# -- what shows an answer while it is sampled ------------------------------------------------------
