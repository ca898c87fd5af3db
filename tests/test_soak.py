"""scripts/soak.py: a short soak of a live server on a tiny chat model must pass, and the soak must
fail when a server misbehaves (negative controls against fake servers on 127.0.0.1)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = load_soak()


def run_soak(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_a_short_soak_on_a_tiny_chat_model_passes(chat_gguf, tmp_path):
    out = tmp_path / "soak.json"
    done = run_soak(str(chat_gguf), "--clients", "4", "--duration", "25", "--words", "yes no maybe", "--max-tokens",
                    "12", "--progress-every", "10", "--json", str(out), "--", "--ctx", "256", "--threads", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["completed"] > 0 and data["refused"] > 0 and data["cancelled"] > 0
    assert data["failed"] == 0 and data["hung"] == 0 and data["http_5xx"] == 0
    assert data["pass"] and data["jobs_left"] == 0 and data["chat"]
    assert all(row["completed"] > 0 for row in data["per_method"].values()), data["per_method"]
    for category in ("plain", "chat", "stream", "n>1"):
        assert data["per_category"][category]["completed"] > 0, category
    assert data["server"]["started_by_soak"] and data["server"]["clean"]
    assert data["rss_mib"]["start"] > 0 and data["rss_mib"]["max"] >= data["rss_mib"]["end"] > 0
    # The table is on stdout, the progress lines on stderr.
    assert "PASS" in done.stdout and "p95" in done.stdout and "[soak" in done.stderr


# --------------------------------------------------------------------------- negative controls


def fake_handler(mode: str, release: threading.Event):
    """A server that answers /health and nothing else right: POSTs get 500, a 200 with a
    malformed body, a 400 without an OpenAI error body, or no answer at all."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self.reply(200, b'{"status": "ok", "model": "fake", "jobs": 0}')
            else:
                self.do_POST()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if mode == "500":
                self.reply(500, b'{"error": {"message": "internal error: boom", "type": "server_error"}}')
            elif mode == "200":
                self.reply(200, b'{"choices": []}')
            elif mode == "400 plain":
                self.reply(400, b"bad request")
            else:  # hang
                release.wait(30)

    return Handler


@contextmanager
def fake_server(mode: str):
    release = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake_handler(mode, release))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield soak.Target("127.0.0.1", server.server_address[1])
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def specs():
    config = soak.Config(model_id="fake", words=["yes", "no"])
    valid = soak.Spec("plain", "power", "/v1/completions", b'{"prompt": "yes", "max_tokens": 2}', expect_ok=True,
                      max_tokens=2)
    streamed = soak.Spec("stream", "greedy", "/v1/completions", b'{"prompt": "yes", "stream": true}', expect_ok=True,
                         stream=True)
    bad = soak.Spec("bad", "alpha 0", "/v1/completions", b'{"prompt": "yes", "alpha": 0}', expect_ok=False)
    return config, valid, streamed, bad


@pytest.mark.parametrize("mode, expected", [
    ("500", {"valid": ("failed", 500), "stream": ("failed", 500), "bad": ("failed", 500)}),
    ("200", {"valid": ("failed", 200), "stream": ("failed", 200), "bad": ("failed", 200)}),
    ("400 plain", {"valid": ("failed", 400), "stream": ("failed", 400), "bad": ("failed", 400)}),
    ("hang", {"valid": ("hung", None), "stream": ("hung", None), "bad": ("hung", None)}),
])
def test_a_misbehaving_server_is_classified_failed_or_hung(mode, expected):
    _, valid, streamed, bad = specs()
    with fake_server(mode) as target:
        for name, spec in (("valid", valid), ("stream", streamed), ("bad", bad)):
            result = soak.execute(target, spec, timeout=1.0)
            assert (result.outcome, result.status) == expected[name], (name, result)


def test_classification_of_answers():
    _, valid, streamed, bad = specs()
    good = {"choices": [{"index": 0, "text": " yes", "finish_reason": "length"}], "usage": {"completion_tokens": 2}}
    assert soak.classify(valid, 200, json.dumps(good).encode()) == ("completed", "")
    too_long = {**good, "usage": {"completion_tokens": 3}}
    assert soak.classify(valid, 200, json.dumps(too_long).encode())[0] == "failed"
    no_reason = {**good, "choices": [{"index": 0, "text": " yes", "finish_reason": None}]}
    assert soak.classify(valid, 200, json.dumps(no_reason).encode())[0] == "failed"
    assert soak.classify(valid, 429, b'{"error": {"message": "busy"}}')[0] == "busy"
    assert soak.classify(valid, 400, b'{"error": {"message": "no"}}')[0] == "failed"
    assert soak.classify(bad, 400, b'{"error": {"message": "alpha must be >= 1"}}') == ("refused", "HTTP 400")
    assert soak.classify(bad, 400, b'{"detail": "no"}')[0] == "failed"
    assert soak.classify(bad, 503, b'{"error": {"message": "x"}}')[0] == "failed"
    chunk = json.dumps({"choices": [{"index": 0, "text": " yes", "finish_reason": None}]})
    last = json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
    assert soak.classify(streamed, 200, b"", [chunk, last, "[DONE]"]) == ("completed", "")
    assert soak.classify(streamed, 200, b"", [chunk, last])[0] == "failed"  # no [DONE]
    assert soak.classify(streamed, 200, b"", [chunk, "[DONE]"])[0] == "failed"  # no finish_reason
    error = json.dumps({"error": {"message": "cancelled", "type": "server_error"}})
    assert soak.classify(streamed, 200, b"", [chunk, error, "[DONE]"])[0] == "failed"


def test_the_soak_fails_against_a_server_that_answers_500(tmp_path):
    out = tmp_path / "soak.json"
    with fake_server("500") as target:
        done = run_soak("--url", target.url, "--clients", "2", "--duration", "2", "--request-timeout", "5",
                        "--json", str(out), timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["failed"] > 0 and data["http_5xx"] > 0 and data["completed"] == 0 and not data["pass"]
    assert data["failures"][0]["status"] == 500 and "boom" in data["failures"][0]["response"]
    assert "FAIL" in done.stdout and "HTTP 500" in done.stdout


@pytest.mark.parametrize("args", [
    ["--url", "http://192.0.2.1:8080"],
    ["--url", "http://example.com:8080"],
    ["--url", "http://[2001:db8::1]:8080"],
    ["--url", "https://127.0.0.1:8080"],
    ["model.gguf", "--", "--host", "0.0.0.0"],
])
def test_non_loopback_servers_are_refused(args):
    done = run_soak(*args, timeout=30)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1 and "error" in done.stderr


def test_loopback_addresses_are_accepted():
    assert soak.loopback_target("http://127.0.0.1:8080").port == 8080
    assert soak.loopback_target("http://127.1.2.3:9").host == "127.1.2.3"
    assert soak.loopback_target("http://localhost:80").host == "localhost"
    assert soak.loopback_target("http://[::1]:8080").url == "http://[::1]:8080"
