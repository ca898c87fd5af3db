"""Cheap checks on a model file before llama.cpp sees it (it may abort on garbage), and a
pure-Python reader of its metadata (architecture, layer and head counts) for the checks
that need more than the header: recurrent architectures, the size of the KV cache."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

from .errors import UserError

GGUF_MAGIC = b"GGUF"
HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count

# GGUF metadata value types (gguf.GGUFValueType): scalar ones map to struct codes.
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, str] = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}
_SCALAR_STRUCTS = {kind: struct.Struct("<" + code) for kind, code in _SCALARS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

MAX_STRING_LIST = 64  # longer string arrays (token lists, merges) come back as their length only
_CHUNK = 1 << 22  # read the metadata 4 MiB at a time: a 262k-token vocabulary is a few MiB
_MAX_DEPTH = 8  # nested arrays deeper than this are not something a converter writes


@dataclass(frozen=True)
class StringList:
    """A long array of strings (``tokenizer.ggml.tokens``, ``.merges``) skipped over: only its length."""

    length: int


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
    _check_header(path, head)


def _check_header(path: Path, head: bytes) -> tuple[int, int, int]:
    """Version, tensor count and metadata count of a header; UserError when they are wrong."""
    if head[:4] != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF model file (it does not start with the GGUF magic bytes)")
    if len(head) < HEADER.size:
        raise UserError(f"{path} is truncated: the GGUF header is incomplete")
    _, version, n_tensors, n_metadata = HEADER.unpack(head)
    if version not in (2, 3):
        raise UserError(f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3")
    if n_tensors == 0 or n_tensors > 1_000_000 or n_metadata > 1_000_000:
        raise UserError(f"{path} is a corrupt GGUF file (implausible header counts)")
    return version, n_tensors, n_metadata


class _Corrupt(Exception):
    """Raised inside the parser; read_metadata turns it into a UserError naming the file."""


class _Truncated(Exception):
    pass


class _Reader:
    """The file read forward in large chunks; values are decoded with struct.unpack_from.

    Only the unread tail of the buffer is kept when it is refilled, so memory stays at about
    one chunk however large the vocabulary is.
    """

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size  # of the file: a length beyond what is left is corrupt, not just large
        self.data = b""
        self.pos = 0
        self.consumed = 0  # file offset of data[0]

    def need(self, count: int) -> None:
        """Make ``data[pos:pos + count]`` available."""
        if self.pos + count <= len(self.data):
            return
        if self.consumed + self.pos + count > self.size:
            raise _Truncated
        self.consumed += self.pos
        rest = self.data[self.pos :]
        self.data = rest + self.handle.read(max(_CHUNK, count - len(rest)))
        self.pos = 0
        if len(self.data) < count:
            raise _Truncated  # the file shrank while being read

    def scalar(self, kind: int) -> object:
        packer = _SCALAR_STRUCTS[kind]
        self.need(packer.size)
        (value,) = packer.unpack_from(self.data, self.pos)
        self.pos += packer.size
        return value

    def u32(self) -> int:
        return int(self.scalar(4))  # type: ignore[call-overload]

    def u64(self) -> int:
        return int(self.scalar(10))  # type: ignore[call-overload]

    def length(self, what: str) -> int:
        count = self.u64()
        if count > self.size:  # every element takes at least a byte: this would run past the end
            raise _Corrupt(f"a {what} of {count:,} entries is longer than the file")
        return count

    def string(self) -> str:
        count = self.length("string")
        self.need(count)
        raw = self.data[self.pos : self.pos + count]
        self.pos += count
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Step over ``count`` strings without decoding them: the vocabulary's hot loop.

        Locals instead of attributes: this runs once per token, 262,144 times for Gemma 3.
        """
        data, pos, end, limit = self.data, self.pos, len(self.data), self.size
        unpack = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8)
                data, pos, end = self.data, self.pos, len(self.data)
            (length,) = unpack(data, pos)
            if length > limit:
                raise _Corrupt(f"a string of {length:,} bytes is longer than the file")
            pos += 8 + length
            if pos > end:  # the string runs past the buffer: refill from its end, then skip the rest
                overshoot = pos - end
                self.pos = end
                self.need(overshoot)
                data, end = self.data, len(self.data)
                pos = self.pos + overshoot
        self.pos = pos

    def value(self, kind: int, depth: int = 0) -> object:
        if kind in _SCALAR_STRUCTS:
            return self.scalar(kind)
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= _MAX_DEPTH:
                raise _Corrupt(f"arrays nested more than {_MAX_DEPTH} deep")
            element = self.u32()
            count = self.length("array")
            return self.array(element, count, depth + 1)
        raise _Corrupt(f"unknown metadata value type {kind}")

    def array(self, element: int, count: int, depth: int) -> object:
        code = _SCALARS.get(element)
        if code is not None:
            size = _SCALAR_STRUCTS[element].size
            self.need(count * size)
            values = list(struct.unpack_from(f"<{count}{code}", self.data, self.pos))
            self.pos += count * size
            return values
        if element == _STRING and count > MAX_STRING_LIST:
            self.skip_strings(count)
            return StringList(count)
        return [self.value(element, depth) for _ in range(count)]


def read_metadata(path: Path) -> dict[str, object]:
    """Every metadata key of a GGUF file with its value.

    Scalars come back as Python numbers and bools, strings as str, arrays as lists; arrays of
    more than MAX_STRING_LIST strings (the vocabulary) as a :class:`StringList` of their
    length. UserError, one line, for a file that is missing, not a GGUF, truncated or corrupt.
    """
    check_gguf(path)
    try:
        with path.open("rb") as handle:
            reader = _Reader(handle, path.stat().st_size)
            reader.need(HEADER.size)
            _, _, n_metadata = _check_header(path, reader.data[: HEADER.size])
            reader.pos = HEADER.size
            metadata: dict[str, object] = {}
            where = "in its first key"
            for _ in range(n_metadata):
                key = reader.string()
                where = f"in the value of '{key}'"
                metadata[key] = reader.value(reader.u32())
                where = f"after key '{key}'"
    except _Truncated:
        raise UserError(f"{path} is truncated: its GGUF metadata ends early") from None
    except _Corrupt as error:
        raise UserError(f"{path} is a corrupt GGUF file ({error} {where})") from None
    except OSError as error:
        raise UserError(f"cannot read model file {path}: {error.strerror}") from None
    return metadata


# llama.cpp keeps these architectures' state (or part of it) in recurrent cells that hold one
# running summary per sequence, not one entry per position: seq_cp of a prefix is impossible.
# From llm_arch_is_recurrent / llm_arch_is_hybrid in llama.cpp's src/llama-arch.cpp.
RECURRENT_ARCHITECTURES = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
HYBRID_ARCHITECTURES = frozenset({
    "jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h",
    "nemotron_h_moe", "qwen3next", "qwen35", "qwen35moe", "kimi-linear", "deepseek4",
})
# Hyperparameters only a recurrent block has: they catch architectures newer than the lists.
_RECURRENT_KEY_GROUPS = ("ssm", "wkv", "shortconv", "kda")


def architecture(metadata: Mapping[str, object]) -> str:
    """``general.architecture``; UserError when the file does not say."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise UserError("the model file has no general.architecture metadata")
    return arch


def check_architecture(metadata: Mapping[str, object], model: str = "the model") -> None:
    """UserError unless llama.cpp can branch this architecture's state at a resample index."""
    arch = architecture(metadata)
    if arch in RECURRENT_ARCHITECTURES:
        kind = "recurrent"
    elif arch in HYBRID_ARCHITECTURES:
        kind = "hybrid recurrent"
    elif any(key.startswith(f"{arch}.{group}.") for key in metadata for group in _RECURRENT_KEY_GROUPS):
        kind = "recurrent"
    else:
        return
    raise UserError(
        f"{model} uses the {kind} architecture '{arch}': llama.cpp cannot branch its state "
        "at a resample index, so ps-local cannot power-sample it"
    )
