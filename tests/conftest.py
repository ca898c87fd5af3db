"""Shared fixtures: tiny GGUF models written at test time, never committed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import math

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A program that starts up to 40 sleeping children and prints how many it could (sandbox tests).
FORK_CHILDREN = """
import os, time
made = 0
for _ in range(40):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        made += 1
    except OSError:
        pass
print(made)
"""



def write_tiny_model(path: Path, *extra: str) -> Path:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_gguf.py"), str(path), *extra],
        check=True,
        capture_output=True,
    )
    return path


def llama_scratch_logprobs(engine, prompt: list[int], tokens: list[int]) -> list[float]:
    """log p of each of ``tokens`` after ``prompt``, decoded from scratch one token at a time in
    slot 0 of a llama.cpp engine (which is emptied first)."""
    engine.reset()
    rows = [engine.decode([(0, prompt)])[0]]
    rows += [engine.decode([(0, [token])])[0] for token in tokens[:-1]]
    return [float(row[t] - row.max() - math.log(np.exp(row.astype(np.float64) - row.max()).sum()))
            for row, t in zip(rows, tokens)]


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def chat_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("chat") / "chat.gguf", "--chat-template")
