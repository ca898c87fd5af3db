"""The llama.cpp engine: the only module that imports llama_cpp.

It talks to llama.cpp's C API directly (not the high-level ``Llama`` class, whose
``n_tokens`` bookkeeping fights low-level cache edits). Sequences live in one unified KV
cache, so branching at a resample index is ``seq_rm`` + ``seq_cp`` of cached cells: the
prompt and the kept prefix are never evaluated again.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections import deque
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

import llama_cpp.llama_cpp as llama

from .errors import ModelError, UserError
from .gguf_file import read_metadata
from .protocol import DecodeRequest, SpecialToken
from .spm_check import byte_fallback, unencodable_character


class EngineError(ModelError):
    """llama.cpp refused something (a file it cannot load, a full cache, ...)."""


_log_lines: deque[str] = deque(maxlen=400)
GGML_LOG_LEVEL_DEBUG = 1

CACHE_GGML_TYPES = {"f16": llama.GGML_TYPE_F16, "q8_0": llama.GGML_TYPE_Q8_0}
BYTE_TOKEN_TYPE = 6  # gguf.TokenType.BYTE: the <0xXX> fall-back tokens


@llama.llama_log_callback
def _keep_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp writes to stderr even when asked to be quiet; keep its lines to explain failures
    # (not the debug ones, which would push the root cause out of the buffer).
    if level != GGML_LOG_LEVEL_DEBUG:
        _log_lines.append(text.decode("utf-8", errors="replace"))


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama.llama_log_set(_keep_log, ctypes.c_void_p(0))
        llama.llama_backend_init()
        _backend_ready = True


def _first_error() -> str:
    """The earliest error llama.cpp logged since the log was cleared: usually the root cause."""
    for line in _log_lines:
        if "error" in line.lower() or "failed" in line.lower():
            message = line.strip().split("error loading model: ")[-1]
            return re.sub(r"^\w+: ", "", message)  # drop the C function name
    return ""


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (read from /proc/cpuinfo; False where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return any(line.startswith("flags") and " amx_int8" in line for line in info)
    except OSError:
        return False


def supports_gpu_offload() -> bool:
    return bool(llama.llama_supports_gpu_offload())


class LlamaEngine:
    """A GGUF model and, once :meth:`allocate` has run, a context with ``n_slots`` sequences."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        n_threads: int | None = None,
        n_gpu_layers: int = -1,
        metadata: Mapping[str, object] | None = None,
    ):
        """``metadata``: the file's GGUF metadata when the caller has read it already."""
        _init_backend()
        self.path = Path(model_path)
        self.n_threads = n_threads or os.cpu_count() or 1
        params = llama.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else (999 if supports_gpu_offload() else 0)
        if cpu_has_amx():
            # llama.cpp's AMX kernels (weights repacked into an "extra" buffer on Sapphire Rapids
            # and later Xeons) crash the process on K-quants, the default model's Q4_K_M included
            # (llama.cpp issue 20824, open, no fix): keep the weights in plain CPU buffers there.
            params.use_extra_bufts = False
        _log_lines.clear()
        self.model = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            reason = _first_error() or "llama.cpp could not load it"
            raise EngineError(f"cannot load model {self.path}: {reason}")
        is_hybrid = getattr(llama, "llama_model_is_hybrid", lambda model: False)  # newer bindings only
        if llama.llama_model_is_recurrent(self.model) or is_hybrid(self.model):
            # Caught from the GGUF header before loading; this guards architectures added since.
            self.close()
            raise EngineError(f"{self.path} is a recurrent or hybrid model: llama.cpp cannot branch its state "
                              "at a resample index, so ps-local cannot power-sample it")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama.llama_model_n_ctx_train(self.model))
        self.ctx: ctypes.c_void_p | None = None
        self.n_ctx = 0
        self.n_batch = 0
        self._lengths: list[int] = []
        self._pieces: dict[int, bytes] = {}
        metadata = read_metadata(self.path) if metadata is None else metadata
        self._spm_pieces = self._spm_without_byte_fallback(metadata)
        self._special_vocabulary: tuple[SpecialToken, ...] | None = None
        self._spm_space_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True) is not False
        self._eog: dict[int, bool] = {}

    # -- vocabulary ----------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = False, add_bos: bool = True) -> list[int]:
        """Tokens as llama.cpp gives them by default: BOS added where the model asks for it.

        ``special`` parses control-token text (needed after a chat template, which may
        also spell out BOS itself: then ``add_bos`` is False).
        """
        self._check_encodable(text, special)
        data = text.encode("utf-8")
        capacity = len(data) + 16
        while True:
            buffer = (llama.llama_token * capacity)()
            count = llama.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_bos, special)
            if count >= 0:
                return list(buffer[:count])
            capacity = -count

    def _check_encodable(self, text: str, special: bool) -> None:
        """UserError for text that llama.cpp's SentencePiece tokenizer would abort the whole
        process on: a character in no vocabulary piece, with no byte token to fall back to."""
        if self._spm_pieces is None:
            return
        # llama.cpp splits off user-defined tokens always, control tokens when parsing special text.
        specials = [token.text for token in self.special_vocabulary() if special or not token.control]
        char = unencodable_character(text, self._spm_pieces, self._spm_space_prefix, specials)
        if char is not None:
            # A space (llama.cpp also puts one before the text) that no piece joins to what follows.
            what = "a space before text" if char == " " else f"{char!r} (U+{ord(char):04X})"
            raise UserError(
                f"the prompt contains {what}, which this model's vocabulary cannot encode "
                "(it has no byte fall-back tokens)"
            )

    def _spm_without_byte_fallback(self, metadata: Mapping[str, object]) -> dict[str, float] | None:
        """The vocabulary's pieces and scores when it is SentencePiece and lacks byte tokens
        (llama.cpp aborts on text it cannot encode); None for every other vocabulary."""
        if llama.llama_vocab_type(self.vocab) != llama.LLAMA_VOCAB_TYPE_SPM:
            return None  # the other tokenizers skip what they cannot encode instead
        types = metadata.get("tokenizer.ggml.token_type")
        if isinstance(types, list) and sum(1 for kind in types if kind == BYTE_TOKEN_TYPE) >= 256:
            return None  # the usual case, decided from the header without touching 262k tokens
        pieces = {
            (llama.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", errors="replace"):
            float(llama.llama_vocab_get_score(self.vocab, token))
            for token in range(self.n_vocab)
        }
        return None if all(byte_fallback(pieces, byte) for byte in range(256)) else pieces

    def special_vocabulary(self) -> tuple[SpecialToken, ...]:
        """The tokens llama.cpp splits out of text before tokenizing the rest (control, unknown
        and user-defined ones), in the order it looks for them: longest text (in bytes) first.
        Read once, when first needed: it walks the whole vocabulary (0.2 s for Gemma's 262k)."""
        if self._special_vocabulary is None:
            self._special_vocabulary = self._read_special_vocabulary()
        return self._special_vocabulary

    def _read_special_vocabulary(self) -> tuple[SpecialToken, ...]:
        control = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_UNKNOWN
        found = []
        for token in range(self.n_vocab):
            attributes = int(llama.llama_vocab_get_attr(self.vocab, token))
            if not attributes & (control | llama.LLAMA_TOKEN_ATTR_USER_DEFINED):
                continue
            text = self.token_text(token)
            if text:  # an empty text matches nowhere
                found.append(SpecialToken(token, text, bool(attributes & control),
                                          bool(attributes & llama.LLAMA_TOKEN_ATTR_LSTRIP),
                                          bool(attributes & llama.LLAMA_TOKEN_ATTR_RSTRIP)))
        # llama.cpp sorts by length only (std::sort); ties keep the id order here.
        return tuple(sorted(found, key=lambda special: (-len(special.text.encode()), special.id)))

    def tokenize_fragments(self, fragments: Sequence[str | int], add_bos: bool = True) -> list[int]:
        """Tokens of text whose special tokens are already split out: token ids as given, raw
        text tokenized without special parsing, each piece as llama.cpp tokenizes the pieces it
        splits a text into (SentencePiece's space prefix included: every raw piece starts the
        text or follows a special token). BOS and EOS where the vocabulary adds them and
        ``add_bos``, as :meth:`tokenize` does."""
        tokens: list[int] = []
        pending = ""  # neighbouring raw pieces are one piece to llama.cpp
        for fragment in fragments:
            if isinstance(fragment, str):
                pending += fragment
                continue
            tokens += self._raw_tokens(pending)
            pending = ""
            tokens.append(fragment)
        tokens += self._raw_tokens(pending)
        special = self.special_tokens()
        if add_bos and llama.llama_vocab_get_add_bos(self.vocab):
            tokens.insert(0, special["bos"])
        if add_bos and llama.llama_vocab_get_add_eos(self.vocab):
            tokens.append(special["eos"])
        return tokens

    def _raw_tokens(self, text: str) -> list[int]:
        return self.tokenize(text, special=False, add_bos=False) if text else []

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            size = llama.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
            if size < 0:
                buffer = ctypes.create_string_buffer(-size)
                size = llama.llama_token_to_piece(self.vocab, token, buffer, -size, 0, False)
            piece = buffer.raw[:size]
            self._pieces[token] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama.llama_vocab_is_eog(self.vocab, token))
        return eog

    def metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(4096)
        size = llama.llama_model_meta_val_str(self.model, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", errors="replace") if size >= 0 else None

    def chat_template(self) -> str | None:
        template = llama.llama_model_chat_template(self.model, None)
        return template.decode("utf-8", errors="replace") if template else None

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary spells it (control tokens included)."""
        text = llama.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def special_tokens(self) -> dict[str, int]:
        """BOS and EOS ids (-1 where the model has none)."""
        return {"bos": int(llama.llama_vocab_bos(self.vocab)), "eos": int(llama.llama_vocab_eos(self.vocab))}

    def describe(self) -> dict[str, object]:
        """What ``ps-local info`` shows."""
        buffer = ctypes.create_string_buffer(256)
        llama.llama_model_desc(self.model, buffer, len(buffer))
        special = self.special_tokens()
        description = buffer.value.decode("utf-8", errors="replace")  # "gemma3 270M Q4_K - Medium"
        return {
            "file": str(self.path),
            "architecture": self.metadata("general.architecture"),
            "name": self.metadata("general.name"),
            "parameters": int(llama.llama_model_n_params(self.model)),
            "quantization": description.split(" ", 2)[2] if description.count(" ") >= 2 else description,
            "context_length": self.n_ctx_train,
            "vocabulary_size": self.n_vocab,
            "bos": {"id": special["bos"], "text": self.token_text(special["bos"])} if special["bos"] >= 0 else None,
            "eos": {"id": special["eos"], "text": self.token_text(special["eos"])} if special["eos"] >= 0 else None,
            "adds_bos": bool(llama.llama_vocab_get_add_bos(self.vocab)),
            "chat_template": self.chat_template() is not None,
        }

    # -- the KV cache --------------------------------------------------------------------

    def allocate(self, n_ctx: int, n_slots: int, cache_type: str = "f16") -> None:
        """Create the context: ``n_ctx`` KV cells shared by ``n_slots`` sequences, stored as
        ``cache_type`` (f16 or q8_0)."""
        self.close_context()
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = min(n_ctx, 2048)
        params.n_ubatch = min(n_ctx, 512)
        params.n_seq_max = n_slots
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.kv_unified = True  # partial seq_cp between sequences needs one shared cache
        params.swa_full = True  # sliding-window layers must keep every cell for seq_rm of a suffix
        params.no_perf = True
        params.type_k = params.type_v = CACHE_GGML_TYPES[cache_type]
        if cache_type != "f16":
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED  # a quantized V cache needs it
        _log_lines.clear()
        ctx = llama.llama_init_from_model(self.model, params)
        if not ctx:
            raise EngineError(f"cannot create a context of {n_ctx} tokens: {_first_error() or 'out of memory?'}")
        self.ctx = ctx
        self.memory = llama.llama_get_memory(ctx)
        self.n_ctx = int(llama.llama_n_ctx(ctx))
        self.n_batch = int(params.n_batch)
        self._lengths = [0] * n_slots
        # A batch entry may carry every sequence (SMC particles with one prefix share entries).
        self._batch = llama.llama_batch_init(self.n_batch, 0, n_slots)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def reset(self) -> None:
        llama.llama_memory_clear(self.memory, True)
        self._lengths = [0] * len(self._lengths)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        if length > self._lengths[src]:
            raise EngineError(f"slot {src} holds {self._lengths[src]} positions, cannot copy {length}")
        llama.llama_memory_seq_rm(self.memory, dst, -1, -1)
        if length > 0:
            llama.llama_memory_seq_cp(self.memory, src, dst, 0, length)
        self._lengths[dst] = length

    def decode(self, requests: Sequence[DecodeRequest]) -> np.ndarray:
        """Evaluate all requests in as few ``llama_decode`` calls as the batch size allows."""
        if self.ctx is None:
            raise EngineError("no context: call allocate() first")
        rows = np.empty((len(requests), self.n_vocab), dtype=np.float32)
        batch = self._batch
        pending: list[tuple[int, int]] = []  # (row, index in batch) whose logits this batch yields
        used = 0
        for row, (slot, tokens) in enumerate(requests):
            if not tokens:
                raise EngineError("decode needs at least one token")
            slots = slot if isinstance(slot, tuple) else (slot,)
            position = self._lengths[slots[0]]
            if len(set(slots)) != len(slots) or any(self._lengths[s] != position for s in slots):
                raise EngineError(f"slots {slots} cannot share a decode: each must appear once, all holding one "
                                  f"length (they hold {[self._lengths[s] for s in slots]} positions)")
            for offset, token in enumerate(tokens):
                if used == self.n_batch:
                    self._run(used, pending, rows)
                    pending, used = [], 0
                batch.token[used] = token
                batch.pos[used] = position + offset
                batch.n_seq_id[used] = len(slots)
                for number, sequence in enumerate(slots):
                    batch.seq_id[used][number] = sequence
                last = offset == len(tokens) - 1
                batch.logits[used] = last
                if last:
                    pending.append((row, used))
                used += 1
            for sequence in slots:
                self._lengths[sequence] += len(tokens)
        if used:
            self._run(used, pending, rows)
        return rows

    def _run(self, used: int, pending: list[tuple[int, int]], rows: np.ndarray) -> None:
        self._batch.n_tokens = used
        status = llama.llama_decode(self.ctx, self._batch)
        if status != 0:
            detail = "the KV cache is full" if status == 1 else _first_error() or f"status {status}"
            raise EngineError(f"llama_decode failed: {detail}")
        for row, index in pending:
            pointer = llama.llama_get_logits_ith(self.ctx, index)
            rows[row] = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    # -- lifetime ------------------------------------------------------------------------

    def close_context(self) -> None:
        if self.ctx is not None:
            llama.llama_batch_free(self._batch)
            llama.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        self.close_context()
        if self.model:
            llama.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
