"""`ps-local serve` against real clients: the official `openai` package and raw HTTP, on a live
server on a random local port (tiny GGUF models, local addresses only)."""

from __future__ import annotations

import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

MODEL_ID = "tiny"
POWER = {"method": "power", "alpha": 4.0, "block_size": 4, "mcmc_steps": 3}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(model: Path, *extra: str):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ps_local.cli", "serve", str(model), "--port", str(port), "--ctx", "256",
         "--threads", "1", "--model-id", MODEL_ID, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(base + "/health", timeout=1).read()
                break
            except OSError:
                if process.poll() is not None:
                    raise AssertionError(f"the server exited: {process.stderr.read()}")
                time.sleep(0.1)
        else:
            raise AssertionError("the server did not come up")
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                raise


@pytest.fixture(scope="module")
def server(chat_gguf):
    with live_server(chat_gguf) as (base, process):
        yield base, process


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(base: str, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json",
                                                                      **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with urllib.request.urlopen(server[0] + "/health") as response:
        assert json.loads(response.read())["status"] == "ok"


def test_completion_with_power_settings_as_extra_body(client):
    response = client.completions.create(model=MODEL_ID, prompt="yes no", max_tokens=16, seed=5,
                                         extra_body={**POWER, "alpha": 2.0})
    (choice,) = response.choices
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    stats = response.model_extra["ps_local"]["samples"][0]
    assert stats["method"] == "power" and stats["alpha"] == 2.0 and stats["block_size"] == 4
    assert stats["mh_steps"] == 3 * 4 or stats["stop_reason"] != "length"  # 16 tokens: 4 blocks of 3 steps
    assert stats["seed"] == 5
    assert response.usage.completion_tokens <= 16 and response.usage.prompt_tokens == stats["prompt_tokens"]
    again = client.completions.create(model=MODEL_ID, prompt="yes no", max_tokens=16, seed=5,
                                      extra_body={**POWER, "alpha": 2.0})
    assert again.choices[0].text == choice.text  # the same seed, the same sample


@pytest.mark.parametrize("method, extra", [("smc", {"particles": 4, "alpha_ramp": 2}),
                                           ("ppt", {"ladder": [1, 2], "alpha": 2, "block_size": 4, "mcmc_steps": 2})])
def test_the_other_samplers_of_p_alpha_as_extra_body(client, method, extra):
    response = client.completions.create(model=MODEL_ID, prompt="yes no", max_tokens=8, seed=3,
                                         extra_body={"method": method, **extra})
    stats = response.model_extra["ps_local"]["samples"][0]
    assert stats["method"] == method
    if method == "smc":
        assert stats["particles"] == 4 and stats["ess_min"] >= 1
    else:
        assert stats["ladder"] == [1, 2] and len(stats["swap_acceptance"]) == 1


def test_n_samples_and_default_length(client):
    response = client.completions.create(model=MODEL_ID, prompt="no", n=3, seed=1)
    assert [c.index for c in response.choices] == [0, 1, 2]
    chains = [s["chain"] for s in response.model_extra["ps_local"]["samples"]]
    assert chains == [0, 1, 2]
    assert response.usage.completion_tokens <= 3 * 16  # OpenAI's default max_tokens of 16


def test_chat_completion_uses_the_chat_template(client):
    response = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "system", "content": "maybe"}, {"role": "user", "content": "yes"}],
        max_tokens=8, seed=2)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert isinstance(response.choices[0].message.content, str)
    plain = client.completions.create(model=MODEL_ID, prompt="yes", max_tokens=8, seed=2)
    # The template's turn markers make the chat prompt longer than the bare text.
    assert response.usage.prompt_tokens > plain.usage.prompt_tokens


def test_a_baseline_streams_token_by_token_and_matches_the_whole_answer(client):
    settings = dict(model=MODEL_ID, prompt="yes no", max_tokens=24, seed=9, temperature=1.0,
                    extra_body={"method": "standard"})
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(stream=True, **settings))
    texts = [chunk.choices[0].text for chunk in chunks]
    assert "".join(texts) == whole.choices[0].text
    assert sum(1 for text in texts if text) >= 3  # it arrived in pieces
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_stream_holds_back_what_a_stop_string_cuts(client):
    settings = dict(model=MODEL_ID, prompt="yes no", max_tokens=40, seed=3, stop=["no no"],
                    extra_body={"method": "standard"})
    whole = client.completions.create(**settings)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **settings))
    assert streamed == whole.choices[0].text
    assert "no no" not in streamed


def test_a_power_sample_streams_only_when_its_chain_ends(client):
    settings = dict(model=MODEL_ID, prompt="yes no", max_tokens=16, seed=4, extra_body=POWER)
    whole = client.completions.create(**settings)
    texts = [chunk.choices[0].text for chunk in client.completions.create(stream=True, **settings)]
    assert [text for text in texts if text] == ([whole.choices[0].text] if whole.choices[0].text else [])


def test_chat_streaming(client):
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "no"}],
                                                 max_tokens=8, seed=1, stream=True,
                                                 extra_body={"method": "low-temp"}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": "yes", "alpha": 0.5}, 400, "alpha"),
    ({"prompt": "yes", "n": 0}, 400, "n must be"),
    ({"prompt": "yes", "max_tokens": "many"}, 400, "max_tokens must be an integer"),
    ({"prompt": "yes", "top_p": 0.5}, 400, "top_p is not supported"),
    ({"prompt": "yes", "frobnicate": 1}, 400, "unknown field"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "yes", "method": "beam"}, 400, "method must be one of"),
    ({"prompt": "yes " * 300}, 400, "does not fit"),
    ({"prompt": "yes", "max_tokens": 1000}, 400, "exceeds"),
    ({"prompt": [1, 10**9]}, 400, "token ids"),
    ({"prompt": "yes", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "yes", "method": "ppt", "ladder": [1, 2]}, 400, "ladder must end at alpha 4"),
    ({"prompt": "yes", "method": "ppt", "ladder": ["hot", 4]}, 400, "ladder must be a list of numbers"),
    ({"prompt": "yes", "method": "smc", "alpha_ramp": -2}, 400, "alpha_ramp"),
])
def test_bad_requests_get_an_openai_error_body(server, body, status, fragment):
    code, reply = post(server[0], "/v1/completions", body)
    assert code == status
    assert fragment in reply["error"]["message"] and reply["error"]["type"]


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="yes", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="mcmc_steps"):
        client.completions.create(model=MODEL_ID, prompt="yes", max_tokens=2, extra_body={"mcmc_steps": -1})


def test_unknown_route_and_method(server):
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(server[0] + "/v1/engines")
    assert missing.value.code == 404 and "error" in json.loads(missing.value.read())


def test_eight_concurrent_clients_are_all_answered(server):
    """Eight clients at once, each its own seed: every one gets its own complete answer, and
    each answer is the one that client gets alone (the batch does not mix requests up)."""
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(number: int) -> None:
        try:
            local = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)
            response = local.completions.create(model=MODEL_ID, prompt="yes no", max_tokens=12, seed=100 + number,
                                                extra_body={"method": "standard"})
            results[number] = response.choices[0].text
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and sorted(results) == list(range(8))
    alone = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
    for number in (0, 5):
        solo = alone.completions.create(model=MODEL_ID, prompt="yes no", max_tokens=12, seed=100 + number,
                                        extra_body={"method": "standard"})
        assert solo.choices[0].text == results[number]


def test_a_client_that_disconnects_cancels_its_chains(server):
    """A long power stream, dropped after its first bytes: the server's job count returns to 0
    long before the chains could have finished (8 chains of at least 20,000 MH steps each: the
    first block's steps run even if it ends the sequence)."""
    base = server[0]
    body = json.dumps({"prompt": "yes", "max_tokens": 200, "stream": True, "block_size": 1, "mcmc_steps": 20000,
                       "n": 8, "seed": 1}).encode()
    request = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=30)
    time.sleep(0.5)
    assert json.loads(urllib.request.urlopen(base + "/health").read())["jobs"] == 1
    response.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if json.loads(urllib.request.urlopen(base + "/health").read())["jobs"] == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the dropped request's chains kept running")


def test_api_key_queue_limit_bounded_load_and_clean_shutdown(chat_gguf):
    """A second server with an API key and a queue of 2: no key is 401; a bounded burst of 24
    requests from 8 clients gets answers or 429s, nothing else, in bounded time; SIGTERM ends it
    with no traceback."""
    with live_server(chat_gguf, "--api-key", "sesame", "--max-queue", "2") as (base, process):
        code, reply = post(base, "/v1/completions", {"prompt": "yes", "max_tokens": 2})
        assert code == 401 and reply["error"]["code"] == "invalid_api_key"
        keyed = {"Authorization": "Bearer sesame"}
        statuses: list[int] = []
        latencies: list[float] = []
        lock = threading.Lock()

        def burst(number: int) -> None:
            for k in range(3):
                start = time.perf_counter()
                code, _ = post(base, "/v1/completions", {"prompt": "yes no", "max_tokens": 24, "seed": number * 3 + k,
                                                         "block_size": 8, "mcmc_steps": 4}, keyed)
                with lock:
                    statuses.append(code)
                    latencies.append(time.perf_counter() - start)

        started = time.monotonic()
        threads = [threading.Thread(target=burst, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert time.monotonic() - started < 120
        assert len(statuses) == 24 and set(statuses) <= {200, 429}
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1  # the queue limit did bind
        assert statistics.median(latencies) < 60
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert "Traceback" not in stderr
