"""ps-local: power sampling (p^alpha via block-wise Metropolis-Hastings) on GGUF models.

    import ps_local
    model = ps_local.load("default")
    (sample,) = model.generate("Q: Why is the sky blue? A:", stop="Q:", max_tokens=96, seed=0)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use: the CLI imports this package for its version, and llama.cpp (which
# the API loads) would make `ps-local --help` slow.
_EXPORTS = {
    "load": "api", "Model": "api",
    "Job": "scheduler", "JobCancelled": "scheduler", "sample": "scheduler",
    "Sample": "settings", "SampleStats": "settings", "SamplingSettings": "settings",
    "PsLocalError": "errors", "UserError": "errors", "ModelError": "errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ps_local' has no attribute {name!r}")
