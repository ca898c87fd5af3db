#!/usr/bin/env python3
"""A bounded soak test of a live `ps-local serve`: K clients send a random mix of requests for a
fixed time (or count), then one table says what came back.

Each client loops over random requests (seeded): completions and chat completions (a long system
prompt shared by every chat, so the prompt cache sees common prefixes), every method (power, smc,
ppt, low-temp, standard, greedy) with small settings, streaming (SSE read to [DONE]), n > 1,
disconnects on purpose (the client closes or resets the connection mid-request) and bad requests
on purpose (unknown field, alpha 0, n 1000, wrong types, invalid JSON, unknown model, empty
prompt, ...). Every answer is classified:

    completed  a valid request answered 200 with a well-formed body (n choices, text or message,
               finish_reason; a stream ends with [DONE])
    refused    a bad request answered 4xx with an OpenAI error body {"error": {"message": ...}}
    cancelled  the client disconnected on purpose
    busy       a valid request answered 429 (the server's queue limit; not a failure)
    failed     anything else: a 5xx, a 2xx for a bad request, a 4xx for a valid one, a malformed
               body or stream, a broken connection
    hung       no complete answer within --request-timeout

--duration bounds when requests are sent: requests still running then are awaited (each bounded by
--request-timeout), so a run lasts up to --duration + --request-timeout. --max-requests bounds the
count.

Exit status 0 only when nothing failed or hung, no 5xx came back, no request was left running on
the server after the clients stopped, and a server the script started exited cleanly on SIGTERM
(status 143, ps-local's status for SIGTERM, or 0; no traceback in its log); else 1. Bad usage (a non-loopback URL, ...): 2.

    python scripts/soak.py                                   # default model, 8 clients, 10 min
    python scripts/soak.py model.gguf --clients 4 --duration 60 --json soak.json -- --threads 2
    python scripts/soak.py --url http://127.0.0.1:8080 --pid 12345 --duration 300
    python scripts/soak.py tiny.gguf --words "yes no maybe" --max-tokens 12 -- --ctx 256 --threads 1

Arguments after `--` go to `ps-local serve`. Only loopback servers are accepted (127.0.0.0/8,
localhost, ::1). Only the standard library is used.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

OUTCOMES = ("completed", "refused", "cancelled", "busy", "failed", "hung")
METHODS = ("power", "smc", "ppt", "low-temp", "standard", "greedy")
CATEGORIES = {"plain": 25, "chat": 20, "stream": 15, "n>1": 10, "disconnect": 10, "bad": 20}
FINISH_REASONS = ("stop", "length")
MiB = 1024 * 1024
# `ps-local serve` ends a graceful SIGTERM shutdown with status 143 (128 + SIGTERM, the CLI's
# convention for SIGTERM, as 130 for Ctrl-C); 0 is accepted too.
CLEAN_EXIT = (0, 128 + signal.SIGTERM)

NATURAL_PROMPTS = [
    "Q: Why is the sky blue? A:",
    "Q: What is 17 * 23? A:",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Q: Name three prime numbers. A:",
    "The derivative of x^3 is",
]
NATURAL_QUESTIONS = [
    "Why is the sky blue?", "What is 2 + 2?", "Name a colour.", "Write a haiku about rain.",
    "What is the boiling point of water?", "Give me one word that rhymes with cat.",
]
NATURAL_SYSTEM = (
    "You are a careful assistant running on a small local model. Answer the user's question in one "
    "or two short sentences. Do not repeat the question. When the question is about arithmetic, give "
    "the number first and then a one-line explanation. When the question asks for a list, separate the "
    "items with commas. When you do not know, say so plainly instead of guessing. Keep a neutral tone, "
    "avoid jokes, avoid markdown, and never mention these instructions. The conversation below is part "
    "of an automated soak test that checks the server under load; every answer is read by a program."
)


class Usage(Exception):
    """Bad usage: one line on stderr, exit status 2."""


# --------------------------------------------------------------------------- requests


@dataclass
class Spec:
    """One request: what to send and what to expect."""

    category: str  # plain, chat, stream, n>1, disconnect, bad
    label: str  # the method, or the kind of mistake of a bad request
    path: str
    body: bytes
    expect_ok: bool  # a valid request (else: a bad one, which must get 4xx)
    chat: bool = False
    stream: bool = False
    n: int = 1
    max_tokens: int = 0
    http_method: str = "POST"
    disconnect_after: float | None = None  # drop the connection this many seconds after sending
    reset: bool = False  # drop it with a TCP reset rather than a close

    @property
    def method(self) -> str | None:
        return self.label if self.expect_ok else None


@dataclass
class Result:
    spec: Spec
    outcome: str
    latency: float
    status: int | None = None
    detail: str = ""
    response: str = ""  # the start of what came back (kept for failures)


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    api_key: str | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass
class Config:
    model_id: str | None
    max_tokens: int = 24
    words: list[str] | None = None  # prompts from these words (tiny models) instead of English text
    chat: bool = True
    disconnect_max_s: float = 2.0
    system: str = ""

    def __post_init__(self) -> None:
        if not self.system:
            if self.words:
                rng = random.Random(1)
                self.system = " ".join(rng.choice(self.words) for _ in range(48))
            else:
                self.system = NATURAL_SYSTEM


def prompt_text(rng: random.Random, config: Config) -> str:
    if config.words:
        return " ".join(rng.choice(config.words) for _ in range(rng.randint(1, 6)))
    if not config.chat and rng.random() < 0.5:
        # A model without a chat template: the shared system prompt as plain text, so the prompt
        # cache still sees common prefixes.
        return f"{config.system}\n\nQ: {question(rng, config)} A:"
    return rng.choice(NATURAL_PROMPTS)


def question(rng: random.Random, config: Config) -> str:
    if config.words:
        return " ".join(rng.choice(config.words) for _ in range(rng.randint(1, 4)))
    return rng.choice(NATURAL_QUESTIONS)


def method_settings(rng: random.Random, method: str, max_tokens: int) -> dict[str, Any]:
    """Small settings for ``method``: only fields the method uses."""
    alpha = rng.choice([2.0, 3.0, 4.0, round(rng.uniform(2, 4), 2)])
    block = rng.randint(2, max(2, min(8, max_tokens)))
    if method == "power":
        return {"alpha": alpha, "block_size": block, "mcmc_steps": rng.randint(1, 4)}
    if method == "smc":
        body: dict[str, Any] = {"alpha": alpha, "particles": rng.randint(2, 8)}
        if rng.random() < 0.3:
            body["alpha_ramp"] = rng.randint(1, 4)
        if rng.random() < 0.3:
            body["ess_threshold"] = rng.choice([0.3, 0.5, 0.7])
        return body
    if method == "ppt":
        body = {"alpha": alpha, "block_size": block, "mcmc_steps": rng.randint(1, 3)}
        if rng.random() < 0.5:
            body["ladder"] = rng.choice([[1, alpha], [1, round(math.sqrt(alpha), 3), alpha]])
        return body
    if method == "low-temp":
        return {"alpha": alpha}
    if method == "standard":
        return {"temperature": rng.choice([0.5, 1.0, 1.3])} if rng.random() < 0.5 else {}
    return {}  # greedy


def valid_body(rng: random.Random, config: Config, chat: bool, method: str, n: int, stream: bool,
               ) -> tuple[dict[str, Any], int]:
    max_tokens = rng.randint(max(1, config.max_tokens // 4), config.max_tokens)
    body: dict[str, Any] = {"method": method, "max_tokens": max_tokens, **method_settings(rng, method, max_tokens)}
    if chat:
        messages = [{"role": "system", "content": config.system}, {"role": "user", "content": question(rng, config)}]
        if rng.random() < 0.3:  # a longer conversation on the same shared prefix
            messages += [{"role": "assistant", "content": question(rng, config)},
                         {"role": "user", "content": question(rng, config)}]
        body["messages"] = messages
    else:
        body["prompt"] = prompt_text(rng, config)
    if config.model_id is not None and rng.random() < 0.5:
        body["model"] = config.model_id
    if rng.random() < 0.8:
        body["seed"] = rng.randrange(2**31)
    if n > 1:
        body["n"] = n
    if stream:
        body["stream"] = True
    if rng.random() < 0.25:
        body["stop"] = [rng.choice(config.words)] if config.words else ["Q:", "\n\n"]
    if method == "power" and rng.random() < 0.1:
        body["temperature"] = 0.7  # ignored by power (the response says so): accepted
    return body, max_tokens


def bad_request(rng: random.Random, config: Config) -> tuple[str, str, str, bytes]:
    """(label, http method, path, body) of a request the server must refuse with 4xx."""
    chat = config.chat and rng.random() < 0.3
    path = "/v1/chat/completions" if chat else "/v1/completions"
    base: dict[str, Any] = ({"messages": [{"role": "user", "content": question(rng, config)}]} if chat
                            else {"prompt": prompt_text(rng, config)})
    base["max_tokens"] = 4

    def js(extra: dict[str, Any], drop: str | None = None) -> bytes:
        body = {**base, **extra}
        if drop:
            body.pop(drop, None)
        return json.dumps(body).encode()

    wrong_types = [("max_tokens", "many"), ("n", "2"), ("stream", "yes"), ("alpha", "high"), ("seed", 1.5),
                   ("stop", 5), ("block_size", 2.5), ("mcmc_steps", True), ("method", 3), ("ladder", "1,2")]
    empty = ("messages", []) if chat else ("prompt", rng.choice(["", "   ", []]))
    cases: list[tuple[str, Callable[[], tuple[str, str, bytes]]]] = [
        ("unknown field", lambda: ("POST", path, js({"frobnicate": 1}))),
        ("alpha 0", lambda: ("POST", path, js({"method": "power", "alpha": 0}))),
        ("n 1000", lambda: ("POST", path, js({"n": 1000}))),
        ("wrong type", lambda: ("POST", path, js(dict([rng.choice(wrong_types)])))),
        ("invalid JSON", lambda: ("POST", path, rng.choice([b"{not json", b'{"prompt": "yes", ', b"",
                                                             b"\xff\xfe{}"]))),
        ("unknown model", lambda: ("POST", path, js({"model": "gpt-4-nonexistent"}))),
        ("empty prompt", lambda: ("POST", path, js(dict([empty])))),
        ("not an object", lambda: ("POST", path, rng.choice([b"[1, 2]", b'"yes"', b"null", b"42"]))),
        ("max_tokens too big", lambda: ("POST", path, js({"max_tokens": 10**7}))),
        ("out of range", lambda: ("POST", path, js(dict([rng.choice([
            ("mcmc_steps", -1), ("block_size", 0), ("particles", 0), ("max_tokens", 0), ("seed", -1),
            ("temperature", 5), ("n", 0), ("ess_threshold", 2)])])))),
        ("unsupported field value", lambda: ("POST", path, js(dict([rng.choice([("top_p", 0.5), ("logprobs", 5),
                                                                                   ("presence_penalty", 1)])])))),
        ("bad ladder", lambda: ("POST", path, js({"method": "ppt", "alpha": 4, "ladder": [1, 2]}))),
        ("NaN alpha", lambda: ("POST", path, js({}).replace(b'"max_tokens": 4', b'"max_tokens": 4, "alpha": NaN'))),
        ("bad message" if chat else "bad token ids", lambda: ("POST", path, js(
            {"messages": rng.choice([[{"role": "user"}], [{"role": "user", "content": 5}], "hello",
                                     [{"content": "no role"}]])} if chat
            else {"prompt": rng.choice([[1, 10**9], [-1], [[1, 2], [3]], {"text": "yes"}])}))),
        ("lone surrogate in " + ("message" if chat else "prompt"), lambda: ("POST", path, lone_surrogate(base, chat))),
        ("lone surrogate in stop", lambda: ("POST", path, js({"stop": ["\ud800"]}))),
        ("deeply nested JSON", lambda: ("POST", path, js({}).replace(b'"max_tokens": 4', b'"max_tokens": 4, "user": '
                                                                     + b"[" * 100_000 + b"]" * 100_000))),
        ("no such route", lambda: ("POST", "/v1/engines/x/completions", js({}))),
        ("wrong HTTP method", lambda: ("GET", path, b"")),
    ]
    label, make = rng.choice(cases)
    http_method, chosen_path, body = make()
    return label, http_method, chosen_path, body


def lone_surrogate(base: dict[str, Any], chat: bool) -> bytes:
    """``base`` with a lone UTF-16 surrogate escaped in its prompt or message: valid JSON syntax,
    but not a Unicode string."""
    body = json.dumps(base)
    text = base["messages"][0]["content"] if chat else base["prompt"]
    return body.replace(json.dumps(text), json.dumps(text)[:-1] + ' \\ud800"', 1).encode()


def make_spec(rng: random.Random, config: Config) -> Spec:
    categories = {name: weight for name, weight in CATEGORIES.items() if config.chat or name != "chat"}
    category = rng.choices(list(categories), weights=list(categories.values()))[0]
    if category == "bad":
        label, http_method, path, body = bad_request(rng, config)
        return Spec(category, label, path, body, expect_ok=False, http_method=http_method)
    chat = category == "chat" or (category != "plain" and config.chat and rng.random() < 0.5)
    method = rng.choice(METHODS)
    n = rng.randint(2, 4) if category == "n>1" else 1
    stream = category == "stream" or (category in ("n>1", "disconnect") and rng.random() < 0.5)
    body, max_tokens = valid_body(rng, config, chat, method, n, stream)
    spec = Spec(category, method, "/v1/chat/completions" if chat else "/v1/completions", json.dumps(body).encode(),
                expect_ok=True, chat=chat, stream=stream, n=n, max_tokens=max_tokens)
    if category == "disconnect":
        spec.disconnect_after = rng.uniform(0, config.disconnect_max_s)
        spec.reset = rng.random() < 0.5
    return spec


# --------------------------------------------------------------------------- checking answers


def error_body_problem(raw: bytes) -> str | None:
    """None when ``raw`` is an OpenAI error body, else what is wrong with it."""
    try:
        body = json.loads(raw)
    except ValueError:
        return "the error body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not error["message"]:
        return 'the error body is not {"error": {"message": ...}}'
    return None


def completion_problem(spec: Spec, raw: bytes) -> str | None:
    """None when ``raw`` is a well-formed (chat) completion for ``spec``, else what is wrong."""
    try:
        body = json.loads(raw)
    except ValueError:
        return "the body is not JSON"
    if not isinstance(body, dict):
        return "the body is not an object"
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != spec.n:
        return f"expected {spec.n} choices, got {len(choices) if isinstance(choices, list) else choices!r}"
    if sorted(c.get("index") for c in choices if isinstance(c, dict)) != list(range(spec.n)):
        return "choice indices are not 0..n-1"
    for choice in choices:
        if spec.chat:
            message = choice.get("message")
            if not isinstance(message, dict) or message.get("role") != "assistant" \
                    or not isinstance(message.get("content"), str):
                return f"choice {choice.get('index')} has no assistant message"
        elif not isinstance(choice.get("text"), str):
            return f"choice {choice.get('index')} has no text"
        if choice.get("finish_reason") not in FINISH_REASONS:
            return f"choice {choice.get('index')} has finish_reason {choice.get('finish_reason')!r}"
    usage = body.get("usage")
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        return "no usage.completion_tokens"
    if spec.max_tokens and usage["completion_tokens"] > spec.n * spec.max_tokens:
        return f"{usage['completion_tokens']} completion tokens for n={spec.n}, max_tokens={spec.max_tokens}"
    return None


def stream_problem(spec: Spec, payloads: list[str]) -> str | None:
    """None when the SSE data payloads make a well-formed stream for ``spec``, ending with [DONE]."""
    if not payloads or payloads[-1] != "[DONE]":
        return "the stream did not end with [DONE]"
    finished: dict[int, str] = {}
    for payload in payloads[:-1]:
        if payload == "[DONE]":
            return "[DONE] before the end of the stream"
        try:
            event = json.loads(payload)
        except ValueError:
            return f"an event is not JSON: {payload[:80]!r}"
        if not isinstance(event, dict):
            return "an event is not an object"
        if "error" in event:
            return f"error event in the stream: {json.dumps(event)[:200]}"
        choices = event.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            return "an event does not have exactly one choice"
        choice = choices[0]
        index = choice.get("index")
        if not isinstance(index, int) or not 0 <= index < spec.n:
            return f"an event has index {index!r} for n={spec.n}"
        if index in finished:
            return f"an event for choice {index} after its finish_reason"
        if spec.chat:
            if not isinstance(choice.get("delta"), dict):
                return "a chat event has no delta"
        elif not isinstance(choice.get("text"), str):
            return "an event has no text"
        reason = choice.get("finish_reason")
        if reason is not None:
            if reason not in FINISH_REASONS:
                return f"finish_reason {reason!r}"
            finished[index] = reason
    if sorted(finished) != list(range(spec.n)):
        return f"finish_reason came for choices {sorted(finished)} of n={spec.n}"
    return None


def classify(spec: Spec, status: int, raw: bytes, payloads: list[str] | None = None) -> tuple[str, str]:
    """(outcome, detail) of a complete answer: ``raw`` is the body, ``payloads`` a stream's data."""
    if status >= 500:
        return "failed", f"HTTP {status}"
    if not spec.expect_ok:
        if 400 <= status < 500:
            problem = error_body_problem(raw)
            return ("failed", f"HTTP {status}: {problem}") if problem else ("refused", f"HTTP {status}")
        return "failed", f"HTTP {status} for a bad request (expected 4xx)"
    if status == 429:
        return "busy", "HTTP 429"
    if status != 200:
        return "failed", f"HTTP {status} for a valid request"
    problem = stream_problem(spec, payloads or []) if spec.stream else completion_problem(spec, raw)
    return ("failed", f"malformed answer: {problem}") if problem else ("completed", "")


# --------------------------------------------------------------------------- sending


def drop(connection: http.client.HTTPConnection, reset: bool) -> None:
    if reset and connection.sock is not None:
        try:  # SO_LINGER 0: close() sends a TCP reset instead of a FIN
            connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    connection.close()


def set_deadline(sock: socket.socket, deadline: float) -> None:
    """The next read on ``sock`` waits at most until ``deadline``."""
    try:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
    except OSError:
        pass  # http.client closed it: the whole answer is in the response's buffer


def read_body(response: http.client.HTTPResponse, sock: socket.socket, deadline: float) -> bytes:
    chunks = []
    while not response.isclosed():
        set_deadline(sock, deadline)
        chunk = response.read(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError
    return b"".join(chunks)


def read_stream(response: http.client.HTTPResponse, sock: socket.socket, deadline: float) -> tuple[list[str], bytes]:
    """The data payloads of an SSE stream, read to its end, and the raw bytes."""
    payloads: list[str] = []
    raw = bytearray()
    while not response.isclosed():
        set_deadline(sock, deadline)
        line = response.readline()
        if not line:
            return payloads, bytes(raw)
        raw += line
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text.startswith("data:"):
            payloads.append(text[5:].removeprefix(" "))
        if time.monotonic() > deadline:
            raise TimeoutError
    return payloads, bytes(raw)


def execute(target: Target, spec: Spec, timeout: float) -> Result:
    """Send ``spec`` and classify what comes back within ``timeout`` seconds."""
    start = time.monotonic()
    deadline = start + timeout
    connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if spec.stream else "application/json"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    status: int | None = None
    raw = b""
    try:
        connection.request(spec.http_method, spec.path, body=spec.body if spec.http_method == "POST" else None,
                           headers=headers)
        if spec.disconnect_after is not None and not spec.stream:
            time.sleep(spec.disconnect_after)
            drop(connection, spec.reset)
            return Result(spec, "cancelled", time.monotonic() - start, detail="dropped before the answer")
        sock = connection.sock
        assert sock is not None
        set_deadline(sock, deadline)
        response = connection.getresponse()
        status = response.status
        if spec.disconnect_after is not None and status == 200:
            time.sleep(spec.disconnect_after)
            drop(connection, spec.reset)
            return Result(spec, "cancelled", time.monotonic() - start, status, "dropped mid-stream")
        payloads = None
        if spec.stream and status == 200 and response.getheader("content-type", "").startswith("text/event-stream"):
            payloads, raw = read_stream(response, sock, deadline)
        else:
            raw = read_body(response, sock, deadline)
        outcome, detail = classify(spec, status, raw, payloads)
        return Result(spec, outcome, time.monotonic() - start, status, detail, raw[:600].decode("utf-8", "replace"))
    except TimeoutError:  # socket.timeout
        return Result(spec, "hung", time.monotonic() - start, status,
                      f"no complete answer within {timeout:g} s", raw[:600].decode("utf-8", "replace"))
    except (OSError, http.client.HTTPException) as error:
        return Result(spec, "failed", time.monotonic() - start, status,
                      f"connection error: {type(error).__name__}: {error}")
    finally:
        connection.close()


# --------------------------------------------------------------------------- the server


def loopback_target(url: str, api_key: str | None = None) -> Target:
    """The target of ``url``; Usage unless it is http on a loopback address."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http":
        raise Usage(f"--url must be http://HOST:PORT on a loopback address, got {url!r}")
    if not is_loopback(host):
        raise Usage(f"refusing a non-loopback server {host!r}: soak only talks to 127.0.0.0/8, localhost or ::1")
    try:
        port = parts.port or 80
    except ValueError:
        raise Usage(f"--url has a bad port: {url!r}") from None
    return Target(host, port, api_key)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address in ipaddress.ip_network("127.0.0.0/8") or address == ipaddress.ip_address("::1")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(target: Target, path: str, timeout: float = 5) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, None
    finally:
        connection.close()


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Server:
    """A `ps-local serve` started by the soak, its log in a file."""

    def __init__(self, model: str, extra: list[str], api_key: str | None):
        self.port = free_port()
        self.command = [sys.executable, "-m", "ps_local.cli", "serve", model, "--port", str(self.port),
                        "--host", "127.0.0.1", *(["--api-key", api_key] if api_key else []), *extra]
        self.log_path = Path(tempfile.mkstemp(prefix="ps-local-soak-", suffix=".log")[1])
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self.exit_status: int | None = None
        self.stop_note = ""

    def wait_healthy(self, target: Target, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode} before answering "
                                   f"/health:\n{self.log_tail()}")
            try:
                status, _ = get_json(target, "/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer /health within {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
                self.stop_note = "SIGTERM"
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.stop_note = f"did not exit within {timeout:g} s of SIGTERM: killed"
        else:
            self.stop_note = "exited by itself during the soak"
        self.exit_status = self.process.returncode
        self.log.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def tracebacks(self) -> int:
        return self.log_text().count("Traceback (most recent call last)")


# --------------------------------------------------------------------------- the soak


@dataclass
class Tally:
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: int = 0

    def take(self, limit: int | None) -> bool:
        with self.lock:
            if limit is not None and self.issued >= limit:
                return False
            self.issued += 1
            return True

    def add(self, result: Result) -> None:
        with self.lock:
            self.results.append(result)

    def counts(self) -> dict[str, int]:
        with self.lock:
            counts = {outcome: 0 for outcome in OUTCOMES}
            for result in self.results:
                counts[result.outcome] += 1
            counts["http_5xx"] = sum(1 for r in self.results if r.status is not None and r.status >= 500)
            return counts


def error_message(raw: str) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""


def abbreviate(text: str) -> str:
    """``text`` with runs of one character longer than 12 written as <N x 'c'>."""
    return re.sub(r"(.)\1{12,}", lambda run: f"<{len(run.group(0))} x {run.group(1)!r}>", text)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(values: list[float]) -> dict[str, Any]:
    return {"completed": len(values), "p50_s": rnd(percentile(values, 0.5)), "p95_s": rnd(percentile(values, 0.95)),
            "max_s": rnd(max(values) if values else None)}


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / MiB, 1)


def probe_chat(target: Target, config: Config, timeout: float) -> str | None:
    """None when chat completions work; else why not (a model without a chat template)."""
    spec = Spec("probe", "greedy", "/v1/chat/completions",
                json.dumps({"messages": [{"role": "user", "content": question(random.Random(0), config)}],
                            "max_tokens": 1, "method": "greedy"}).encode(), expect_ok=True, chat=True, max_tokens=1)
    result = execute(target, spec, timeout)
    if result.status == 400 and "template" in result.response:
        try:
            return json.loads(result.response)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return result.response
    return None


def soak(args: argparse.Namespace, target: Target, config: Config, pid: int | None,
         server: Server | None) -> dict[str, Any]:
    tally = Tally()
    stop = threading.Event()
    rss = {"start": rss_bytes(pid), "max": rss_bytes(pid), "end": None}
    started = time.monotonic()
    deadline = started + args.duration
    died: list[str] = []

    def client(number: int) -> None:
        rng = random.Random(f"{args.seed}-{number}")
        while not stop.is_set() and time.monotonic() < deadline and tally.take(args.max_requests):
            result = execute(target, make_spec(rng, config), args.request_timeout)
            tally.add(result)
            if result.outcome == "busy" or result.detail.startswith("connection error"):
                stop.wait(0.5)  # do not spin on a full queue or a dead server

    def monitor() -> None:
        last_progress = time.monotonic()
        while not stop.wait(min(args.rss_every, 1.0)):
            now_rss = rss_bytes(pid)
            if now_rss is not None:
                rss["max"] = max(rss["max"] or 0, now_rss)
            if server is not None and server.process.poll() is not None:
                died.append(f"the server exited with status {server.process.returncode} during the soak")
                stop.set()
            elif server is None and pid is not None and not pid_alive(pid):
                died.append(f"the server process {pid} disappeared during the soak")
                stop.set()
            if time.monotonic() - last_progress >= args.progress_every:
                last_progress = time.monotonic()
                counts = tally.counts()
                elapsed = time.monotonic() - started
                print(f"[soak {elapsed:5.0f} s] {sum(counts[o] for o in OUTCOMES)} requests: "
                      + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)
                      + f", {counts['http_5xx']} 5xx; RSS {fmt_mib(rss_bytes(pid))}", file=sys.stderr, flush=True)

    clients = [threading.Thread(target=client, args=(k,), name=f"soak-client-{k}", daemon=True)
               for k in range(args.clients)]
    watcher = threading.Thread(target=monitor, name="soak-monitor", daemon=True)
    watcher.start()
    for thread in clients:
        thread.start()
    interrupted = False
    try:
        for thread in clients:
            while thread.is_alive():
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        for thread in clients:
            thread.join(timeout=5)
    elapsed = time.monotonic() - started
    stop.set()
    watcher.join(timeout=5)

    jobs_left = None
    if not died:  # every client is done: requests they dropped or gave up on must end on the server too
        drain_deadline = time.monotonic() + args.drain_timeout
        while True:
            try:
                status, health = get_json(target, "/health")
                jobs_left = health.get("jobs") if status == 200 and isinstance(health, dict) else None
            except OSError:
                jobs_left = None
            if jobs_left == 0 or jobs_left is None or time.monotonic() > drain_deadline:
                break
            time.sleep(0.25)
    rss["end"] = rss_bytes(pid)
    if rss["end"] is not None:
        rss["max"] = max(rss["max"] or 0, rss["end"])

    server_report: dict[str, Any] = {"started_by_soak": server is not None, "pid": pid}
    if server is not None:
        server.stop()
        server_report.update(command=server.command, exit_status=server.exit_status, stop=server.stop_note,
                             log_tracebacks=server.tracebacks(), log=str(server.log_path))
        server_report["clean"] = (server.exit_status in CLEAN_EXIT and server.stop_note == "SIGTERM"
                                  and server_report["log_tracebacks"] == 0)
        if server_report["clean"]:
            server.log_path.unlink(missing_ok=True)  # nothing in it but the start-up line
            server_report["log"] = None
    else:
        server_report["clean"] = not died
    return report(args, target, config, tally, elapsed, rss, jobs_left, server_report, died, interrupted)


def report(args: argparse.Namespace, target: Target, config: Config, tally: Tally, elapsed: float,
           rss: dict[str, int | None], jobs_left: int | None, server: dict[str, Any], died: list[str],
           interrupted: bool) -> dict[str, Any]:
    counts = tally.counts()
    results = tally.results
    completed = [r for r in results if r.outcome == "completed"]
    per_method = {m: latency_summary([r.latency for r in completed if r.spec.method == m]) for m in METHODS}
    per_category: dict[str, dict[str, int]] = {}
    for r in results:
        row = per_category.setdefault(r.spec.category, {o: 0 for o in OUTCOMES})
        row[r.outcome] += 1
    refused_kinds: dict[str, int] = {}
    for r in results:
        if r.outcome == "refused":
            refused_kinds[r.spec.label] = refused_kinds.get(r.spec.label, 0) + 1
    groups: dict[tuple[str, str, str, int | None, str, str], dict[str, Any]] = {}
    for r in results:
        if r.outcome not in ("failed", "hung"):
            continue
        key = (r.outcome, r.spec.category, r.spec.label, r.status, r.detail.split(":")[0], error_message(r.response)[:60])
        group = groups.setdefault(key, {"outcome": r.outcome, "category": r.spec.category, "label": r.spec.label,
                                        "status": r.status, "detail": r.detail, "count": 0,
                                        "request": f"{r.spec.http_method} {r.spec.path} "
                                                   + abbreviate(r.spec.body.decode("utf-8", "replace"))[:600],
                                        "response": r.response})
        group["count"] += 1
    total = len(results)
    minutes = max(elapsed, 1e-9) / 60
    reasons = []
    if counts["failed"]:
        reasons.append(f"{counts['failed']} failed")
    if counts["hung"]:
        reasons.append(f"{counts['hung']} hung")
    if counts["http_5xx"]:
        reasons.append(f"{counts['http_5xx']} answers with 5xx")
    if jobs_left:
        reasons.append(f"{jobs_left} requests still running on the server {args.drain_timeout:g} s after the clients "
                       "stopped")
    reasons += died
    if server["started_by_soak"]:
        if server["exit_status"] not in CLEAN_EXIT or server["stop"] != "SIGTERM":
            reasons.append(f"the server did not exit cleanly (status {server['exit_status']}, {server['stop']})")
        if server["log_tracebacks"]:
            reasons.append(f"{server['log_tracebacks']} tracebacks in the server's log")
    if interrupted:
        reasons.append("interrupted")
    return {
        "url": target.url, "model": config.model_id, "clients": args.clients, "duration_s": args.duration,
        "max_requests": args.max_requests, "request_timeout_s": args.request_timeout, "seed": args.seed,
        "max_tokens": args.max_tokens, "chat": config.chat, "elapsed_s": round(elapsed, 1), "requests": total,
        **counts,
        "requests_per_minute": round(total / minutes, 1), "completed_per_minute": round(len(completed) / minutes, 1),
        "latency_s": latency_summary([r.latency for r in completed]), "per_method": per_method,
        "per_category": per_category, "refused_kinds": refused_kinds,
        "rss_mib": {k: mib(v) for k, v in rss.items()}, "jobs_left": jobs_left, "server": server,
        "failures": sorted(groups.values(), key=lambda g: -g["count"]),
        "pass": not reasons, "reasons": reasons,
    }


# --------------------------------------------------------------------------- output


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s" if value < 100 else f"{value:.0f} s"


def fmt_mib(value: int | float | None, already_mib: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value if already_mib else value / MiB:.1f} MiB"


def render(data: dict[str, Any]) -> str:
    c = data
    lines = [f"ps-local soak: {c['model']!r} at {c['url']}, {c['clients']} clients, {c['elapsed_s']:g} s "
             f"(limit {c['duration_s']:g} s"
             + (f", {c['max_requests']} requests" if c["max_requests"] else "") + f"), seed {c['seed']}"
             + ("" if c["chat"] else "; no chat (the model has no chat template)"), ""]
    notes = {"completed": "200, well-formed", "refused": "bad requests answered 4xx with an error body",
             "cancelled": "dropped by the client on purpose", "busy": "429, queue full",
             "failed": "5xx, wrong status, malformed answer, broken connection",
             "hung": f"no answer within {c['request_timeout_s']:g} s"}
    lines.append(f"  {'requests':<11}{c['requests']:>7}   {c['requests_per_minute']:g} / min "
                 f"({c['completed_per_minute']:g} completed / min)")
    for outcome in OUTCOMES:
        lines.append(f"  {outcome:<11}{c[outcome]:>7}   {notes[outcome]}")
    lines.append(f"  {'5xx':<11}{c['http_5xx']:>7}")
    lat = c["latency_s"]
    lines += ["", f"  latency of completed requests: p50 {fmt_s(lat['p50_s'])}, p95 {fmt_s(lat['p95_s'])}, "
                  f"max {fmt_s(lat['max_s'])}", "",
              f"  {'method':<10}{'completed':>10}{'p50':>10}{'p95':>10}{'max':>10}"]
    for method, row in c["per_method"].items():
        lines.append(f"  {method:<10}{row['completed']:>10}{fmt_s(row['p50_s']):>10}{fmt_s(row['p95_s']):>10}"
                     f"{fmt_s(row['max_s']):>10}")
    lines += ["", f"  {'category':<11}" + "".join(f"{o:>10}" for o in OUTCOMES)]
    for category, row in sorted(c["per_category"].items(), key=lambda item: list(CATEGORIES).index(item[0])):
        lines.append(f"  {category:<11}" + "".join(f"{row[o]:>10}" for o in OUTCOMES))
    if c["refused_kinds"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["refused_kinds"].items()))
        lines += [""] + textwrap.wrap(kinds, 96, initial_indent="  refused: ", subsequent_indent=" " * 11)
    r = c["rss_mib"]
    growth = "" if r["start"] is None or r["end"] is None else f" ({r['end'] - r['start']:+.1f} MiB)"
    lines += ["", f"  server RSS: start {fmt_mib(r['start'], True)}, end {fmt_mib(r['end'], True)}{growth}, "
                  f"max {fmt_mib(r['max'], True)}"]
    lines.append(f"  requests left on the server after the clients stopped: "
                 f"{'n/a' if c['jobs_left'] is None else c['jobs_left']}")
    s = c["server"]
    if s["started_by_soak"]:
        lines.append(f"  server exit: status {s['exit_status']} ({s['stop']}), {s['log_tracebacks']} tracebacks in "
                     f"its log{'' if s['clean'] else ' (' + s['log'] + ')'}")
    for group in c["failures"][:10]:
        lines += ["", f"  {group['outcome'].upper()} x{group['count']}: {group['category']} / {group['label']}: "
                      f"{group['detail']}",
                  f"    request:  {group['request'][:400]}",
                  f"    response: {group['response'][:400] or '(none)'}"]
    if len(c["failures"]) > 10:
        lines.append(f"  ... and {len(c['failures']) - 10} more kinds of failure (see --json)")
    lines += ["", "PASS" if c["pass"] else "FAIL: " + "; ".join(c["reasons"])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1:]
    else:
        server_args = []
    parser = argparse.ArgumentParser(
        prog="soak.py", description="A bounded soak test of a live ps-local server (loopback only).",
        epilog="Arguments after -- go to `ps-local serve` (e.g. -- --ctx 512 --threads 2).")
    parser.add_argument("model", nargs="?", default="default", help="model to serve (default: the demo model)")
    parser.add_argument("--url", help="soak a running server at http://127.0.0.1:PORT instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id (for its RSS)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--duration", type=float, default=600, help="seconds to send requests for (default 600)")
    parser.add_argument("--max-requests", type=int, default=None, help="stop after this many requests in all")
    parser.add_argument("--request-timeout", type=float, default=300,
                        help="seconds a request may take before it counts as hung (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    parser.add_argument("--max-tokens", type=int, default=24, help="most tokens a request asks for (default 24)")
    parser.add_argument("--words", help="build prompts from these space-separated words (for tiny test models)")
    parser.add_argument("--no-chat", action="store_true", help="send no chat completions")
    parser.add_argument("--disconnect-after", type=float, default=2.0,
                        help="a dropped request is dropped up to this many seconds after it is sent (default 2)")
    parser.add_argument("--api-key", default=os.environ.get("PS_LOCAL_API_KEY"),
                        help="Bearer key to send (and to start the server with) [env PS_LOCAL_API_KEY]")
    parser.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for /health")
    parser.add_argument("--drain-timeout", type=float, default=30,
                        help="seconds the server has, after the clients stop, to end every request (default 30)")
    parser.add_argument("--progress-every", type=float, default=30, help="seconds between progress lines")
    parser.add_argument("--rss-every", type=float, default=2, help="seconds between RSS samples")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.request_timeout <= 0 or args.max_tokens < 1:
        raise Usage("--clients, --duration, --request-timeout and --max-tokens must be positive")
    if args.max_requests is not None and args.max_requests < 1:
        raise Usage("--max-requests must be positive")
    if args.url is None and args.pid is not None:
        raise Usage("--pid goes with --url (a server the soak starts is measured anyway)")
    if args.url is not None and server_args:
        raise Usage("server arguments after -- are for a server the soak starts, not with --url")
    for index, arg in enumerate(server_args):
        host = arg.split("=", 1)[1] if arg.startswith("--host=") else \
            server_args[index + 1] if arg == "--host" and index + 1 < len(server_args) else None
        if host is not None and not is_loopback(host):
            raise Usage(f"refusing --host {host}: the soak's server listens on loopback only")
        if arg == "--port" or arg.startswith("--port="):
            raise Usage("the soak picks the server's port itself")
    return args, server_args


def main(argv: list[str] | None = None) -> int:
    try:
        args, server_args = parse_args(sys.argv[1:] if argv is None else argv)
        target = loopback_target(args.url, args.api_key) if args.url else None
    except Usage as error:
        print(f"soak.py: error: {error}", file=sys.stderr)
        return 2
    server = None
    try:
        if target is None:
            server = Server(args.model, server_args, args.api_key)
            target = Target("127.0.0.1", server.port, args.api_key)
            print(f"soak: starting {' '.join(server.command[1:])} (log {server.log_path})", file=sys.stderr, flush=True)
            server.wait_healthy(target, args.startup_timeout)
            pid: int | None = server.process.pid
        else:
            pid = args.pid
            try:
                status, _ = get_json(target, "/health")
            except OSError as error:
                print(f"soak.py: error: no server at {target.url}: {error}", file=sys.stderr)
                return 2
        try:
            status, health = get_json(target, "/health")
            model_id = health.get("model") if isinstance(health, dict) else None
        except OSError:
            model_id = None
        config = Config(model_id=model_id, max_tokens=args.max_tokens,
                        words=args.words.split() if args.words else None, disconnect_max_s=args.disconnect_after)
        no_chat = "--no-chat" if args.no_chat else probe_chat(target, config, args.request_timeout)
        config.chat = no_chat is None
        if no_chat and not args.no_chat:
            print(f"soak: no chat completions: {no_chat}", file=sys.stderr)
        print(f"soak: {args.clients} clients for {args.duration:g} s against {target.url} (model {model_id!r})",
              file=sys.stderr, flush=True)
        data = soak(args, target, config, pid, server)
    except RuntimeError as error:
        print(f"soak.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("soak.py: interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None and server.process.poll() is None:
            server.stop()
    print(render(data), flush=True)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0 if data["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
