"""ps-local chat: in a real terminal (tmux), and with standard input not a terminal."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from ps_local.chat import chat_command
from ps_local.chat.formats import TranscriptFormat, Turn
from ps_local.chat.session import ChatSession
from ps_local.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--max-tokens", "8", "--threads", "1"]
ANSWER = re.compile(r"(?: ?(?:yes|no|maybe|!))+")  # what the tiny model says
TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (the terminal tests drive a tmux pane)")


# -- a real terminal ------------------------------------------------------------------------------


class Terminal:
    """A command running in a tmux pane of 120 x 40, on a tmux server of its own."""

    def __init__(self, command: str):
        self.folder = tempfile.mkdtemp(prefix="ps-local-tmux-")  # its socket: short, and removed after
        self.socket = os.path.join(self.folder, "socket")
        # The pane stays open after the command, to show its exit status.
        shell = f"{command}; echo EXIT=$?; sleep 600"
        self.tmux("new-session", "-d", "-s", "chat", "-x", "120", "-y", "40", "-c", str(ROOT), shell)

    def tmux(self, *args: str) -> str:
        return subprocess.run([TMUX, "-S", self.socket, *args], check=True, capture_output=True, text=True,  # type: ignore[list-item]
                              timeout=30).stdout

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", "chat", "-l", text)
        if enter:
            self.key("Enter")

    def key(self, name: str) -> None:
        self.tmux("send-keys", "-t", "chat", name)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", "chat")

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:.0f} s; the screen:\n{screen}")
            time.sleep(0.1)

    def wait_for_text(self, text: str, count: int = 1, timeout: float = 60.0) -> str:
        return self.wait_for(lambda screen: screen.count(text) >= count, f"{count} x {text!r}", timeout)

    def wait_for_prompt(self, count: int) -> str:
        """Until the ``count``-th prompt "> " is shown, with nothing typed after it yet."""
        return self.wait_for(lambda screen: screen.rstrip().splitlines()[-1:] == [">"] and _prompts(screen) >= count,
                             f"prompt number {count}")

    def close(self) -> None:
        subprocess.run([TMUX, "-S", self.socket, "kill-server"], capture_output=True, timeout=30)  # type: ignore[list-item]
        shutil.rmtree(self.folder, ignore_errors=True)


def _prompts(screen: str) -> int:
    return len(re.findall(r"^> ?", screen, re.M))


@pytest.fixture
def terminal():
    started: list[Terminal] = []

    def start(model: Path, *args: str) -> Terminal:
        command = " ".join(shlex.quote(part) for part in
                           [sys.executable, "-m", "ps_local.cli", "chat", str(model), *SMALL, *args])
        started.append(Terminal(command))
        return started[-1]

    try:
        yield start
    finally:
        for running in started:
            running.close()


def answers(screen: str) -> list[str]:
    """The lines of answers: those before a summary line."""
    lines = screen.splitlines()
    return [lines[i - 1] for i, line in enumerate(lines) if line.startswith("[sample 0]") and i > 0]


@needs_tmux
@pytest.mark.parametrize("fixture, mode", [("tiny_gguf", "plain User:/Assistant: transcript"),
                                           ("chat_gguf", "the model's chat template")])
def test_question_and_answer(terminal, request, fixture, mode):
    chat = terminal(request.getfixturevalue(fixture), "--seed", "1")
    screen = chat.wait_for_prompt(1)
    assert mode in screen and "/help" in screen  # the banner says which prompt format it uses
    chat.type("hello")
    chat.wait_for_text("[sample 0] smc")  # the default method
    chat.type("and again?")
    screen = chat.wait_for_text("[sample 0] smc", count=2)
    assert len(answers(screen)) == 2 and all(ANSWER.fullmatch(answer) for answer in answers(screen)), screen


@needs_tmux
def test_commands_change_and_show_the_settings(terminal, tiny_gguf):
    chat = terminal(tiny_gguf)
    chat.wait_for_prompt(1)
    chat.type("/alpha 2")
    chat.type("/alpha 0.5")  # refused with one line; the chat goes on
    chat.type("/settings")
    screen = chat.wait_for_text("ladder ")
    assert "error: /alpha must be a number >= 1" in screen, screen
    settings = screen[screen.index("> /settings"):]
    assert re.search(r"^alpha +2$", settings, re.M) and re.search(r"^method +smc$", settings, re.M), settings
    chat.type("/method power")
    chat.type("hello")
    screen = chat.wait_for_text("[sample 0] power")
    assert "[sample 0] power, alpha=2 B=192 N=10" in screen, screen  # /alpha 2 kept across the change
    chat.type("/help")
    chat.wait_for_text("/clear")


@needs_tmux
def test_ctrl_c_stops_an_answer_and_clears_a_line(terminal, tiny_gguf):
    chat = terminal(tiny_gguf, "--method", "power")
    chat.wait_for_prompt(1)
    # One block of ten million MH steps: hours of work, unless stopped.
    chat.type("/mcmc-steps 10000000")
    chat.type("hello")
    chat.wait_for_text("MH step")  # the progress line, on the terminal's stderr
    chat.key("C-c")
    chat.wait_for_text("(answer stopped", timeout=30)
    chat.type("/mcmc-steps 2")
    chat.wait_for_text("mcmc-steps      2")
    chat.type("hello again")
    screen = chat.wait_for_text("[sample 0] power")
    assert "N=2," in screen and len(answers(screen)) == 1, screen
    # Ctrl-C at the prompt drops what was typed: "/settings" then is a command, not "abc/settings".
    chat.wait_for_prompt(_prompts(screen))
    chat.type("abc", enter=False)
    chat.wait_for_text("> abc")
    chat.key("C-c")
    chat.type("/settings")
    screen = chat.wait_for_text("ladder ")
    assert screen.count("[sample 0]") == 1, screen
    chat.key("C-d")
    chat.wait_for_text("EXIT=0")


@needs_tmux
@pytest.mark.parametrize("leave", [["C-d"], ["/exit"], ["/quit"]])
def test_leaving_exits_with_status_0(terminal, tiny_gguf, leave):
    chat = terminal(tiny_gguf)
    chat.wait_for_prompt(1)
    if leave[0].startswith("/"):
        chat.type(leave[0])
    else:
        chat.key(leave[0])
    screen = chat.wait_for_text("EXIT=")
    assert "EXIT=0" in screen and "Traceback" not in screen, screen


# -- standard input not a terminal ----------------------------------------------------------------


def chat_pipe(model: Path, lines: str | bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    data = lines.encode() if isinstance(lines, str) else lines
    return subprocess.run([sys.executable, "-m", "ps_local.cli", "chat", str(model), *SMALL, *args],
                          input=data, capture_output=True, timeout=120)


def test_pipe_one_answer_per_message(tiny_gguf):
    result = chat_pipe(tiny_gguf, "hello\n\nhow are you?\n", "--seed", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert out.endswith("\n\n")
    replies = out[:-2].split("\n\n")
    assert len(replies) == 2 and all(ANSWER.fullmatch(reply) for reply in replies), out
    stderr = result.stderr.decode()
    # No banner, no prompt: the summaries only.
    assert stderr.count("\n") == 2 and stderr.count("[sample 0] smc, alpha=4 particles=128") == 2, stderr


def test_pipe_json_keeps_the_conversation(tiny_gguf):
    result = chat_pipe(tiny_gguf, "hello\nhow are you?\n/clear\nhello\n", "--seed", "1", "--json", "-q")
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    first, second, third = (json.loads(line) for line in result.stdout.decode().splitlines())
    import ps_local

    with ps_local.load(tiny_gguf, threads=1) as model:
        expected = model.tokens(f"User: hello\nAssistant: {first['text'].strip()}\nUser: how are you?\nAssistant:")
    assert second["prompt_token_ids"] == expected
    assert third["prompt_token_ids"] == first["prompt_token_ids"]  # /clear forgot it
    assert third["tokens"] == first["tokens"]  # the same seed, the same prompt


def test_pipe_with_a_chat_template(chat_gguf):
    result = chat_pipe(chat_gguf, "hello\n<end_of_turn> hi\n", "--json", "-q", "--system", "be brief")
    assert result.returncode == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.decode().splitlines())
    import ps_local
    from ps_local.prompts import chat_tokens

    with ps_local.load(chat_gguf, threads=1) as model:
        expected = chat_tokens(model.session.engine, [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": first["text"].strip()},
            {"role": "user", "content": "<end_of_turn> hi"}])
    assert second["prompt_token_ids"] == expected


def test_pipe_commands_and_a_bad_value(tiny_gguf):
    result = chat_pipe(tiny_gguf, "/method greedy\nhello\n//alpha is a message\n/alpha 2\nhello\n")
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert stderr.count("[sample 0] greedy") == 3  # the message beginning with // was answered too
    assert result.stdout.decode().count("\n\n") == 3
    # Greedy ignores alpha: the change is kept, with a note.
    assert "alpha           2 (kept, but greedy does not use it" in stderr
    # A bad value ends a piped chat (a script should not go on with settings it did not ask for).
    bad = chat_pipe(tiny_gguf, "/alpha x\nhello\n")
    assert bad.returncode == 2 and bad.stdout == b""
    assert bad.stderr.decode() == "ps-local: error: /alpha: 'x' is not a valid float.\n"


def test_pipe_exit_command_and_bad_utf8(tiny_gguf):
    result = chat_pipe(tiny_gguf, "hello\n/exit\nnot answered\n")
    assert result.returncode == 0 and result.stdout.decode().count("\n\n") == 1
    result = chat_pipe(tiny_gguf, b"hello\nyes \xff no\n")
    assert result.returncode == 2 and result.stdout.decode().count("\n\n") == 1
    assert "line 2 of standard input is not valid UTF-8" in result.stderr.decode()


def test_oldest_turns_are_left_out_when_the_context_is_full(tiny_gguf):
    message = "yes no maybe yes no maybe"
    result = chat_pipe(tiny_gguf, f"{message}\n" * 6, "--ctx", "96", "--json")
    assert result.returncode == 0, result.stderr
    stderr = result.stderr.decode()
    assert stderr.count("the oldest turns are left out") == 1, stderr  # said once
    prompts = [len(json.loads(line)["prompt_token_ids"]) for line in result.stdout.decode().splitlines()]
    # Each turn adds the same number of tokens until the conversation fills the context; then
    # the oldest turns make room for the new ones.
    assert len(prompts) == 6 and prompts[0] < prompts[1] < prompts[2], prompts
    assert all(length + 8 <= 96 for length in prompts), prompts
    assert prompts[5] < prompts[0] + 5 * (prompts[1] - prompts[0]), prompts  # without the 5 turns of before


def test_a_message_longer_than_the_context(tiny_gguf):
    result = chat_pipe(tiny_gguf, "yes " * 100 + "\n", "--ctx", "64")
    assert result.returncode == 2 and result.stdout == b""
    assert "the message is too long" in result.stderr.decode()


def test_an_option_the_method_ignores_is_refused(tiny_gguf):
    result = chat_pipe(tiny_gguf, "hello\n", "--method", "greedy", "--particles", "4")
    assert result.returncode == 2 and "--particles has no effect" in result.stderr.decode()


# -- the conversation and its commands, in-process ------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    import ps_local

    with ps_local.load(tiny_gguf, threads=1) as model:
        yield model


def chat_session(model, method: str = "power", **given) -> ChatSession:
    command = chat_command()
    options = command.make_context("chat", ["MODEL"]).params  # as the command gets them
    for name in ("model", "method", "system", "transcript", "as_json", "quiet"):
        del options[name]
    options.update(given)
    parameters = {p.name: p for p in command.params if p.name}
    return ChatSession(model, TranscriptFormat(model), method, options, parameters)


def test_transcript_format():
    assert TranscriptFormat.text("Be brief.", [Turn("hi", "hello")], "and?") == (
        "Be brief.\n\nUser: hi\nAssistant: hello\nUser: and?\nAssistant:")
    assert TranscriptFormat.text(None, [], "hi") == "User: hi\nAssistant:"


def test_setting_commands(loaded):
    chat = chat_session(loaded)
    assert chat.command("/set alpha inf") == "alpha           inf"
    assert chat.settings.alpha == float("inf")
    chat.command("/alpha default")
    assert chat.settings.alpha == 4.0
    chat.command('/stop "Q:" \\n')
    assert chat.settings.stop == ("Q:", "\n") and chat.turn_settings().stop == ("Q:", "\n", "\nUser:")
    chat.command("/stop none")
    assert chat.settings.stop == ()
    chat.command("/proposal-temp 0.5")
    with pytest.raises(UserError, match="drop /proposal-temp"):  # named as the chat names it
        chat.command("/method ppt")
    assert chat.method == "power"  # nothing changed
    chat.command("/proposal-temp none")
    chat.command("/method ppt")
    chat.command("/ladder 1,2,4")
    assert chat.settings.power_ladder == (1.0, 2.0, 4.0)
    assert "kept, but ppt does not use it" in chat.command("/particles 32")
    with pytest.raises(UserError, match="unknown command /temperature"):
        chat.command("/temperature 2")
    with pytest.raises(UserError, match="/method: 'fast' is not one of"):
        chat.command("/method fast")
    assert chat.command("/seed") == "seed            default (random)"


def test_an_answer_and_clear(loaded):
    from ps_local.chat.views import NoView

    chat = chat_session(loaded, max_tokens=4, seed=3)
    first = chat.answer("hello", NoView())
    assert first is not None and chat.turns == [Turn("hello", first.text.strip())]
    assert "forgotten" in chat.command("/clear") and chat.turns == []
    again = chat.answer("hello", NoView())
    assert again is not None and again.tokens == first.tokens


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_while_sampling(loaded, presses):
    """One Ctrl-C cancels the job at the next step; a second interrupts the step itself. Either
    way the conversation is as it was and the next message is answered."""
    import signal

    from ps_local.chat.views import NoView

    class Interrupting(NoView):
        def progress(self, progress):
            if progress.mh_step == 5:
                for _ in range(presses):
                    os.kill(os.getpid(), signal.SIGINT)

    chat = chat_session(loaded, max_tokens=8, mcmc_steps=10_000_000)
    started = time.monotonic()
    assert chat.answer("hello", Interrupting()) is None and chat.turns == []
    assert time.monotonic() - started < 30
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    chat.command("/mcmc-steps 2")
    assert chat.answer("hello", NoView()) is not None and len(chat.turns) == 1


def test_pipe_ctrl_c_stops_the_chat(tiny_gguf, tmp_path):
    """In a pipeline Ctrl-C ends the chat (status 130) rather than skip a message."""
    import signal

    messages = tmp_path / "messages.txt"
    messages.write_text("/mcmc-steps 10000000\n/settings\nhello\nagain\n")
    with messages.open("rb") as stdin:
        process = subprocess.Popen([sys.executable, "-m", "ps_local.cli", "chat", str(tiny_gguf), *SMALL,
                                    "--method", "power"],
                                   stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The reply to /settings ends with the ladder: the answer to "hello" is being sampled next.
        while b"ladder" not in process.stderr.readline():  # type: ignore[union-attr]
            pass
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and stdout == b"" and stderr.endswith(b"ps-local: interrupted\n"), stderr
