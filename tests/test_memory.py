"""The GGUF metadata reader, the architecture check and the KV cache estimate, the last
against what llama.cpp itself reports when it allocates the same cache."""

from __future__ import annotations

import inspect
import re
import struct
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from ps_local import engine as engine_module
from ps_local import gguf_file
from ps_local.default_model import default_model_path
from ps_local.engine import EngineError, LlamaEngine
from ps_local.errors import UserError
from ps_local.gguf_file import HEADER, StringList, check_architecture, read_metadata
from ps_local.memory import CachePlan, KvShape, check_cache_type, format_bytes, kv_bytes_per_cell, plan_cache



def write_header_only(path: Path, arch: str, **keys: object) -> Path:
    """A GGUF with metadata, one tensor's info and no tensor data: enough for the reader."""
    writer = GGUFWriter(str(path), arch)
    for key, value in keys.items():
        writer.add_key_value(key.replace("ARCH", arch), value, _value_type(value))
    writer.add_tensor_info("token_embd.weight", (4, 4), np.dtype(np.float32), 64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def _value_type(value: object) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    return GGUFValueType.ARRAY


def reference_metadata(path: Path) -> dict[str, object]:
    """The same file through gguf-py's reader, in read_metadata's shapes."""
    result: dict[str, object] = {}
    for name, field in GGUFReader(path).fields.items():
        if name.startswith("GGUF."):
            continue  # the reader's own header pseudo-fields
        value = field.contents()
        if field.types[0] == GGUFValueType.ARRAY and field.types[-1] == GGUFValueType.STRING and len(value) > 64:
            value = StringList(len(value))
        result[name] = value
    return result


def assert_close_metadata(ours: dict[str, object], theirs: dict[str, object]) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        if isinstance(value, list) and value and isinstance(value[0], float):
            np.testing.assert_allclose(value, theirs[key], rtol=1e-6, err_msg=key)
        elif isinstance(value, float):
            assert value == pytest.approx(theirs[key], rel=1e-6), key
        else:
            assert value == theirs[key], key


# -- the reader ------------------------------------------------------------------------------


def test_reads_the_tiny_model_like_gguf_py(tiny_gguf):
    metadata = read_metadata(tiny_gguf)
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 2
    assert metadata["llama.attention.head_count"] == 4
    assert isinstance(metadata["tokenizer.ggml.tokens"], StringList)
    assert metadata["tokenizer.ggml.tokens"].length == len(metadata["tokenizer.ggml.scores"])
    assert_close_metadata(metadata, reference_metadata(tiny_gguf))
    check_architecture(metadata)  # llama branches fine


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_values_split_across_reads(tiny_gguf, monkeypatch, chunk):
    whole = read_metadata(tiny_gguf)
    monkeypatch.setattr(gguf_file, "_CHUNK", chunk)  # every value straddles a refill somewhere
    assert read_metadata(tiny_gguf) == whole


def test_every_value_type_and_version_2(tmp_path):
    path = tmp_path / "types.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 255)
    writer.add_int8("t.i8", -128)
    writer.add_uint16("t.u16", 65535)
    writer.add_int16("t.i16", -32768)
    writer.add_uint32("t.u32", 2**32 - 1)
    writer.add_int32("t.i32", -(2**31))
    writer.add_float32("t.f32", 0.5)
    writer.add_uint64("t.u64", 2**64 - 1)
    writer.add_int64("t.i64", -(2**63))
    writer.add_float64("t.f64", 1 / 3)
    writer.add_bool("t.true", True)
    writer.add_bool("t.false", False)
    writer.add_string("t.string", "naïve ✓")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.25, -1.5])
    writer.add_array("t.strings", ["a", "bc", ""])
    writer.add_array("t.many_strings", [f"s{i}" for i in range(1000)])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_array("t.nested_strings", [["x", "y"], ["z"]])
    writer.add_tensor_info("token_embd.weight", (4, 4), np.dtype(np.float32), 64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    metadata = read_metadata(path)
    expected = {
        "t.u8": 255, "t.i8": -128, "t.u16": 65535, "t.i16": -32768, "t.u32": 2**32 - 1,
        "t.i32": -(2**31), "t.f32": 0.5, "t.u64": 2**64 - 1, "t.i64": -(2**63), "t.f64": 1 / 3,
        "t.true": True, "t.false": False, "t.string": "naïve ✓",
        "t.ints": [1, 2, 3], "t.floats": [0.25, -1.5], "t.strings": ["a", "bc", ""],
        "t.many_strings": StringList(1000), "t.nested": [[1, 2], [3]],
        "t.nested_strings": [["x", "y"], ["z"]],
    }
    assert {key: metadata[key] for key in expected} == expected
    assert metadata["general.architecture"] == "llama"

    # GGUF v2 lays out metadata as v3 does (v3 only added big-endian files).
    v2 = tmp_path / "v2.gguf"
    data = bytearray(path.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")
    v2.write_bytes(bytes(data))
    assert read_metadata(v2) == metadata


def test_empty_arrays_and_strings(tmp_path):
    # GGUFWriter refuses empty arrays and drops empty strings, but the format allows them.
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    body = string("general.architecture") + struct.pack("<I", GGUFValueType.STRING) + string("llama")
    body += string("t.empty") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.FLOAT32, 0)
    body += string("t.blank") + struct.pack("<I", GGUFValueType.STRING) + string("")
    body += string("t.nested") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.ARRAY, 2)
    body += struct.pack("<IQ", GGUFValueType.INT8, 0) + struct.pack("<IQb", GGUFValueType.INT8, 1, -1)
    path = tmp_path / "empty.gguf"
    path.write_bytes(HEADER.pack(b"GGUF", 3, 1, 4) + body)
    assert read_metadata(path) == {
        "general.architecture": "llama", "t.empty": [], "t.blank": "", "t.nested": [[], [-1]],
    }


def test_per_layer_kv_heads(tmp_path):
    path = write_header_only(
        tmp_path / "per-layer.gguf",
        "llama",
        **{
            "ARCH.block_count": 4,
            "ARCH.context_length": 2048,
            "ARCH.embedding_length": 256,
            "ARCH.attention.head_count": 8,
            "ARCH.attention.head_count_kv": [2, 0, 4, 2],
        },
    )
    shape = KvShape.from_metadata(read_metadata(path))
    assert shape == KvShape("llama", (2, 0, 4, 2), key_length=32, value_length=32, context_length=2048)
    assert kv_bytes_per_cell(shape) == (2 + 0 + 4 + 2) * 32 * 2 * 2  # heads × head size × (K, V) × f16


def test_defaults_without_head_count_kv_or_key_length(tmp_path):
    path = write_header_only(
        tmp_path / "mha.gguf",
        "gpt2",
        **{"ARCH.block_count": 3, "ARCH.context_length": 1024, "ARCH.embedding_length": 768,
           "ARCH.attention.head_count": 12},
    )
    assert KvShape.from_metadata(read_metadata(path)) == KvShape("gpt2", (12,) * 3, 64, 64, 1024)


def test_missing_hyperparameters_are_a_user_error(tmp_path):
    path = write_header_only(tmp_path / "bare.gguf", "llama", **{"ARCH.context_length": 1024})
    with pytest.raises(UserError, match="block_count"):
        KvShape.from_metadata(read_metadata(path))


def test_a_large_vocabulary_reads_fast(tmp_path):
    n_vocab = 262_144  # Gemma 3's
    tokens = [f"▁token{i}".encode() for i in range(n_vocab)]

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    # By hand: GGUFWriter takes seconds to write this many strings.
    body = string("general.architecture") + struct.pack("<I", GGUFValueType.STRING) + string("llama")
    body += string("tokenizer.ggml.tokens") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, n_vocab)
    body += b"".join(struct.pack("<Q", len(token)) + token for token in tokens)
    body += string("tokenizer.ggml.scores") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.FLOAT32, n_vocab)
    body += np.linspace(0, -1, n_vocab, dtype="<f4").tobytes()
    path = tmp_path / "vocab.gguf"
    path.write_bytes(HEADER.pack(b"GGUF", 3, 1, 3) + body)
    start = time.perf_counter()
    metadata = read_metadata(path)
    elapsed = time.perf_counter() - start
    assert metadata["tokenizer.ggml.tokens"] == StringList(n_vocab)
    assert metadata["tokenizer.ggml.scores"][-1] == -1.0 and len(metadata["tokenizer.ggml.scores"]) == n_vocab
    assert elapsed < 0.5, f"{elapsed:.2f} s"


def _end_of_metadata(path: Path) -> int:
    fields = GGUFReader(path).fields.values()
    return max(field.offset + sum(part.nbytes for part in field.parts) for field in fields)


def test_truncated_metadata_is_a_one_line_user_error(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    end = _end_of_metadata(tiny_gguf)
    cut = tmp_path / "cut.gguf"
    for keep in [*range(0, HEADER.size + 40), *range(HEADER.size + 40, end, 97), end - 1]:
        cut.write_bytes(data[:keep])
        with pytest.raises(UserError) as error:
            read_metadata(cut)
        message = str(error.value)
        assert "\n" not in message
        assert ("truncated" in message or "not a GGUF" in message), (keep, message)
    cut.write_bytes(data[:end])  # the metadata complete, the tensor infos missing: readable
    assert read_metadata(cut).keys() == read_metadata(tiny_gguf).keys()


def test_corrupt_metadata_is_a_one_line_user_error(tmp_path):
    path = write_header_only(tmp_path / "ok.gguf", "llama", **{"ARCH.block_count": 2})
    data = path.read_bytes()
    # The last key is llama.block_count: its name, then the u32 value type, then the value.
    name = b"llama.block_count"
    type_at = data.index(name) + len(name)
    assert int.from_bytes(data[type_at : type_at + 4], "little") == GGUFValueType.UINT32

    bad_type = tmp_path / "bad-type.gguf"
    bad_type.write_bytes(data[:type_at] + (99).to_bytes(4, "little") + data[type_at + 4 :])
    with pytest.raises(UserError, match=r"corrupt GGUF file \(unknown metadata value type 99 in the value of 'llama.block_count'\)"):
        read_metadata(bad_type)

    length_at = data.index(name) - 8
    huge = tmp_path / "huge-string.gguf"
    huge.write_bytes(data[:length_at] + (2**40).to_bytes(8, "little") + data[length_at + 8 :])
    with pytest.raises(UserError, match="corrupt GGUF file .*longer than the file"):
        read_metadata(huge)


def test_check_gguf_errors_still_come_first(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_metadata(tmp_path / "missing.gguf")
    text = tmp_path / "text.gguf"
    text.write_text("just text\n")
    with pytest.raises(UserError, match="not a GGUF"):
        read_metadata(text)


# -- architectures ---------------------------------------------------------------------------


def test_recurrent_architectures_are_refused(tmp_path):
    path = write_header_only(tmp_path / "mamba.gguf", "mamba", **{"ARCH.block_count": 2, "ARCH.ssm.state_size": 16})
    with pytest.raises(UserError) as error:
        check_architecture(read_metadata(path), str(path))
    assert str(error.value) == (
        f"{path} uses the recurrent architecture 'mamba': llama.cpp cannot branch its state "
        "at a resample index, so ps-local cannot power-sample it"
    )


@pytest.mark.parametrize("arch", ["mamba2", "rwkv7", "jamba", "falcon-h1", "granitehybrid", "nemotron_h",
                                  "plamo2", "lfm2", "qwen3next"])
def test_recurrent_and_hybrid_names(arch):
    with pytest.raises(UserError, match=f"architecture '{arch}'"):
        check_architecture({"general.architecture": arch})


@pytest.mark.parametrize("key", ["ssm.conv_kernel", "wkv.head_size"])
def test_an_unknown_architecture_with_recurrent_keys(key):
    with pytest.raises(UserError, match="recurrent architecture 'future'"):
        check_architecture({"general.architecture": "future", f"future.{key}": 4})


def test_attention_architectures_pass():
    for arch in ["llama", "qwen2", "gemma3", "phi3", "mistral3"]:
        check_architecture({"general.architecture": arch, f"{arch}.block_count": 2})
    with pytest.raises(UserError, match="general.architecture"):
        check_architecture({})


# -- the arithmetic --------------------------------------------------------------------------


QWEN_7B = KvShape("qwen2", (4,) * 28, key_length=128, value_length=128, context_length=4096)


def test_bytes_per_cell():
    assert kv_bytes_per_cell(QWEN_7B, "f16") == 28 * 4 * 128 * 2 * 2  # 56 KiB
    assert kv_bytes_per_cell(QWEN_7B, "q8_0") == 28 * 4 * 128 * 2 // 32 * 34
    with pytest.raises(ValueError, match="q4_0"):
        kv_bytes_per_cell(QWEN_7B, "q4_0")


def test_cache_types_a_model_can_use():
    check_cache_type(QWEN_7B, "f16")
    check_cache_type(QWEN_7B, "q8_0")
    odd = KvShape("x", (4,), key_length=8, value_length=8, context_length=16)  # the tiny model's heads
    check_cache_type(odd, "f16")
    with pytest.raises(UserError, match="--cache-type q8_0 needs attention heads whose size is a multiple of 32"):
        check_cache_type(odd, "q8_0")
    with pytest.raises(UserError, match="q4_0"):
        check_cache_type(QWEN_7B, "q4_0")


def test_plan_matches_the_session_formula():
    plan = plan_cache(QWEN_7B, prompt_tokens=100, max_tokens=3072, chains=1, slots_per_chain=9)
    assert (plan.cells, plan.slots) == (100 + 9 * 3072 + 8, 10)
    assert plan.allocated_cells == 27_904  # 27,756 padded up to a multiple of 256
    assert plan.bytes == plan.allocated_cells * 56 * 1024
    baseline = plan_cache(QWEN_7B, prompt_tokens=100, max_tokens=3072, chains=8, slots_per_chain=1)
    assert (baseline.cells, baseline.slots) == (100 + 8 * 3072 + 8, 9)
    assert CachePlan(6152, 10, 72 * 1024, "f16").describe() == (
        "KV cache: 6,152 cells (6,400 allocated) × 72 KiB = 450 MiB (f16), 10 sequences"
    )
    assert CachePlan(6400, 10, 72 * 1024, "f16").describe() == (
        "KV cache: 6,400 cells × 72 KiB = 450 MiB (f16), 10 sequences"
    )
    unknown = plan_cache(None, prompt_tokens=10, max_tokens=100)
    assert unknown.bytes is None and "size unknown" in unknown.describe()


@pytest.mark.parametrize(
    "count, text",
    [(0, "0 B"), (1023, "1,023 B"), (1024, "1 KiB"), (1536, "1.50 KiB"), (73728, "72 KiB"),
     (int(45.25 * 2**20), "45.2 MiB"), (int(1.4142 * 2**30), "1.41 GiB"), (2**50, "1,024 TiB")],
)
def test_format_bytes(count, text):
    assert format_bytes(count) == text


# -- against llama.cpp -----------------------------------------------------------------------

# "llama_kv_cache: size =   45.00 MiB (  2560 cells,  15 layers,  10/1 seqs), K (f16): ..."
KV_SIZE_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers")


ENGINE_CACHE_TYPES = ["f16", "q8_0"] if "cache_type" in inspect.signature(LlamaEngine.allocate).parameters else ["f16"]


def llama_cpp_kv_report(path: Path, cells: int, slots: int, cache_type: str,
                        monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[float, int, int]], int]:
    """(MiB, cells, layers) of every KV cache llama.cpp allocated (two for sliding-window
    models: one for the SWA layers, one for the rest), and the context it gave."""
    # The engine keeps only the last 50 lines; debug lines about graph inputs push the KV
    # summary out of that window, so listen with a longer one.
    monkeypatch.setattr(engine_module, "_log_lines", deque(maxlen=100_000))
    with LlamaEngine(path, n_threads=2) as engine:
        if cache_type == "f16":
            engine.allocate(cells, slots)
        else:
            engine.allocate(cells, slots, cache_type)  # type: ignore[call-arg]  # older engines lack it
        n_ctx = engine.n_ctx
        lines = list(engine_module._log_lines)
    found = [KV_SIZE_LINE.search(line) for line in lines]
    reports = [(float(m.group(1)), int(m.group(2)), int(m.group(3))) for m in found if m]
    assert reports, "no KV size line in llama.cpp's log:\n" + "".join(lines)
    return reports, n_ctx


def assert_estimate_matches(path: Path, monkeypatch: pytest.MonkeyPatch, cache_type: str, prompt: int,
                            max_tokens: int, chains: int, slots_per_chain: int) -> None:
    shape = KvShape.from_metadata(read_metadata(path))
    plan = plan_cache(shape, prompt, max_tokens, chains, slots_per_chain, cache_type)
    reports, n_ctx = llama_cpp_kv_report(path, plan.cells, plan.slots, cache_type, monkeypatch)
    assert plan.allocated_cells == n_ctx
    assert all(report_cells == n_ctx for _, report_cells, _ in reports)  # swa_full: every cache full size
    assert sum(layers for _, _, layers in reports) == shape.n_layer
    # The log gives MiB to two decimals, once per cache.
    total = sum(mib for mib, _, _ in reports)
    assert total == pytest.approx(plan.bytes / 2**20, abs=0.005 * len(reports) + 1e-9)


def test_estimate_matches_llama_cpp_for_the_tiny_model(tiny_gguf, monkeypatch):
    # Large enough that two decimals of MiB pin the size down to 0.03 %.
    assert_estimate_matches(tiny_gguf, monkeypatch, "f16", prompt=5, max_tokens=3000, chains=3, slots_per_chain=9)
    assert_estimate_matches(tiny_gguf, monkeypatch, "f16", prompt=5, max_tokens=300, chains=3, slots_per_chain=1)


@pytest.mark.skipif("q8_0" not in ENGINE_CACHE_TYPES, reason="the engine allocates f16 caches only")
def test_llama_cpp_also_refuses_q8_0_for_the_tiny_model(tiny_gguf):
    # Its heads are 8 long: not a whole q8_0 block, which check_cache_type says up front.
    with pytest.raises(UserError):
        check_cache_type(KvShape.from_metadata(read_metadata(tiny_gguf)), "q8_0")
    with LlamaEngine(tiny_gguf, n_threads=2) as engine, pytest.raises(EngineError):
        engine.allocate(64, 1, "q8_0")  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return default_model_path(tmp_path_factory.mktemp("cache"))


def test_gemma_reads_fast_and_passes(gemma):
    start = time.perf_counter()
    metadata = read_metadata(gemma)
    elapsed = time.perf_counter() - start
    assert metadata["general.architecture"] == "gemma3"
    assert metadata["tokenizer.ggml.tokens"] == StringList(262_144)
    assert elapsed < 0.5, f"{elapsed:.2f} s"
    check_architecture(metadata)


@pytest.mark.parametrize("cache_type", ENGINE_CACHE_TYPES)
def test_estimate_matches_llama_cpp_for_gemma(gemma, monkeypatch, cache_type):
    # The README's settings: 2,319 cells, past the 512-token sliding window, so the SWA
    # layers' cache would be smaller without swa_full.
    assert_estimate_matches(gemma, monkeypatch, cache_type, prompt=7, max_tokens=256, chains=1, slots_per_chain=9)
