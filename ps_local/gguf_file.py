"""Cheap checks on a model file before llama.cpp sees it (it may abort on garbage)."""

from __future__ import annotations

import struct
from pathlib import Path

from .errors import UserError

GGUF_MAGIC = b"GGUF"
HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count


def check_gguf(path: Path) -> None:
    """Raise UserError unless ``path`` is a readable file that starts like a GGUF."""
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if not path.is_file():
        raise UserError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as handle:
            head = handle.read(HEADER.size)
    except OSError as error:
        raise UserError(f"cannot read model file {path}: {error.strerror}") from None
    if head[:4] != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF model file (it does not start with the GGUF magic bytes)")
    if len(head) < HEADER.size:
        raise UserError(f"{path} is truncated: the GGUF header is incomplete")
    _, version, n_tensors, n_metadata = HEADER.unpack(head)
    if version not in (2, 3):
        raise UserError(f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3")
    if n_tensors == 0 or n_tensors > 1_000_000 or n_metadata > 1_000_000:
        raise UserError(f"{path} is a corrupt GGUF file (implausible header counts)")
