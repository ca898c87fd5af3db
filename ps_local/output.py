"""What the CLI writes: JSON lines on stdout, a progress line and summaries on stderr."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from typing import Any, TextIO

from .samplers.base import Progress
from .settings import Sample, SampleStats


def _json_safe(value: Any) -> Any:
    # JSON has no inf/NaN; alpha may be inf (max-swap).
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def stats_record(stats: SampleStats) -> dict[str, Any]:
    """A sample's statistics as JSON-ready values (inf alpha as a string)."""
    return {key: _json_safe(value) for key, value in asdict(stats).items()}


# SampleStats fields only some methods fill in (None for the others).
METHOD_DIAGNOSTICS = ("particles", "resamples", "ess_min", "distinct_ancestors", "distinct_sequences", "log_normalizer",
                      "particle_tokens", "rejuvenations", "ladder", "swap_acceptance")


def method_diagnostics(stats: SampleStats) -> dict[str, Any]:
    """The diagnostics of the method that drew a sample (SMC's ESS, PPT's swaps, ...)."""
    return {name: getattr(stats, name) for name in METHOD_DIAGNOSTICS if getattr(stats, name) is not None}


def sample_record(sample: Sample) -> dict[str, Any]:
    return {
        "text": sample.text,
        "tokens": sample.tokens,
        "logprobs": sample.logprobs,
        "prompt_token_ids": sample.prompt_token_ids,
        "stats": stats_record(sample.stats),
    }


def sample_json(sample: Sample) -> str:
    return json.dumps(sample_record(sample), ensure_ascii=False)


def counted(count: int | None, noun: str) -> str:
    """``1 resampling``, ``4 resamplings``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summary_line(sample: Sample) -> str:
    stats = sample.stats
    parts = [f"[sample {stats.chain}] {stats.method}"]
    if stats.method == "power":
        parts.append(f"alpha={stats.alpha:g} B={stats.block_size} N={stats.mcmc_steps}")
    if stats.method == "ppt":
        ladder = ",".join(f"{alpha:.3g}" for alpha in stats.ladder or [])
        swaps = "/".join(f"{rate:.0%}" for rate in stats.swap_acceptance or [])
        parts.append(f"ladder={ladder} B={stats.block_size} N={stats.mcmc_steps}, swaps accepted {swaps}")
    if stats.method == "smc":
        parts.append(f"alpha={stats.alpha:g} particles={stats.particles}, ESS min {stats.ess_min:.1f}, "
                     f"{counted(stats.resamples, 'resampling')}, "
                     f"{counted(stats.distinct_ancestors, 'distinct ancestor')}")
        if stats.rejuvenations is not None:
            parts.append(f"{stats.rejuvenations} rejuvenations of {stats.mcmc_steps} MH moves per particle")
    parts.append(f"{len(sample.tokens)} tokens ({stats.stop_reason})")
    if stats.method == "smc":
        parts.append(f"{stats.tokens_decoded} decoded for {stats.particle_tokens} particle tokens")
    else:
        parts.append(f"{stats.tokens_decoded} decoded, {stats.tokens_reevaluated} re-evaluated")
    if stats.acceptance_rate is not None:
        # Accepting a proposal that reproduced the current sequence does not move the chain:
        # "moved" is what shows mixing, acceptance alone can read 100% for a chain stuck still.
        whose = " (alpha replica)" if stats.method == "ppt" else ""
        parts.append(f"moved {stats.moved}/{stats.mh_steps} ({stats.moved / stats.mh_steps:.0%}){whose}, "
                     f"accepted {stats.accepted}/{stats.mh_steps}")
    parts.append(f"{stats.wall_s:.1f} s, seed {stats.seed}")
    return ", ".join(parts)


class ProgressLine:
    """One self-overwriting status line, for a terminal."""

    def __init__(self, stream: TextIO, interval_s: float = 0.1):
        self.stream = stream
        self.interval_s = interval_s
        self._last = 0.0
        self._shown = False

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        rate = progress.tokens_decoded / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
        accepted = f"{progress.accepted}/{progress.proposals}" if progress.proposals else "0/0"
        line = (
            f"sample {progress.chain}: block {progress.block}/{progress.blocks}, "
            f"MH step {progress.mh_step}/{progress.mh_steps}, accepted {accepted}, {rate:.1f} tok/s"
        )
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
