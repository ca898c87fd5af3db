"""From what the user typed to the token ids the sampler starts from.

Base models get the raw prompt. ``--template math`` / ``code`` build the paper's task prompts;
``--chat`` renders the GGUF's own chat template (Jinja, as transformers does) for instruct models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .errors import UserError

TEMPLATES = ("math", "code")
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# A completion prompt ends where the function body starts; these end the function.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


class ChatModel(Protocol):
    def chat_template(self) -> str | None: ...
    def special_tokens(self) -> dict[str, int]: ...
    def token_text(self, token: int) -> str: ...
    def tokenize(self, text: str, special: bool = False, add_bos: bool = True) -> list[int]: ...


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


def render_chat(model: ChatModel, user: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return render_messages(model, messages)


def render_messages(model: ChatModel, messages: list[dict[str, str]]) -> str:
    """A conversation through the GGUF's own chat template (sandboxed Jinja), ready for the
    assistant's turn."""
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
            messages=messages,
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


def chat_tokens(model: ChatModel, rendered: str) -> list[int]:
    """Tokens of a rendered conversation: its special tokens parsed as such."""
    special = model.special_tokens()
    # Templates often spell out BOS themselves; do not add a second one.
    bos_text = model.token_text(special["bos"]) if special["bos"] >= 0 else ""
    add_bos = not (bos_text and rendered.startswith(bos_text))
    return model.tokenize(rendered, special=True, add_bos=add_bos)
