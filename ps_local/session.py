"""A loaded model ready to sample: file checks, context sizing, then the sampler."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .engine import EngineError, LlamaEngine
from .errors import UserError
from .gguf_file import check_architecture, read_metadata
from .memory import CACHE_TYPES, CachePlan, KvShape, check_cache_type, format_bytes, kv_bytes_per_cell, plan_cache
from .sampler import ProgressCallback, sample
from .settings import DEFAULT_MAX_TOKENS, Sample, SamplingSettings, check_request


MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: the most sequences (slots) one context holds


@dataclass(frozen=True)
class RuntimeOptions:
    """How a model runs on this machine. None of these changes which samples a seed gives
    (on llama.cpp a different batch can still change floating-point results)."""

    threads: int | None = None  # None: all cores
    ctx: int | None = None  # per-sequence context; None: the model's trained context
    gpu_layers: int = -1  # -1: every layer when the build can offload (Metal, CUDA), else none
    chains_per_batch: int = 8  # chains that advance together in one batched decode
    round_width: int | None = None  # proposals per chain decoded together; None: batch_width // chains
    batch_width: int = 8  # sequences one decode may carry: a lone chain fills it with proposals
    cache_type: str = "f16"  # KV cache element type: f16 or q8_0

    def validate(self) -> None:
        for name, value in (("--threads", self.threads), ("--ctx", self.ctx),
                            ("--chains-per-batch", self.chains_per_batch), ("--round-width", self.round_width)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be a positive integer, got {value}")
        if self.gpu_layers < -1:
            raise UserError(f"--gpu-layers must be -1 (all layers) or a number of layers >= 0, got {self.gpu_layers}")
        if self.cache_type not in CACHE_TYPES:
            raise UserError(f"--cache-type must be one of {', '.join(CACHE_TYPES)}, got {self.cache_type!r}")


@dataclass(frozen=True)
class BatchLayout:
    """How many chains share a batch and how many proposals each decodes together."""

    chains: int
    round_width: int  # 0 for the baselines, which propose nothing


def fit_max_tokens(prompt_tokens: int, requested: int | None, ctx: int | None, n_ctx_train: int) -> int:
    """How many tokens may be generated; UserError when an explicit request cannot fit."""
    limit = ctx if ctx is not None else n_ctx_train
    source = "--ctx" if ctx is not None else "the model's trained context"
    if prompt_tokens >= limit:
        raise UserError(f"the prompt is {prompt_tokens} tokens and does not fit {source} of {limit} tokens")
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, limit - prompt_tokens)
    if prompt_tokens + requested > limit:
        raise UserError(
            f"--max-tokens {requested} plus the {prompt_tokens}-token prompt exceeds {source} of {limit} tokens"
        )
    return requested


class Session:
    """One GGUF model loaded through llama.cpp, reusable across prompts."""

    def __init__(self, model_path: str | os.PathLike[str], options: RuntimeOptions = RuntimeOptions()):
        path = Path(model_path)
        metadata = read_metadata(path)  # checks the file is a readable GGUF first
        options.validate()
        # Refused before llama.cpp loads it: a recurrent state cannot be branched.
        check_architecture(metadata, str(path))
        try:
            self.kv_shape: KvShape | None = KvShape.from_metadata(metadata)
        except UserError:
            self.kv_shape = None  # an architecture the estimate does not know: sizes unknown
        if self.kv_shape is not None:
            check_cache_type(self.kv_shape, options.cache_type)
        self.options = options
        try:
            self.engine = LlamaEngine(path, n_threads=options.threads, n_gpu_layers=options.gpu_layers,
                                      metadata=metadata)
        except EngineError as error:
            raise UserError(str(error)) from None
        if options.ctx is not None and options.ctx > self.engine.n_ctx_train:
            self.engine.close()
            raise UserError(f"--ctx {options.ctx} exceeds the model's trained context of {self.engine.n_ctx_train} tokens")
        self._cells = 0
        self._slots = 0

    def tokenize(self, prompt: str, special: bool = False) -> list[int]:
        return self.engine.tokenize(prompt, special=special)

    def layout(self, settings: SamplingSettings, chains: int) -> BatchLayout:
        """Chains per batch and proposals per round, within llama.cpp's sequence limit."""
        chains = min(chains, self.options.chains_per_batch)
        if not settings.steps_per_block:
            return BatchLayout(min(chains, MAX_SEQUENCES - 1), 0)
        width = self.options.round_width or max(1, self.options.batch_width // chains)
        width = min(width, MAX_SEQUENCES - 2)
        # Slot 0 holds the prompt; each chain takes 1 + width slots.
        return BatchLayout(min(chains, (MAX_SEQUENCES - 1) // (1 + width)), width)

    def plan(self, prompt_tokens: list[int], settings: SamplingSettings, num_samples: int = 1) -> CachePlan:
        """The KV cache a run of these settings allocates (what --dry-run shows)."""
        return self._prepare(prompt_tokens, settings, num_samples)[2]

    def unfit_reason(self, prompt_tokens: list[int], settings: SamplingSettings) -> str | None:
        """Why a request cannot run here (a prompt too long for the context, ...), or None."""
        try:
            self._prepare(prompt_tokens, settings, 1)
        except UserError as error:
            return str(error)
        return None

    def _prepare(
        self, prompt_tokens: list[int], settings: SamplingSettings, chains: int
    ) -> tuple[SamplingSettings, BatchLayout, CachePlan]:
        """The settings with their token budget fitted to the context, the batch layout and
        the cache they need; UserError for a request that cannot run."""
        check_request(settings, chains)
        if not prompt_tokens:
            raise UserError("the prompt is empty")
        max_tokens = fit_max_tokens(len(prompt_tokens), settings.max_tokens, self.options.ctx, self.engine.n_ctx_train)
        layout = self.layout(settings, chains)
        # Unified cache: the prompt once, then every chain's sequence and proposals.
        plan = plan_cache(self.kv_shape, len(prompt_tokens), max_tokens, layout.chains, layout.round_width,
                          self.options.cache_type)
        return replace(settings, max_tokens=max_tokens), layout, plan

    def generate(
        self,
        prompt_tokens: list[int],
        settings: SamplingSettings,
        num_samples: int = 1,
        progress: ProgressCallback | None = None,
        on_sample: Callable[[int, Sample], None] | None = None,
        chain_indices: list[int] | None = None,
    ) -> list[Sample]:
        check_request(settings, num_samples)
        chains = num_samples if chain_indices is None else len(chain_indices)
        settings, layout, plan = self._prepare(prompt_tokens, settings, chains)
        if plan.cells > self._cells or plan.slots > self._slots:
            try:
                self.engine.allocate(plan.cells, plan.slots, self.options.cache_type)
            except EngineError as error:
                raise UserError(f"{error} ({plan.describe()}; lower --max-tokens, --chains-per-batch or "
                                "--round-width, or use --cache-type q8_0)") from None
            self._cells, self._slots = plan.cells, plan.slots
        return sample(
            self.engine,
            prompt_tokens,
            settings,
            num_samples=num_samples,
            chains_per_batch=layout.chains,
            max_round_width=max(1, layout.round_width),
            progress=progress,
            on_sample=on_sample,
            chain_indices=chain_indices,
        )

    def memory_summary(self) -> dict[str, object]:
        """What ``ps-local info`` shows about the KV cache: per token, and for the defaults."""
        if self.kv_shape is None:
            return {"kv_cache": "unknown for this architecture"}
        defaults = SamplingSettings()
        max_tokens = min(defaults.token_budget, self.engine.n_ctx_train - 1)
        layout = self.layout(defaults, 1)
        per_token = {kind: kv_bytes_per_cell(self.kv_shape, kind) for kind in CACHE_TYPES}
        sample = {kind: plan_cache(self.kv_shape, 0, max_tokens, layout.chains, layout.round_width, kind).bytes
                  for kind in CACHE_TYPES}
        return {
            "kv_cache_per_token": ", ".join(f"{format_bytes(size)} ({kind})" for kind, size in per_token.items()),
            "kv_cache_one_power_sample": ", ".join(f"{format_bytes(size or 0)} ({kind})" for kind, size in sample.items())
            + f" at T_max {max_tokens} with {layout.round_width} proposals per round",
            "kv_cache_bytes_per_token": per_token,
        }

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
