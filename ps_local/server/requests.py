"""OpenAI request bodies as pydantic models, and what ps-local samples from them.

Standard fields: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (``max_completion_tokens``),
``stop``, ``seed``, ``n``, ``stream``, ``temperature`` (for the baselines). ps-local's own travel
as extra body fields (the ``openai`` client's ``extra_body``): ``method``, ``alpha``,
``block_size``, ``mcmc_steps``, ``proposal_temp``, and per method ``particles``, ``ess_threshold``,
``alpha_ramp``, ``rejuvenate`` (smc), ``ladder``, ``swap_every``, ``ladder_warmup`` (ppt) and
``steps_per_token`` (power, ppt). Fields a client sends by habit but ps-local
does not implement (``top_p``, penalties, ...) are accepted and ignored only at their neutral
values; any other value, and any unknown field, is refused rather than silently not honoured.

FastAPI validates a body against these models before a route runs (and publishes them at
/openapi.json); app.py words their errors for the API (api_errors.validation_error). Types are
strict, as JSON is: ``"3"`` is not an integer, ``true`` not a number. The sampling settings'
own bounds stay in SamplingSettings.validate, the one place the CLI and the API share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, \
    field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..settings import DEFAULT_METHOD, METHODS, SamplingSettings
from .api_errors import ApiError, api_wording, field_of

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and llama-cpp-python's default for /v1/completions
MAX_STOPS = 16
# Standard fields without an effect here, and the values at which they have none (null too).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "top_p": (1,), "frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,), "echo": (False,),
    "best_of": (1,), "logit_bias": (), "user": (), "suffix": (), "stream_options": (), "top_logprobs": (),
    "response_format": (), "tools": (), "tool_choice": (), "parallel_tool_calls": (), "metadata": (), "store": (),
}


def invalid(phrase: str, show_value: bool = True) -> PydanticCustomError:
    """A validation error in our words: ``phrase`` follows the field's name ("must be ..."),
    then the value refused unless ``show_value`` is False."""
    return PydanticCustomError("invalid_value" if show_value else "invalid_value_bare", phrase)


def _not_nan(value: float) -> float:
    if math.isnan(value):
        raise invalid("must be a number")
    return value


# A JSON number: integers count, true/false and strings do not; NaN is refused, inf is kept
# (alpha inf is max-swap; elsewhere SamplingSettings.validate refuses it).
Number = Annotated[float, Strict(), AfterValidator(_not_nan)]
Method = Literal[METHODS]  # type: ignore[valid-type]  # the tuple spells the literal's values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(value: Any, neutral: Any) -> bool:
    """``value == neutral`` without Python's True == 1 (JSON's true is not the number 1)."""
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def neutral_field(values: tuple[Any, ...]) -> Any:
    accepted = " or ".join(["null", *map(repr, values)])
    return Field(None, description=f"Not implemented by ps-local: accepted only as {accepted}.")


def _lone_surrogate(value: Any, where: str) -> str | None:
    """Where ``value`` holds a string with a lone UTF-16 surrogate ("\\ud800" is valid JSON but
    no text: it cannot be encoded as UTF-8, so the tokenizer would fail on it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        return next((found for key, item in value.items() if (found := _lone_surrogate(item, f"{where}.{key}"))), None)
    elif isinstance(value, list):
        return next((found for number, item in enumerate(value)
                     if (found := _lone_surrogate(item, f"{where}[{number}]"))), None)
    return None


class SamplingFields(BaseModel):
    """The fields both routes share."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, body: Any) -> Any:
        if isinstance(body, dict):
            for name, value in body.items():
                where = _lone_surrogate(value, name)
                if where is not None:
                    raise ApiError(400, f"{where} holds a lone UTF-16 surrogate, which is not text", name)
        return body

    model: StrictStr | None = Field(None, description="The served model's id (optional).")
    max_tokens: StrictInt | None = Field(
        None, description="Most new tokens [default: 16 for completions, the rest of the context for chat].")
    max_completion_tokens: StrictInt | None = Field(None, description="max_tokens under its newer name.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} non-empty stop strings.")
    seed: StrictInt | None = Field(None, description="Random seed from 0 to 2^63 - 1 [default: random, "
                                                        "reported in ps_local.samples].")
    n: StrictInt = Field(1, ge=1, description="Independent samples (chains).")
    stream: StrictBool = Field(False, description="Server-sent events; power samples arrive when their chain ends.")
    temperature: Number | None = Field(
        None, ge=0, le=2, description="Sampling temperature of method standard (0: greedy); ignored by the others.")
    # ps-local's own, as extra body fields.
    method: Method | None = Field(None, description=f"The sampler [default: {DEFAULT_METHOD}].")
    alpha: Number | None = Field(None, description='Sharpening exponent >= 1; "inf" for max-swap.',
                                 json_schema_extra={"anyOf": [{"type": "number"}, {"const": "inf"}, {"type": "null"}]})
    block_size: StrictInt | None = Field(None, description="power, ppt: tokens per block (B).")
    mcmc_steps: StrictInt | None = Field(None, description="power, ppt: MH steps per block (N).")
    proposal_temp: Number | None = Field(None, description="Proposal temperature [default: 1/alpha].")
    particles: StrictInt | None = Field(None, description="smc: particles, 1 to 255.")
    ess_threshold: Number | None = Field(None, description="smc: resample when ESS < this x particles.")
    alpha_ramp: StrictInt | None = Field(None, description="smc: raise alpha from 1 over this many tokens.")
    ladder: list[Number] | None = Field(None, description="ppt: the replicas' alphas, rising to alpha.")
    rejuvenate: StrictInt | None = Field(None, description="smc: MH moves per particle after each resampling.")
    steps_per_token: Number | None = Field(None, description="power, ppt: at least this many MH steps per block "
                                                             "per token of the sequence.")
    swap_every: StrictInt | None = Field(None, description="ppt: a swap sweep after every this many MH steps.")
    ladder_warmup: StrictInt | None = Field(None, description="ppt: MH steps of a discarded pilot that places "
                                                              "the ladder.")
    # Standard fields ps-local does not implement.
    top_p: Any = neutral_field(NEUTRAL["top_p"])
    frequency_penalty: Any = neutral_field(NEUTRAL["frequency_penalty"])
    presence_penalty: Any = neutral_field(NEUTRAL["presence_penalty"])
    logprobs: Any = neutral_field(NEUTRAL["logprobs"])
    echo: Any = neutral_field(NEUTRAL["echo"])
    best_of: Any = neutral_field(NEUTRAL["best_of"])
    logit_bias: Any = neutral_field(NEUTRAL["logit_bias"])
    user: Any = neutral_field(NEUTRAL["user"])
    suffix: Any = neutral_field(NEUTRAL["suffix"])
    stream_options: Any = neutral_field(NEUTRAL["stream_options"])
    top_logprobs: Any = neutral_field(NEUTRAL["top_logprobs"])
    response_format: Any = neutral_field(NEUTRAL["response_format"])
    tools: Any = neutral_field(NEUTRAL["tools"])
    tool_choice: Any = neutral_field(NEUTRAL["tool_choice"])
    parallel_tool_calls: Any = neutral_field(NEUTRAL["parallel_tool_calls"])
    metadata: Any = neutral_field(NEUTRAL["metadata"])
    store: Any = neutral_field(NEUTRAL["store"])

    @field_validator(*NEUTRAL)
    @classmethod
    def _neutral(cls, value: Any, info: Any) -> Any:
        accepted = NEUTRAL[info.field_name]
        if value is not None and not any(_same(value, neutral) for neutral in accepted):
            only = " or ".join(map(repr, accepted)) or "null"
            raise invalid(f"is not supported by ps-local (only {only})")
        return None

    # One message per field for the shapes pydantic would otherwise report member by member.
    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        if value is not None and (not isinstance(stops, list) or len(stops) > MAX_STOPS
                                  or not all(isinstance(stop, str) and stop for stop in stops)):
            raise invalid(f"must be a non-empty string or a list of up to {MAX_STOPS} of them")
        return value

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, value: Any) -> Any:
        if value == "inf":
            return math.inf
        if value is not None and not _is_number(value):
            raise invalid("must be a number >= 1 or \"inf\"")
        return value

    @field_validator("ladder", mode="before")
    @classmethod
    def _ladder(cls, value: Any) -> Any:
        if value is not None and not (isinstance(value, list) and all(map(_is_number, value))):
            raise invalid("must be a list of numbers (the replicas' alphas, rising to alpha)")
        return value

    def sampling(self, chat: bool) -> "Sampling":
        """The settings to sample with; ApiError (400) for settings that make no sense."""
        method: str = self.method or DEFAULT_METHOD
        proposal_temp = self.proposal_temp
        ignored: list[str] = []
        if self.temperature is not None:
            if method == "standard":
                method, proposal_temp = ("greedy", None) if self.temperature == 0 else ("standard", self.temperature)
            else:
                ignored.append("temperature")  # power and low-temp set their temperatures from alpha
        max_tokens = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        if max_tokens is None and not chat:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        defaults = SamplingSettings()
        settings = SamplingSettings(
            method=method,
            alpha=_given(self.alpha, defaults.alpha),
            block_size=_given(self.block_size, defaults.block_size),
            mcmc_steps=_given(self.mcmc_steps, defaults.mcmc_steps),
            max_tokens=max_tokens,
            proposal_temp=proposal_temp,
            seed=self.seed,
            stop=tuple(stops),
            particles=_given(self.particles, defaults.particles),
            ess_threshold=_given(self.ess_threshold, defaults.ess_threshold),
            smc_ramp=_given(self.alpha_ramp, defaults.smc_ramp),
            ladder=None if self.ladder is None else tuple(self.ladder),
            smc_rejuvenate=_given(self.rejuvenate, defaults.smc_rejuvenate),
            steps_per_token=_given(self.steps_per_token, defaults.steps_per_token),
            swap_every=_given(self.swap_every, defaults.swap_every),
            ladder_warmup=_given(self.ladder_warmup, defaults.ladder_warmup),
        )
        try:
            settings.validate()
        except ValueError as error:
            message = api_wording(str(error))
            raise ApiError(400, message, field_of(message, type(self).model_fields)) from None
        return Sampling(settings, self.n, self.stream, tuple(ignored))


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[StrictInt] | list[str] = Field(
        description="Text, or token ids (one prompt per request; a list of one string counts as text).")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if isinstance(value, str):
            if not value.strip():
                raise invalid("is empty", show_value=False)
            return value
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        raise invalid("must be a non-empty string or a list of token ids (one prompt per request)")


class TextPart(BaseModel):
    """A text content part (the only kind ps-local takes)."""

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One turn of the conversation; keys other than role and content (name, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    role: StrictStr
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        """Text parts joined into one string, so that a bad part gets one message, not one per
        member of the union."""
        if isinstance(value, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in value):
                raise invalid('may hold only text parts (type "text")')
            if not all(isinstance(part.get("text"), str) for part in value):
                raise invalid("parts need their text as a string")
            return "".join(part["text"] for part in value)
        if not isinstance(value, str):
            raise invalid("must be a string or a list of text parts")
        return value


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, rendered with the GGUF's "
                                                                  "own chat template.")

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": message.role, "content": message.content} for message in self.messages]  # type: ignore[misc]


@dataclass(frozen=True)
class Sampling:
    """What a request samples, in ps-local's terms."""

    settings: SamplingSettings
    n: int
    stream: bool
    ignored: tuple[str, ...]  # standard fields that had no effect (temperature with power)

