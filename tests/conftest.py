"""Shared fixtures: tiny GGUF models written at test time, never committed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_tiny_model(path: Path, *extra: str) -> Path:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_gguf.py"), str(path), *extra],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def chat_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("chat") / "chat.gguf", "--chat-template")
