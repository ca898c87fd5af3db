"""OpenAI response bodies: whole completions, stream chunks, and the text of a stream as
tokens arrive."""

from __future__ import annotations

import codecs
import json
import time
import uuid
from typing import Any

from ..output import stats_record
from ..settings import Sample
from .requests import Sampling


class TextStream:
    """Text of a plain-decoding chain as its tokens arrive, holding back what a stop string
    may still cut and bytes of an unfinished UTF-8 character."""

    def __init__(self, token_bytes: Any, holdback: int):
        self.token_bytes = token_bytes
        self.holdback = holdback
        self.buffer = bytearray()
        self.tokens_seen = 0
        self.fed = 0
        self.text = ""  # what has been sent
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, tokens: list[int], is_end: Any) -> str:
        for token in tokens[self.tokens_seen :]:
            if not is_end(token):
                self.buffer += self.token_bytes(token)
        self.tokens_seen = len(tokens)
        safe = len(self.buffer) - self.holdback
        if safe <= self.fed:
            return ""
        delta = self.decoder.decode(bytes(self.buffer[self.fed : safe]))
        self.fed = safe
        self.text += delta
        return delta

    def finish(self, final_text: str) -> str:
        delta = final_text[len(self.text) :] if final_text.startswith(self.text) else ""
        self.text = final_text
        return delta


def finish_reason(sample: Sample) -> str:
    return "length" if sample.stats.stop_reason == "length" else "stop"


class Reply:
    """OpenAI response bodies for one request."""

    def __init__(self, model_id: str, chat: bool, prompt_tokens: int, parsed: Sampling):
        self.model_id, self.chat, self.prompt_tokens, self.parsed = model_id, chat, prompt_tokens, parsed
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    def stats(self, samples: list[Sample]) -> dict[str, Any]:
        return {"method": self.parsed.settings.method, "ignored": list(self.parsed.ignored),
                "samples": [stats_record(sample.stats) for sample in samples]}

    def usage(self, samples: list[Sample]) -> dict[str, int]:
        completion = sum(len(sample.tokens) for sample in samples)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def complete(self, samples: list[Sample]) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                        "logprobs": None, "finish_reason": finish_reason(s)} for i, s in enumerate(samples)]
        else:
            choices = [{"index": i, "text": s.text, "logprobs": None, "finish_reason": finish_reason(s)}
                       for i, s in enumerate(samples)]
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head(kind), "choices": choices, "usage": self.usage(samples), "ps_local": self.stats(samples)}

    def chunk(self, index: int, delta: str | dict[str, str], finish: str | None, sample: Sample | None = None) -> str:
        if self.chat:
            content = delta if isinstance(delta, dict) else {"content": delta}
            choice: dict[str, Any] = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
            body = {**self.head("chat.completion.chunk"), "choices": [choice]}
        else:
            body = {**self.head("text_completion"),
                    "choices": [{"index": index, "text": delta, "logprobs": None, "finish_reason": finish}]}
        if sample is not None:
            body["ps_local"] = self.stats([sample])
        return json.dumps(body, ensure_ascii=False)
