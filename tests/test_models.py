"""MODEL resolution, the catalog, `models` / `info`, and prompt building (offline: the hub
is a local cache directory or a patched download)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ps_local import models
from ps_local.default_model import DEFAULT_MODEL_SHA256
from ps_local.engine import LlamaEngine
from ps_local.errors import UserError
from ps_local.prompts import MATH_INSTRUCTION, PromptSettings, prompt_tokens

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub(cache: Path, repo: str, filename: str, source: Path) -> Path:
    """Lay ``source`` out as huggingface-hub's cache holds a downloaded file."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    target = root / "snapshots" / COMMIT / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return target


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ps_local.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def offline(cache: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


# -- the catalog ---------------------------------------------------------------------------


def test_catalog_is_valid_and_covers_the_paper_families():
    catalog = models.load_catalog()
    for name in ("gemma-3-270m", "qwen2.5-math-1.5b", "qwen2.5-math-7b", "qwen2.5-7b",
                 "phi-3.5-mini-instruct", "deepseek-math-7b"):
        assert name in catalog
    assert catalog["gemma-3-270m"].sha256 == DEFAULT_MODEL_SHA256
    assert catalog["gemma-3-270m"].source == "pypi"
    assert all(entry.size > 0 and entry.license and entry.note for entry in catalog.values())


@pytest.mark.parametrize(
    "broken, message",
    [
        ({"file": "x.gguf", "size": 1, "quantization": "Q4", "license": "MIT", "note": "n"}, "no repo"),
        ({"repo": "a/b", "file": "x.bin", "size": 1, "quantization": "Q4", "license": "MIT", "note": "n"}, ".gguf"),
        ({"repo": "a/b", "file": "x.gguf", "size": 1, "license": "MIT", "note": "n"}, "quantization"),
        ({"repo": "a/b", "file": "x.gguf", "size": 1, "quantization": "Q4", "license": "MIT", "note": "n",
          "sha256": "abc"}, "sha256"),
    ],
)
def test_a_broken_catalog_is_refused(tmp_path, broken, message):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"models": {"m": broken}}))
    with pytest.raises(ValueError, match=message):
        models.load_catalog(path)


# -- resolution ----------------------------------------------------------------------------


def test_local_paths_resolve_to_themselves(tiny_gguf):
    assert models.resolve_model(str(tiny_gguf)) == tiny_gguf


def test_unknown_names_are_refused():
    with pytest.raises(UserError, match="unknown model"):
        models.resolve_model("no-such-model")
    with pytest.raises(UserError, match="hf:OWNER/REPO/FILE.gguf"):
        models.resolve_model("hf:owner/only-two")


def test_hub_reference_from_the_offline_cache(tmp_path, tiny_gguf):
    fake_hub(tmp_path / "hub", "someone/tiny-GGUF", "tiny.gguf", tiny_gguf)
    result = run("info", "hf:someone/tiny-GGUF/tiny.gguf", "--json", env=offline(tmp_path / "hub"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["architecture"] == "llama"
    missing = run("info", "hf:someone/other-GGUF/tiny.gguf", env=offline(tmp_path / "hub"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "HF_HUB_OFFLINE" in missing.stderr and missing.stderr.count("\n") == 1


def test_hub_download_errors_become_one_line(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def missing_file(repo_id: str, filename: str) -> str:
        raise EntryNotFoundError(f"{filename} not found")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing_file)
    with pytest.raises(UserError, match="has no file"):
        models.resolve_model("hf:owner/repo/file.gguf")

    downloaded = tmp_path / "file.gguf"
    downloaded.write_bytes(b"GGUF")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: str(downloaded))
    assert models.resolve_model("hf:owner/repo/file.gguf") == downloaded
    # A catalog entry with a pinned sha256 refuses a file that does not match it.
    with pytest.raises(UserError, match="sha256"):
        models.hub_file("owner/repo", "file.gguf", sha256="0" * 64)


def test_catalog_names_pull_and_show_on_disk(tmp_path, tiny_gguf):
    entry = models.load_catalog()["qwen2.5-0.5b-instruct"]
    cached = fake_hub(tmp_path / "hub", entry.repo, entry.file, tiny_gguf)
    env = offline(tmp_path / "hub") | {"PS_LOCAL_CACHE": str(tmp_path / "ps-local")}
    pulled = run("models", "pull", "qwen2.5-0.5b-instruct", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert Path(pulled.stdout.strip()) == cached
    listing = [json.loads(line) for line in run("models", "--json", env=env).stdout.splitlines()]
    on_disk = {row["name"]: row["on_disk"] for row in listing}
    assert on_disk["qwen2.5-0.5b-instruct"] == str(cached)
    assert on_disk["qwen2.5-math-7b"] == ""
    text = run("models", env=env).stdout
    assert "gemma-3-270m (default)" in text and "phi-3.5-mini-instruct" in text


def test_info_of_the_default_model(tmp_path):
    result = run("info", "default", "--json", env={"PS_LOCAL_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    details = json.loads(result.stdout)
    assert details["architecture"] == "gemma3" and details["vocabulary_size"] == 262144
    assert details["context_length"] == 32768 and details["bos"]["text"] == "<bos>"
    assert "Q4_K" in details["quantization"] and details["chat_template"] is False


# -- prompts -------------------------------------------------------------------------------


def test_chat_template_is_applied(chat_gguf):
    result = run("generate", str(chat_gguf), "yes no", "--chat", "--system", "maybe", "--json",
                 "--max-tokens", "4", "--method", "greedy")
    assert result.returncode == 0, result.stderr
    with LlamaEngine(chat_gguf, n_threads=1) as engine:
        expected = engine.tokenize("system: maybe\nuser: yes no\nassistant:", special=True)
        assert engine.chat_template() is not None
    assert json.loads(result.stdout)["prompt_token_ids"] == expected


def test_raw_prompt_and_templates(tiny_gguf):
    with LlamaEngine(tiny_gguf, n_threads=1) as engine:
        raw = prompt_tokens(engine, "yes no", PromptSettings())
        assert raw == engine.tokenize("yes no")
        math = prompt_tokens(engine, "yes no", PromptSettings(template="math"))
        assert math == engine.tokenize("yes no\n" + MATH_INSTRUCTION)
        with pytest.raises(UserError, match="chat template"):
            prompt_tokens(engine, "yes", PromptSettings(chat=True))
        with pytest.raises(UserError, match="--chat"):
            prompt_tokens(engine, "yes", PromptSettings(system="be brief"))
