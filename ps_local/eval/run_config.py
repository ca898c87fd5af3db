"""What produced an evaluation's results: model, task, prompts, sampling settings, the effective
length bound and KV cache type, version.

``ps-local eval`` writes it to ``OUT/run.json`` and stamps every result line with its
fingerprint, so that a rerun with another model or other settings cannot mix its samples
into a folder that holds another configuration's, and ``merge`` can tell runs apart.
The seed is kept beside the fingerprint, not in it: runs that differ only in their seed are
independent samples of the same configuration, and merge into one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UserError
from ..settings import DEFAULT_MAX_TOKENS, SamplingSettings

CONFIG_FILE = "run.json"
_EDGE = 1 << 20  # bytes hashed at each end of a model file: fast for many-GB files


def model_fingerprint(path: Path) -> dict[str, Any]:
    """The model file's path, size and a hash of its first and last MiB (and its size)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_EDGE))
        handle.seek(max(0, size - _EDGE))
        digest.update(handle.read(_EDGE))
    return {"path": str(path.resolve()), "size": size, "sha256_edges": digest.hexdigest()}


def problems_digest(problems: list[Any]) -> str:
    """A hash of the task's problems (ids, prompts, answers): a changed data file shows."""
    digest = hashlib.sha256()
    for problem in problems:
        digest.update(json.dumps([problem.id, problem.prompt, problem.answer, problem.test]).encode())
    return digest.hexdigest()


def effective_max_tokens(settings: SamplingSettings, context: int) -> int | str:
    """What bounds a sample's length: ``--max-tokens`` when given, else the rule the session
    applies per prompt (``--ctx`` or the model's context then decides the length)."""
    if settings.max_tokens is not None:
        return settings.max_tokens
    return f"min({DEFAULT_MAX_TOKENS}, {context} - prompt tokens)"


def run_config(model: Path, task_name: str, grader: str, problems: list[Any], prompt: dict[str, Any],
               settings: SamplingSettings, context: int, cache_type: str) -> dict[str, Any]:
    """Everything that decides the distribution of a folder's samples (seed aside). ``context``
    is the tokens per sequence (``--ctx`` or the model's), ``cache_type`` the KV cache's element
    type, which changes the model's logits."""
    return {
        "ps_local_version": __version__,
        "model": model_fingerprint(model),
        "task": {"name": task_name, "grader": grader, "problems": problems_digest(problems)},
        "prompt": prompt,
        "runtime": {"cache_type": cache_type},
        "settings": {
            "alpha": str(settings.alpha),  # JSON has no inf
            "block_size": settings.block_size,
            "mcmc_steps": settings.mcmc_steps,
            "max_tokens": effective_max_tokens(settings, context),
            "proposal_temp": settings.proposal_temp,
            "stop": list(settings.stop),
            "table_size": settings.table_size,
            "particles": settings.particles,  # smc
            "ess_threshold": settings.ess_threshold,
            "smc_check_every": settings.smc_check_every,
            "smc_ramp": settings.smc_ramp,
            "ladder": list(settings.power_ladder) if 1 < settings.alpha < math.inf else None,  # ppt
            # Switches only tests turn off, each of which changes the target.
            "length_term": settings.length_term,
            "smc_weights": settings.smc_weights,
            "swap_correction": settings.swap_correction,
            # Levers added later: recorded only when set, so that earlier runs keep their fingerprints.
            **{name: getattr(settings, name) for name, unset in LATER_LEVERS.items() if getattr(settings, name) != unset},
        },
        "seed": settings.seed if settings.seed is not None else 0,
    }


# Settings added after runs were first fingerprinted, with the value that means "not used".
LATER_LEVERS = {"smc_rejuvenate": 0, "steps_per_token": 0.0, "swap_every": 1, "ladder_warmup": 0}


def fingerprint(config: dict[str, Any]) -> str:
    """Identifies a configuration up to its seed (and the model file's location)."""
    comparable = {key: value for key, value in config.items() if key != "seed"}
    comparable["model"] = {key: value for key, value in config["model"].items() if key != "path"}
    return hashlib.sha256(json.dumps(comparable, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two configurations, as ``key: old -> new`` (paths left out when
    the file's content is the same)."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "model.path":  # the same content elsewhere is the same model
            found.append(f"{prefix}{key}: {a} -> {b}")
    return found


def claim_folder(out: Path, config: dict[str, Any]) -> None:
    """Record ``config`` in ``out``, or UserError when the folder holds another one's results."""
    path = out / CONFIG_FILE
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"{path} is unreadable; move the folder away or choose another --out") from None
        changed = differences(recorded, config)
        if changed:
            raise UserError(f"{out} holds results of another configuration ({'; '.join(changed[:4])}); "
                            "use another --out, or rerun with the same settings to resume")
        return
    partial = path.with_name(f"{CONFIG_FILE}.partial-{os.getpid()}")
    partial.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def read_config(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
