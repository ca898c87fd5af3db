"""A loaded model ready to sample: file checks, context sizing, then the sampler."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .engine import EngineError, LlamaEngine
from .errors import UserError
from .gguf_file import check_gguf
from .sampler import ProgressCallback, sample, slots_per_chain
from .settings import DEFAULT_MAX_TOKENS, Sample, SamplingSettings, check_request


@dataclass(frozen=True)
class RuntimeOptions:
    threads: int | None = None  # None: all cores
    ctx: int | None = None  # per-sequence context; None: the model's trained context
    gpu_layers: int = -1  # -1: every layer when the build can offload (Metal, CUDA), else none
    chains_per_batch: int = 8  # chains that advance together in one batched decode
    batch_width: int = 8  # sequences one decode may carry: a lone chain fills it with proposals


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
        check_gguf(path)
        if options.threads is not None and options.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {options.threads}")
        if options.ctx is not None and options.ctx < 1:
            raise UserError(f"--ctx must be a positive integer, got {options.ctx}")
        self.options = options
        try:
            self.engine = LlamaEngine(path, n_threads=options.threads, n_gpu_layers=options.gpu_layers)
        except EngineError as error:
            raise UserError(str(error)) from None
        self._cells = 0
        self._slots = 0

    def tokenize(self, prompt: str, special: bool = False) -> list[int]:
        return self.engine.tokenize(prompt, special=special)

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
        if not prompt_tokens:
            raise UserError("the prompt is empty")
        max_tokens = fit_max_tokens(
            len(prompt_tokens), settings.max_tokens, self.options.ctx, self.engine.n_ctx_train
        )
        settings = replace(settings, max_tokens=max_tokens)
        chains = min(num_samples if chain_indices is None else len(chain_indices), self.options.chains_per_batch)
        round_width = max(1, self.options.batch_width // chains)
        per_chain = slots_per_chain(settings, round_width)
        # Unified cache: the prompt once, then every chain's sequence and proposals.
        cells = len(prompt_tokens) + per_chain * max_tokens * chains + 8
        slots = 1 + per_chain * chains
        if cells > self._cells or slots > self._slots:
            try:
                self.engine.allocate(cells, slots)
            except EngineError as error:
                raise UserError(str(error)) from None
            self._cells, self._slots = cells, slots
        return sample(
            self.engine,
            prompt_tokens,
            settings,
            num_samples=num_samples,
            chains_per_batch=chains,
            max_round_width=round_width,
            progress=progress,
            on_sample=on_sample,
            chain_indices=chain_indices,
        )

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
