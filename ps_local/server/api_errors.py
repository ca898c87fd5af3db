"""Errors as OpenAI's API words them: status, ``{"error": {message, type, param, code}}``.

Two sources need rewording. pydantic's validation errors ("Input should be a valid integer")
become one line naming the field (``max_tokens must be an integer, got 'many'``), and the
library's UserError messages, worded for the command line ("--max-tokens 1000 plus ...",
"drop --chat"), get the API's field names instead of flags.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

NO_CHAT_TEMPLATE = "this model has no chat template; use /v1/completions with the prompt as text"
# CLI flags whose API counterpart is not just the flag with underscores.
FLAG_WORDS = {"num-samples": "n", "ctx": "the server's context", "chat": "/v1/chat/completions"}
MAX_INPUT_SHOWN = 60  # characters of a refused value quoted back


class ApiError(Exception):
    """An error the client caused or may retry: status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def api_wording(message: str) -> str:
    """A UserError's message with API field names for the CLI's flags."""
    if message.startswith("--chat needs a chat template"):
        return NO_CHAT_TEMPLATE
    message = re.sub(r"--method ([\w-]+)", r'method "\1"', message)
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda flag: FLAG_WORDS.get(flag[1], flag[1].replace("-", "_")), message)


def field_of(message: str, fields: Sequence[str]) -> str | None:
    """The field a settings message is about, when it starts with one ("alpha must be ...")."""
    first = message.split(" ", 1)[0]
    return first if first in fields else None


# pydantic error types -> what the field must be (the value refused follows).
MUST_BE = {
    "int_type": "must be an integer", "float_type": "must be a number", "bool_type": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list", "dict_type": "must be an object",
    "model_type": "must be an object", "model_attributes_type": "must be an object",
}


def validation_error(errors: Sequence[dict[str, Any]]) -> ApiError:
    """One 400 from pydantic's errors for a request body: the first one, unknown fields first
    (the likeliest typo), worded for the API."""
    ordered = sorted(errors, key=lambda error: error.get("type") != "extra_forbidden")
    first = ordered[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    kind, ctx = first.get("type", ""), first.get("ctx") or {}
    if kind == "json_invalid":
        where = f" (at character {loc[0]})" if loc and isinstance(loc[0], int) else ""
        return ApiError(400, f"the request body is not valid JSON: {ctx.get('error', 'decode error')}{where}")
    path = _path(loc)
    if not path:
        return ApiError(400, "the request body must be a JSON object")
    if kind == "extra_forbidden":
        message = f"unknown field {path!r}"
    elif kind == "missing":
        message = f"{path} is required"
    else:
        message = f"{path} {_must_be(kind, ctx, first.get('msg', ''))}"
        if "input" in first and kind != "invalid_value_bare":
            message += f", got {_shown(first['input'])}"
    more = len(errors) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return ApiError(400, message, path)


def _must_be(kind: str, ctx: dict[str, Any], msg: str) -> str:
    if kind in MUST_BE:
        return MUST_BE[kind]
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item{'s' if ctx.get('min_length') != 1 else ''}"
    if kind in ("invalid_value", "invalid_value_bare"):  # our own validators' wording (requests.py)
        return msg
    return msg[:1].lower() + msg[1:]  # pydantic's own words, for a type this table does not know


def _path(loc: Sequence[Any]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_INPUT_SHOWN else text[: MAX_INPUT_SHOWN - 3] + "..."
