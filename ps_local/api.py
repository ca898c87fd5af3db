"""The Python API: ``ps_local.load(MODEL)`` and ``Model.generate``.

    import ps_local

    model = ps_local.load("default", threads=2)
    (sample,) = model.generate("Q: Why is the sky blue? A:", stop=["Q:"], max_tokens=96, block_size=32, seed=0)
    print(sample.text, sample.stats.moved)

The CLI and the server are thin layers over this module. A Model may be used from several
threads at once: their requests share batched decodes (see scheduler.py).
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Callable, Sequence

from .errors import UserError
from .prompts import PromptSettings, prompt_tokens
from .samplers.base import ProgressCallback, TokenCallback
from .scheduler import Job, SampleCallback
from .session import RuntimeOptions, Session
from .settings import DEFAULT_METHOD, Sample, SamplingSettings, check_request
from .trace import TraceSink, open_trace

SETTING_NAMES = frozenset(f.name for f in fields(SamplingSettings))


def load(
    model: str | os.PathLike[str] = "default",
    *,
    threads: int | None = None,
    ctx: int | None = None,
    gpu_layers: int = -1,
    chains_per_batch: int = 8,
    round_width: int | None = None,
    cache_type: str = "f16",
    options: RuntimeOptions | None = None,
) -> "Model":
    """Load a GGUF model for sampling.

    ``model`` is anything ``ps-local generate`` accepts: a path to a ``.gguf`` file,
    ``hf:OWNER/REPO/FILE.gguf``, a name from ``ps-local models``, or ``"default"`` (Gemma 3
    270M base, from the ``demo`` extra). ``threads`` (default: all cores), ``ctx`` (per-sequence
    context, default the model's trained one), ``gpu_layers`` (-1: all that the build can
    offload), ``chains_per_batch`` (chains that run at once), ``round_width`` (proposals per
    chain decoded together) and ``cache_type`` (``f16`` or ``q8_0``) are the CLI's options of
    the same names (or give them all as ``options``). Raises ``UserError`` with a one-line
    reason for a model that cannot load.
    """
    from .models import resolve_model

    if options is None:
        options = RuntimeOptions(threads=threads, ctx=ctx, gpu_layers=gpu_layers, chains_per_batch=chains_per_batch,
                                 round_width=round_width, cache_type=cache_type)
    return Model(Session(resolve_model(str(model)), options))


class Model:
    """A loaded model. ``generate`` draws samples; ``generate_many`` runs many prompts at once."""

    def __init__(self, session: Session):
        self.session = session

    def settings(self, method: str = DEFAULT_METHOD, **settings: Any) -> SamplingSettings:
        """``SamplingSettings`` from keyword arguments (``alpha``, ``max_tokens``, ``stop``, ...);
        UserError for an unknown name or a bad value."""
        unknown = sorted(set(settings) - SETTING_NAMES)
        if unknown:
            raise UserError(f"unknown sampling setting{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        if isinstance(settings.get("stop"), str):
            settings["stop"] = (settings["stop"],)
        elif "stop" in settings:
            settings["stop"] = tuple(settings["stop"] or ())
        if settings.get("ladder") is not None:
            settings["ladder"] = tuple(settings["ladder"])
        return check_request(SamplingSettings(method=method, **settings), 1)

    def tokens(self, prompt: str | Sequence[int], chat: bool = False, system: str | None = None,
               template: str | None = None) -> list[int]:
        """The prompt's tokens: text through the model's tokenizer (and its chat template when
        ``chat``), or token ids as given."""
        if isinstance(prompt, str):
            return prompt_tokens(self.session.engine, prompt, PromptSettings(template, chat, system))
        return [int(token) for token in prompt]

    def submit(
        self,
        prompt: str | Sequence[int],
        *,
        method: str = DEFAULT_METHOD,
        n: int = 1,
        chat: bool = False,
        system: str | None = None,
        progress: ProgressCallback | None = None,
        on_sample: SampleCallback | None = None,
        concurrent_chains: int | None = None,
        settings: SamplingSettings | None = None,
        trace: TraceSink | None = None,
        on_token: TokenCallback | None = None,
        **setting_values: Any,
    ) -> Job:
        """Queue a request without waiting; ``wait`` (or any ``generate``) runs it. The job's
        ``result()`` gives its samples; ``cancel()`` stops it. ``trace`` as in ``generate``."""
        chosen = self._chosen(method, settings, setting_values)
        tokens = self.tokens(prompt, chat, system)
        writer, owned = open_trace(trace)
        try:
            return self.session.submit(tokens, chosen, n, progress, on_sample, concurrent_chains=concurrent_chains,
                                       on_token=on_token, trace=writer, owns_trace=owned)
        except BaseException:
            if owned:
                writer.close()  # type: ignore[union-attr]
            raise

    def wait(self, jobs: Sequence[Job]) -> None:
        """Run until every job has finished (each may have failed or been cancelled)."""
        self.session.run(list(jobs))

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        method: str = DEFAULT_METHOD,
        n: int = 1,
        chat: bool = False,
        system: str | None = None,
        progress: ProgressCallback | None = None,
        on_sample: SampleCallback | None = None,
        settings: SamplingSettings | None = None,
        trace: TraceSink | None = None,
        on_token: TokenCallback | None = None,
        **setting_values: Any,
    ) -> list[Sample]:
        """Draw ``n`` independent samples of one prompt.

        ``method``: ``power`` (block-wise MH on p^alpha), ``smc`` (Power-SMC), ``ppt``
        (parallel power tempering), ``low-temp`` (temperature 1/alpha), ``standard`` or
        ``greedy``. Settings as keywords: ``alpha``, ``max_tokens``, ``block_size``,
        ``mcmc_steps``, ``proposal_temp``, ``particles``, ``ess_threshold``, ``smc_ramp``,
        ``ladder``, ``stop`` (a string or a list),
        ``seed`` (or all of them as one ``settings=SamplingSettings(...)``). ``prompt`` is
        text or token ids. ``chat`` renders the prompt with the GGUF's chat template (``system``: its
        system message). ``progress`` is called as MH steps finish, ``on_sample(i, sample)``
        as each chain ends, ``on_token(i, tokens)`` as a baseline (standard, low-temp, greedy)
        draws each token (a power sample's tokens are not final until its chain ends: its
        progress carries them). Returns the samples in chain order; each has ``text``,
        ``tokens``, ``logprobs`` and ``stats``.

        ``trace``: where the sampler's events go, one JSON object per event (a header, every MH
        step, block, SMC resampling, PPT swap and final sample; see ``ps_local.trace``): a path
        (written, then closed when the request ends), an open text file (JSON lines, flushed),
        a callable (given each event as a dict), or a ``ps_local.trace.TraceWriter`` shared by
        several requests. ``ps-local trace FILE`` summarizes a trace file.
        """
        job = self.submit(prompt, method=method, n=n, chat=chat, system=system, progress=progress,
                          on_sample=on_sample, settings=settings, trace=trace, on_token=on_token,
                          **setting_values)
        self.wait([job])
        return job.result()

    def generate_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        method: str = DEFAULT_METHOD,
        n: int = 1,
        chat: bool = False,
        system: str | None = None,
        on_sample: Callable[[int, int, Sample], None] | None = None,
        settings: SamplingSettings | None = None,
        trace: TraceSink | None = None,
        **setting_values: Any,
    ) -> list[list[Sample]]:
        """``generate`` for many prompts at once: their chains share batched decodes, up to
        ``chains_per_batch`` at a time. ``on_sample(prompt_index, chain, sample)``. A prompt's
        samples do not depend on which others run beside it (exactly so on the numpy toy).
        ``trace`` as in ``generate``: one trace, each prompt a job of its own (its header has
        ``prompt_index``)."""
        if not prompts:
            return []
        chosen = self._chosen(method, settings, setting_values)
        concurrent = min(len(prompts) * n, self.session.options.chains_per_batch)
        tokens = [self.tokens(prompt, chat, system) for prompt in prompts]
        self.session.make_room(sum(map(len, tokens)), [chosen], concurrent)
        writer, owned = open_trace(trace)
        jobs = []
        try:
            for number, prompt in enumerate(tokens):
                callback = None if on_sample is None else (
                    lambda index, sample, number=number: on_sample(number, index, sample))
                jobs.append(self.session.submit(prompt, chosen, n, on_sample=callback, concurrent_chains=concurrent,
                                                trace=writer, trace_info={"prompt_index": number}))
            self.wait(jobs)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        finally:
            if owned:
                writer.close()  # type: ignore[union-attr]
        return [job.result() for job in jobs]

    def _chosen(self, method: str, settings: SamplingSettings | None, values: dict[str, Any]) -> SamplingSettings:
        if settings is None:
            return self.settings(method, **values)
        if values:
            raise UserError(f"give settings either as SamplingSettings or as keywords, not both ({', '.join(values)})")
        return check_request(settings, 1)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
