"""MODEL arguments to files: a local .gguf path, or ``default`` for the bundled demo model."""

from __future__ import annotations

from pathlib import Path

from .default_model import default_model_path

DEFAULT_ALIASES = ("default",)


def resolve_model(spec: str) -> Path:
    """The local file a MODEL argument names (the file's checks come later, in Session)."""
    if spec in DEFAULT_ALIASES:
        return default_model_path()
    return Path(spec).expanduser()
