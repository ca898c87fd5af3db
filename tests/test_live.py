"""The live view (ps_local.live): rendering on a fake terminal, and ps-local generate in a real one."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ps_local.live import DIM, RESET, LiveView
from ps_local.samplers.base import Progress

from test_chat import ROOT, Terminal, needs_tmux

WORDS = {1: b"Hello", 2: b" world", 3: b"\n", 4: b"again", 5: b"</s>", 6: b"\x1b[31mred"}


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakePipe(io.StringIO):
    def isatty(self) -> bool:
        return False


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def view(stream: io.StringIO, clock: Clock, color: bool = True, columns: int = 80) -> LiveView:
    return LiveView(stream, WORDS.__getitem__, hidden=lambda t: t == 5, color=color, clock=clock,
                    size=lambda: os.terminal_size((columns, 24)))


def progress(chain: int = 0, tokens: tuple[int, ...] = (1, 2), step: int = 3, decoded: int = 50) -> Progress:
    return Progress(chain=chain, block=2, blocks=4, mh_step=step, mh_steps=10, accepted=2, proposals=5,
                    tokens_decoded=decoded, elapsed_s=1.0, tokens=tokens)


def smc_progress(chain: int = 0, token: int = 7, ess: float = 41.26, particles: int = 128, resamples: int = 3,
                 tokens: tuple[int, ...] = (1, 2)) -> Progress:
    """What Power-SMC reports after a token: mh_step is the token, mh_steps the most tokens."""
    return Progress(chain=chain, block=1, blocks=1, mh_step=token, mh_steps=64, accepted=0, proposals=0,
                    tokens_decoded=200, elapsed_s=1.0, tokens=tokens, method="smc", ess=ess, particles=particles,
                    resamples=resamples)


def test_smc_status() -> None:
    stream, clock = FakeTTY(), Clock()
    live = view(stream, clock, columns=120)
    live.start("smc")
    assert "sampling (smc)" in stream.getvalue()
    clock.now += 2.0
    live.progress(smc_progress(tokens=(1, 2, 3, 4)))
    status = live.frame()[-1]
    assert status == "token 7/64, ESS 41.3 of 128 particles, 3 resamplings | 200 tok decoded, 100.0 tok/s, 2.0 s"
    assert f"{DIM}Hello world{RESET}" in stream.getvalue()  # the heaviest particle's text
    assert "block" not in stream.getvalue() and "MH step" not in stream.getvalue()
    clock.now += 1.0
    live.progress(smc_progress(token=8, ess=128.0, resamples=4))
    assert live.frame()[-1].startswith("token 8/64, ESS 128.0 of 128 particles, 4 resamplings | ")


def test_smc_status_of_several_chains() -> None:
    stream, clock = FakeTTY(), Clock()
    live = view(stream, clock, columns=200)
    live.progress(smc_progress(chain=0, token=5, ess=12.4, particles=16))
    live.progress(smc_progress(chain=1, token=9, ess=99.6, particles=128))
    status = live.frame()[-1]
    assert status.endswith("| #0 t5/64 ESS 12/16; #1 t9/64 ESS 100/128"), status
    assert "400 tok decoded" in status


def test_status_and_dim_text() -> None:
    stream, clock = FakeTTY(), Clock()
    live = view(stream, clock)
    live.start("power")
    assert "sampling (power)" in stream.getvalue()
    clock.now += 2.0
    live.progress(progress(tokens=(1, 2, 3, 4, 5)))
    out = stream.getvalue()
    assert "block 2/4" in out and "MH step 3/10" in out and "accepted 2/5" in out
    assert "50 tok decoded" in out and "25.0 tok/s" in out and "2.0 s" in out
    assert f"{DIM}Hello world{RESET}" in out and f"{DIM}again{RESET}" in out
    assert "</s>" not in out  # hidden (EOS) tokens are not text
    assert out.startswith("sampling (power)") and "\r\x1b[K\x1b[2m" in out  # the second frame overwrote the first
    clock.now += 1.0
    live.progress(progress(tokens=(1,), step=4))
    assert stream.getvalue()[len(out):].startswith("\r\x1b[K" + "\x1b[1A\x1b[K" * 2)  # up over the three lines drawn


def test_no_color() -> None:
    stream, clock = FakeTTY(), Clock()
    live = view(stream, clock, color=False)
    live.progress(progress())
    out = stream.getvalue()
    assert DIM not in out and RESET not in out
    assert "| Hello world" in out and "MH step 3/10" in out


def test_no_color_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    stream = FakeTTY()
    LiveView(stream, WORDS.__getitem__, size=lambda: os.terminal_size((80, 24))).progress(progress())
    assert DIM not in stream.getvalue() and "MH step" in stream.getvalue()


def test_model_text_cannot_drive_the_terminal() -> None:
    stream, clock = FakeTTY(), Clock()
    view(stream, clock).progress(progress(tokens=(6,)))
    assert "\x1b[31m" not in stream.getvalue() and "[31mred" in stream.getvalue()


def test_throttled() -> None:
    stream, clock = FakeTTY(), Clock()
    live = view(stream, clock)
    live.progress(progress(step=1))
    for step in range(2, 50):
        clock.now += 0.001
        live.progress(progress(step=step))
    assert stream.getvalue().count("MH step") == 1
    clock.now += 0.2
    live.progress(progress(step=50))
    assert stream.getvalue().count("MH step") == 2 and "MH step 50/10" in stream.getvalue()


def test_fits_the_width_and_keeps_the_last_lines() -> None:
    stream, clock = FakeTTY(), Clock()
    live = view(stream, clock, columns=20)
    live.progress(progress(tokens=(1, 2, 3) * 10 + (4,)))
    frame = live.frame()
    assert len(frame) == 5  # four text lines and the status
    assert frame[-2] == f"{DIM}again{RESET}"
    for line in frame:
        assert len(line.replace(DIM, "").replace(RESET, "")) <= 19


def test_erased_at_the_end() -> None:
    stream, clock = FakeTTY(), Clock()
    live = view(stream, clock)
    live.progress(progress())
    before = len(stream.getvalue())
    live.clear()
    assert stream.getvalue()[before:] == "\r\x1b[K\x1b[1A\x1b[K"  # two lines drawn, both cleared
    live.clear()
    assert len(stream.getvalue()) == before + len("\r\x1b[K\x1b[1A\x1b[K")  # nothing left to erase


def test_several_chains() -> None:
    stream, clock = FakeTTY(), Clock()
    live = view(stream, clock, columns=200)
    live.progress(progress(chain=1, tokens=(4,), decoded=10))
    clock.now += 1.0
    live.progress(progress(chain=0, tokens=(1,), decoded=30))
    status = live.frame()[-1]
    assert "#0 b2/4 s3/10 a2/5" in status and "#1 b2/4" in status and "40 tok decoded" in status
    assert live.frame()[0] == f"{DIM}Hello{RESET}"  # chain 0's text
    live.done(0)
    assert live.frame()[0] == f"{DIM}again{RESET}"  # then the chain still running
    assert "40 tok decoded" in live.frame()[-1] and "#0" not in live.frame()[-1]


def test_token_stream() -> None:
    stream, clock = FakeTTY(), Clock()
    live = view(stream, clock)
    live.start("standard")
    clock.now += 1.0
    live.token(0, [1, 2])
    assert f"{DIM}Hello world{RESET}" in stream.getvalue() and "sampling (standard): 2 tokens" in stream.getvalue()


def test_nothing_on_a_pipe() -> None:
    stream, clock = FakePipe(), Clock()
    live = view(stream, clock)
    live.start("power")
    live.progress(progress())
    live.token(0, [1])
    live.done(0)
    live.clear()
    assert stream.getvalue() == ""


# -- in a real terminal ---------------------------------------------------------------------------

GENERATE = ["generate", "TINY", "yes", "--method", "power", "--max-tokens", "16", "--block-size", "4", "--mcmc-steps",
            "2000", "--seed", "1", "--threads", "1"]


def generate_args(model: Path) -> list[str]:
    return [sys.executable, "-m", "ps_local.cli", *[str(model) if a == "TINY" else a for a in GENERATE]]


def recorded(args: list[str], tmp_path: Path) -> tuple[str, str]:
    """Run a command in a tmux pane: (everything the pane was sent, recorded from before the
    command starts, since the run lasts about a second; the final screen)."""
    raw = tmp_path / "pane.raw"
    terminal = Terminal("sleep 1; " + " ".join(shlex.quote(a) for a in args))
    try:
        terminal.tmux("pipe-pane", "-t", "chat", f"cat >> {shlex.quote(str(raw))}")
        screen = terminal.wait_for_text("EXIT=0", timeout=300)
    finally:
        terminal.close()
    return raw.read_bytes().decode("utf-8", errors="replace"), screen


@needs_tmux
def test_generate_in_a_terminal(tiny_gguf: Path, tmp_path: Path) -> None:
    piped = subprocess.run(generate_args(tiny_gguf), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip()  # not a terminal: only the final text on stdout ...
    assert "MH step" not in piped.stdout + piped.stderr and "\x1b" not in piped.stdout + piped.stderr  # ... nothing drawn
    final = piped.stdout.strip().splitlines()[-1]

    sent, screen = recorded(generate_args(tiny_gguf), tmp_path)
    assert re.search(r"block \d/4, MH step \d+/2000, accepted \d+/\d+ \| \d+ tok decoded", sent), sent[:2000]
    assert "\x1b[2m" in sent and "\x1b[1A\x1b[K" in sent  # the dim text, redrawn in place
    assert final in screen and "[sample 0] power" in screen
    assert "MH step" not in screen and "sampling (" not in screen  # erased before the answer was printed


@needs_tmux
def test_generate_piped_in_a_terminal(tiny_gguf: Path, tmp_path: Path) -> None:
    expected = subprocess.run(generate_args(tiny_gguf), capture_output=True, text=True, timeout=300, cwd=ROOT).stdout
    out = tmp_path / "stdout"
    command = " ".join(shlex.quote(a) for a in generate_args(tiny_gguf)) + f" | cat > {shlex.quote(str(out))}"
    terminal = Terminal(command)
    try:
        screen = terminal.wait_for_text("EXIT=0", timeout=300)
    finally:
        terminal.close()
    text = out.read_text()
    assert "[sample 0] power" in screen  # stderr: the terminal
    assert text == expected and text.strip()  # stdout: only the final text, as without a terminal


@needs_tmux
def test_default_smc_in_a_terminal(tiny_gguf: Path, tmp_path: Path) -> None:
    """The default method (smc) reports after each token: the token, the ESS of the particles
    and the resamplings so far; erased before the answer and the summary are printed."""
    args = [sys.executable, "-m", "ps_local.cli", "generate", str(tiny_gguf), "yes", "--max-tokens", "200",
            "--seed", "1", "--threads", "1"]
    sent, screen = recorded(args, tmp_path)
    assert "sampling (smc)" in sent
    status = r"token \d+/200, ESS \d+\.\d of 128 particles, \d+ resamplings? \| \d+ tok decoded"
    assert re.search(status, sent), sent[:2000]
    assert "[sample 0] smc, alpha=4 particles=128" in screen
    assert "tok decoded" not in screen and "sampling (" not in screen  # erased before the answer was printed
