"""From what the user typed to the token ids the sampler starts from.

Base models get the raw prompt. ``--template math`` / ``code`` build the paper's task prompts;
``--chat`` renders the GGUF's own chat template (Jinja, as transformers does) for instruct models.
Only the template's own text may become control tokens: a turn marker typed into a message stays
text (:func:`chat_tokens`).
"""

from __future__ import annotations

import bisect
import re
import secrets
import weakref
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

from .errors import UserError
from .protocol import SpecialToken

TEMPLATES = ("math", "code")
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# A completion prompt ends where the function body starts; these end the function.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
# The roles a message may have: a role is template structure, not content (a template that
# builds its markers as "<|" + role + "|>" would let a role such as "end" close a turn).
ROLES = ("system", "developer", "user", "assistant", "tool")
C_WHITESPACE = " \t\n\v\f\r"  # what llama.cpp's isspace() strips beside lstrip/rstrip tokens


class ChatModel(Protocol):
    def chat_template(self) -> str | None: ...
    def special_tokens(self) -> dict[str, int]: ...
    def token_text(self, token: int) -> str: ...
    def tokenize(self, text: str, special: bool = False, add_bos: bool = True) -> list[int]: ...
    def special_vocabulary(self) -> Sequence[SpecialToken]: ...
    def tokenize_fragments(self, fragments: Sequence[str | int], add_bos: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class PromptSettings:
    template: str | None = None  # None, "math" or "code"
    chat: bool = False
    system: str | None = None


def apply_template(text: str, template: str | None) -> str:
    if template is None:
        return text
    if template == "math":
        # The paper's MATH prompt (Qwen2.5-Math style): the answer ends up in \boxed{}.
        return f"{text.strip()}\n{MATH_INSTRUCTION}"
    if template == "code":
        # HumanEval-style completion: the signature and docstring, the body follows.
        return text if text.endswith("\n") else text + "\n"
    raise UserError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def template_stops(template: str | None) -> tuple[str, ...]:
    return CODE_STOPS if template == "code" else ()


class RenderedChat(str):
    """A conversation rendered through the chat template: the text, and the messages it came
    from, so that :func:`chat_tokens` can keep their content from being read as control tokens."""

    messages: tuple[dict[str, str], ...]

    def __new__(cls, text: str, messages: Sequence[Mapping[str, str]]) -> "RenderedChat":
        rendered = super().__new__(cls, text)
        rendered.messages = tuple(dict(message) for message in messages)
        return rendered


def render_chat(model: ChatModel, user: str, system: str | None) -> RenderedChat:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return render_messages(model, messages)


def render_messages(model: ChatModel, messages: Sequence[Mapping[str, str]]) -> RenderedChat:
    """A conversation through the GGUF's own chat template (sandboxed Jinja), ready for the
    assistant's turn."""
    return RenderedChat(_render(model, messages), messages)


def _render(model: ChatModel, messages: Sequence[Mapping[str, str]]) -> str:
    template = model.chat_template()
    if template is None:
        raise UserError("--chat needs a chat template, and this model has none (a base model? drop --chat)")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UserError(f"the model's chat template refused the conversation: {message}")

    special = model.special_tokens()
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return environment.from_string(template).render(
            messages=[dict(message) for message in messages],
            add_generation_prompt=True,
            bos_token=model.token_text(special["bos"]) if special["bos"] >= 0 else "",
            eos_token=model.token_text(special["eos"]) if special["eos"] >= 0 else "",
            raise_exception=raise_exception,
        )
    except TemplateError as error:
        raise UserError(f"the model's chat template failed to render: {error}") from None


def prompt_tokens(model: ChatModel, text: str, settings: PromptSettings) -> list[int]:
    """The token ids the sampler starts from."""
    if settings.system is not None and not settings.chat:
        raise UserError("--system needs --chat")
    text = apply_template(text, settings.template)
    if not settings.chat:
        return model.tokenize(text)
    return chat_tokens(model, render_chat(model, text, settings.system))


def chat_tokens(model: ChatModel, chat: RenderedChat | Sequence[Mapping[str, str]]) -> list[int]:
    """Tokens of a conversation (its messages, or :func:`render_messages`' result): the chat
    template's own special tokens parsed as such, the messages' content as llama.cpp tokenizes
    text without special parsing (only user-defined tokens, plain vocabulary, split out of it).

    Content that reads as no control token (the usual case) tokenizes with the whole rendering,
    exactly as it always has; content that would forge one ("<end_of_turn>" typed into a
    message) keeps its text as plain text, or is refused where it cannot be told apart from the
    template's own text.
    """
    if isinstance(chat, RenderedChat):
        rendered, messages = str(chat), chat.messages
    elif isinstance(chat, str):
        raise TypeError("chat_tokens needs the messages (or render_messages' result), not bare text")
    else:
        messages = tuple(dict(message) for message in chat)
        rendered = _render(model, messages)
    special = model.special_tokens()
    # Templates often spell out BOS themselves; do not add a second one.
    bos_text = model.token_text(special["bos"]) if special["bos"] >= 0 else ""
    add_bos = not (bos_text and rendered.startswith(bos_text))
    _check_roles(messages)
    markers = _markers(model)
    forging = any(markers.contains_one(message["content"]) for message in messages)
    if forging or any(markers.may_join(message["content"]) for message in messages):
        spans = _content_spans(model, messages, rendered, required=forging)
        vocabulary = model.special_vocabulary()
        fragments = partition(rendered, vocabulary, spans) if spans is not None else None
        if fragments is not None and fragments != partition(rendered, vocabulary):
            return model.tokenize_fragments(fragments, add_bos=add_bos)
        # Near misses ("<" ending a message) that formed no control token: nothing to change.
    return model.tokenize(rendered, special=True, add_bos=add_bos)


# -- keeping message content out of the template's control tokens -----------------------------


@dataclass(frozen=True)
class _Markers:
    """The control-token texts of a vocabulary, to tell whether a message's content could form
    one: contain one, or complete one with the template text beside it."""

    by_first: dict[str, tuple[str, ...]]  # the texts by their first character
    joined: str  # every text, separated by NUL: content inside one of them
    texts: tuple[str, ...]  # sorted, to find texts that start with a given string
    reversed_texts: tuple[str, ...]  # every text reversed, sorted: texts that end with one
    longest: int

    @classmethod
    def of(cls, vocabulary: Sequence[SpecialToken]) -> "_Markers":
        # (A regex of Gemma's 6000 texts takes 85 ms to compile, this a few.)
        texts = sorted({token.text for token in vocabulary if token.control})
        by_first: dict[str, list[str]] = {}
        for text in texts:
            by_first.setdefault(text[0], []).append(text)
        return cls({first: tuple(group) for first, group in by_first.items()}, "\0".join(texts), tuple(texts),
                   tuple(sorted(text[::-1] for text in texts)), max(map(len, texts), default=0))

    def contains_one(self, content: str) -> bool:
        # Most content has none of the texts' first characters (all of Gemma's start with "<").
        return any(text in content for first in self.by_first.keys() & set(content) for text in self.by_first[first])

    def may_join(self, content: str) -> bool:
        """Whether template text on either side could complete a control token with the content."""
        if not self.texts or not content:
            return False
        if len(content) < self.longest and content in self.joined:
            return True
        edges = range(1, min(self.longest - 1, len(content)) + 1)
        return any(_proper_prefix(content[-size:], self.texts)
                   or _proper_prefix(content[:size][::-1], self.reversed_texts) for size in edges)


def _proper_prefix(start: str, texts: Sequence[str]) -> bool:
    """Whether some of the sorted ``texts`` starts with ``start`` and goes on after it."""
    index = bisect.bisect_left(texts, start)
    # Texts starting with ``start`` follow one another from ``index``, ``start`` itself first.
    return any(text.startswith(start) and len(text) > len(start) for text in texts[index:index + 2])


_markers_of: "weakref.WeakKeyDictionary[object, _Markers]" = weakref.WeakKeyDictionary()


def _markers(model: ChatModel) -> _Markers:
    """The model's _Markers, built once per model (Gemma has over 6000 control tokens)."""
    try:
        markers = _markers_of.get(model)
    except TypeError:  # a model that cannot be weakly referenced: build them every time
        return _Markers.of(model.special_vocabulary())
    if markers is None:
        markers = _markers_of[model] = _Markers.of(model.special_vocabulary())
    return markers


def _check_roles(messages: Sequence[Mapping[str, str]]) -> None:
    for number, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"message {number}: the role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"message {number}: the content must be text")


def _content_spans(
    model: ChatModel, messages: Sequence[Mapping[str, str]], rendered: str, required: bool
) -> list[tuple[int, int]] | None:
    """Where the messages' content lies in the rendering (start, end).

    The template renders once more with each content replaced by a sentinel; the real
    rendering must then be the template's text with each sentinel replaced by its content
    (as given, or trimmed as templates do). Anything else (a template that rewrites content)
    gives None, or UserError when ``required``: content holding a control token's text that
    could not be located cannot be kept apart from the template's own.
    """
    nonce = secrets.token_hex(8)  # no content can guess it
    marked = [dict(message, content=f"\ue000{nonce}:{number}\ue001") for number, message in enumerate(messages)]
    try:
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", _render(model, marked))
    except UserError:
        parts = None
    spans = None
    if parts is not None:
        spans = _match(rendered, parts[0::2], [messages[int(number)]["content"] for number in parts[1::2]])
    if spans is None and required:
        raise UserError("a message contains the text of one of the model's control tokens, and its chat "
                        "template changes message text in a way ps-local cannot follow: remove that text")
    return spans


def _match(rendered: str, texts: Sequence[str], contents: Sequence[str]) -> list[tuple[int, int]] | None:
    """The spans of contents in ``rendered`` when it is texts[0], contents[0], texts[1], ...;
    None where it is not that."""
    spans = []
    position = 0
    for number, text in enumerate(texts):
        if not rendered.startswith(text, position):
            return None
        position += len(text)
        if number == len(contents):
            break
        following = texts[number + 1]
        shown = next((candidate for candidate in _as_shown(contents[number])
                      if rendered.startswith(candidate, position)
                      and rendered.startswith(following, position + len(candidate))), None)
        if shown is None:
            return None
        spans.append((position, position + len(shown)))
        position += len(shown)
    return spans if position == len(rendered) else None


def _as_shown(content: str) -> list[str]:
    """How a template may show a message's content: as it is, or trimmed (Jinja's ``trim``)."""
    return list(dict.fromkeys([content, content.strip(), content.lstrip(), content.rstrip()]))


def partition(
    text: str, vocabulary: Sequence[SpecialToken], protected: Sequence[tuple[int, int]] = ()
) -> list[str | int]:
    """``text`` split into raw text and special token ids as llama.cpp's tokenizer_st_partition
    splits it when parsing special text, except that no control token is taken from text that
    overlaps a ``protected`` span (message content); user-defined tokens are, as llama.cpp
    takes them from any text.

    Like llama.cpp: one token at a time in the vocabulary's order (longest text first), every
    occurrence in what is not split yet, dropping whitespace beside lstrip/rstrip tokens.
    """
    fragments: list[tuple[int, int] | int] = [(0, len(text))] if text else []
    for token in vocabulary:
        if token.text not in text:
            continue  # the usual case: checked once, the split below is the rare one
        fragments = [part for fragment in fragments for part in
                     ([fragment] if isinstance(fragment, int) else _split(text, fragment, token, protected))]
    return [text[fragment[0]:fragment[1]] if isinstance(fragment, tuple) else fragment for fragment in fragments]


def _split(text: str, span: tuple[int, int], token: SpecialToken,
           protected: Sequence[tuple[int, int]]) -> list[tuple[int, int] | int]:
    """One raw fragment of ``text`` split at ``token``'s occurrences."""
    start, end = span
    parts: list[tuple[int, int] | int] = []
    search = start
    while (match := text.find(token.text, search, end)) >= 0:
        after = match + len(token.text)
        if token.control and any(low < after and match < high for low, high in protected):
            search = match + 1  # content's own text: not this token
            continue
        left = match
        if token.lstrip:
            while left > start and text[left - 1] in C_WHITESPACE:
                left -= 1
        if left > start:
            parts.append((start, left))
        parts.append(token.id)
        start = search = after
        if token.rstrip:
            while start < end and text[start] in C_WHITESPACE:
                start += 1
            search = start
    if start < end:
        parts.append((start, end))
    return parts
