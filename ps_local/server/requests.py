"""OpenAI request bodies -> what ps-local samples: validated here, before anything is queued.

Standard fields: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (``max_completion_tokens``),
``stop``, ``seed``, ``n``, ``stream``, ``temperature`` (for the baselines). ps-local's own travel
as extra body fields (the ``openai`` client's ``extra_body``): ``method``, ``alpha``,
``block_size``, ``mcmc_steps``, ``proposal_temp``, and per method ``particles``, ``ess_threshold``,
``alpha_ramp`` (smc) and ``ladder`` (ppt). Fields a client sends by habit but ps-local
does not implement (``top_p``, penalties, ...) are accepted and ignored only at their neutral
values; any other value is refused rather than silently not honoured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..settings import METHODS, SamplingSettings

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and llama-cpp-python's default for /v1/completions
MAX_N = 64
PS_LOCAL_FIELDS = {"method": str, "alpha": float, "block_size": int, "mcmc_steps": int, "proposal_temp": float,
                   "particles": int, "ess_threshold": float, "alpha_ramp": int, "ladder": list}
# Standard fields without an effect here, accepted at their neutral values.
NEUTRAL = {"top_p": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "echo": False,
           "best_of": 1, "logit_bias": None, "user": None, "suffix": None, "stream_options": None,
           "top_logprobs": None, "response_format": None, "tools": None, "tool_choice": None,
           "parallel_tool_calls": None, "metadata": None, "store": None}


class ApiError(Exception):
    """An error the client caused or may retry: status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class SamplingRequest:
    prompt: str | list[int] | None  # completions: text or token ids
    messages: list[dict[str, str]] | None  # chat
    settings: SamplingSettings
    n: int
    stream: bool
    ignored: tuple[str, ...]  # standard fields that had no effect (temperature with power)


def parse(body: Any, chat: bool, model_id: str, default_method: str) -> SamplingRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    known = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stop", "seed", "n", "stream",
             "temperature", *PS_LOCAL_FIELDS, *NEUTRAL}
    for name in body:
        if name not in known:
            raise ApiError(400, f"unknown field {name!r}", name)
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in (neutral, None):
            raise ApiError(400, f"{name} is not supported by ps-local (only {neutral!r})", name)
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server has {model_id!r}", "model",
                       code="model_not_found")
    prompt, messages = (None, _messages(body)) if chat else (_prompt(body), None)
    method = _typed(body, "method", str, default_method)
    if method not in METHODS:
        raise ApiError(400, f"method must be one of {', '.join(METHODS)}, got {method!r}", "method")
    ignored: list[str] = []
    proposal_temp = _typed(body, "proposal_temp", float, None)
    temperature = _typed(body, "temperature", float, None)
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
        if method == "standard":
            method, proposal_temp = ("greedy", None) if temperature == 0 else ("standard", temperature)
        else:
            ignored.append("temperature")  # power and low-temp set their temperatures from alpha
    max_tokens = _typed(body, "max_completion_tokens", int, None)
    max_tokens = _typed(body, "max_tokens", int, max_tokens)
    if max_tokens is None and not chat:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    n = _typed(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be from 1 to {MAX_N}, got {n}", "n")
    stream = _typed(body, "stream", bool, False)
    defaults = SamplingSettings()
    settings = SamplingSettings(
        method=method,
        alpha=_typed(body, "alpha", float, defaults.alpha),
        block_size=_typed(body, "block_size", int, defaults.block_size),
        mcmc_steps=_typed(body, "mcmc_steps", int, defaults.mcmc_steps),
        max_tokens=max_tokens,
        proposal_temp=proposal_temp,
        seed=_typed(body, "seed", int, None),
        stop=_stops(body),
        particles=_typed(body, "particles", int, defaults.particles),
        ess_threshold=_typed(body, "ess_threshold", float, defaults.ess_threshold),
        smc_ramp=_typed(body, "alpha_ramp", int, defaults.smc_ramp),
        ladder=_ladder(body),
    )
    try:
        settings.validate()
    except ValueError as error:
        raise ApiError(400, str(error).replace("--", "").replace("-", "_")) from None
    return SamplingRequest(prompt, messages, settings, n, stream, tuple(ignored))


def _typed(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            raise ApiError(400, f"{name} must be a number, got NaN", name)
        return float(value)
    if kind is float and value == "inf" and name == "alpha":
        return math.inf
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a ' + kind.__name__}, "
                            f"got {value!r}", name)
    return value


def _ladder(body: dict[str, Any]) -> tuple[float, ...] | None:
    ladder = _typed(body, "ladder", list, None)
    if ladder is None:
        return None
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in ladder):
        raise ApiError(400, "ladder must be a list of numbers (the replicas' alphas, rising to alpha)", "ladder")
    return tuple(float(a) for a in ladder)


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise ApiError(400, "stop must be a non-empty string or a list of up to 16 of them", "stop")
    return tuple(stops)


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ApiError(400, "the prompt is empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                   "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    cleaned = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{number}] must be an object with a role", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise ApiError(400, f"messages[{number}]: only text content is supported", "messages")
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{number}].content must be a string", "messages")
        cleaned.append({"role": message["role"], "content": content})
    return cleaned
