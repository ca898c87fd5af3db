"""Sampler traces: one JSON line per event of a run, for ``ps-local trace`` and your own analysis.

A trace is written only when a sink is given (``--trace FILE``, ``Model.generate(trace=...)``);
without one the samplers skip every event behind one ``is None`` test. Events only read the
samplers' state: no random draw, no decode and no sample depends on whether a trace is written.

Events (every line has ``event`` and ``job``; ``job`` numbers the requests of one trace, each
introduced by its ``header``):

* ``header``: ``format`` (1), ``version`` (ps-local's), ``time``, ``method``, ``seed``,
  ``prompt_tokens``, ``chains`` (the chain indices the request runs), ``settings`` (every sampling
  setting, ``max_tokens`` as fitted to the context), and what the caller adds (``ps-local eval``:
  ``task`` and ``problem``; ``generate_many``: ``prompt_index``).
* ``block`` (power, ppt; a chain's block after its extension, before its MH steps): ``chain``,
  ``block``, ``blocks``, ``end`` (the block's length bound L_k), ``tokens_before`` (generated
  tokens when the block started), ``tokens`` and ``logp`` (after the extension), ``ended`` (eos,
  stop or null), ``tokens_decoded`` (the chain's so far).
* ``mh`` (power, ppt; one per MH step): ``chain``, ``block``, ``step`` (within the block, from
  1), ``mh_step`` (the chain's, from 1), ``m`` (resample index, 1-based: tokens before it kept),
  ``n`` and ``n_proposal`` (lengths of the current sequence and of the proposal), ``logp_current``,
  ``logp_proposal`` (the base model's log p of each whole sequence), ``target_current``,
  ``target_proposal`` (alpha * log p, the log target up to its normalizer; null for alpha = inf),
  ``log_accept`` (log A of the MH ratio, alpha (log p' - log p) - (log q' - log q) over the suffixes
  + log n - log n'; at alpha = inf 0 when the proposal's log p is larger, else null for -inf),
  ``log_u`` (the step's uniform: accepted iff log_u < log_accept), ``early_rejected`` (the proposal
  was abandoned once its rejection was certain: ``n_proposal`` and ``logp_proposal`` then count only
  the tokens it drew, and ``log_accept`` is the bound that fell below ``log_u``), ``accepted``,
  ``moved`` (accepted and a different sequence), ``tokens_decoded`` (the chain's so far).
  PPT adds ``replica`` (its rung, 0 = alpha_1) and ``alpha`` (the rung's) to ``block`` and ``mh``.
* ``swap`` (ppt; a sweep after every ``swap_every`` MH steps of the replicas and after a block's
  last): ``chain``, ``block``, ``sweep`` (within the block, from 1), ``step`` (MH steps each
  replica took in the block before it), ``rungs`` [k, k+1], ``alphas``, ``logp`` (the two
  sequences' log p before the swap), ``log_accept``, ``accepted``.
* ``ladder`` (ppt with ``ladder_warmup``; once per chain, before its first block): ``chain``,
  ``pilot_ladder`` (the ladder the discarded pilot ran), ``ladder`` (the one placed for the real
  run), ``energies`` (each pilot rung's mean -log p over the later half of its sweeps), ``steps``
  (the pilot's MH steps per replica), ``sweeps``, ``pilot_swap_acceptance`` (per adjacent pair),
  ``tokens_decoded`` (the pilot's, all replicas; included in the sample's statistics).
* ``ess`` (smc; every ESS check): ``chain``, ``t`` (token position), ``ess`` (before any
  resampling), ``particles``, ``threshold`` (ESS below it resamples), ``resampled``; the last one
  of a run (the final weights; ``threshold`` null) has ``final: true``, the ``chosen`` particle and
  the final ``log_normalizer``.
* ``resample`` (smc): ``chain``, ``t``, ``ess`` (before), ``counts`` (copies of each particle:
  0 = dropped), ``survivors`` (particles with a copy), ``distinct_ancestors`` (first-generation
  particles with descendants, after), ``log_normalizer`` (estimate of log sum p^alpha so far).
* ``rejuvenate`` (smc with ``--rejuvenate``; one per sweep of MH moves over the particles after
  a resampling): ``chain``, ``t`` (the moves' block end: they target p^alpha over t tokens),
  ``moves``, ``accepted``, ``moved`` (accepted with another sequence), ``particles_changed``
  (particles that ended the sweep on another sequence), ``distinct_before``, ``distinct_after``
  (distinct sequences among the particles), ``tokens_decoded`` (by the sweep's proposals).
* ``sample`` (every method, as a chain ends): ``chain``, ``tokens`` (how many), ``token_ids``,
  ``logp``, ``target`` (alpha * logp; null for alpha = inf), ``stop_reason``, ``text`` and
  ``stats`` (the sample's statistics, as in ``--json``).

Floats that JSON cannot hold (inf, NaN) are null, except alpha = inf in ``settings``, which is
written "inf" as ``--json`` does.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict
from typing import IO, Any, Callable, Union

from . import __version__

TRACE_FORMAT = 1
BUFFER_BYTES = 1 << 20  # events are small; the file is written in large pieces

# One encoder for every line (json.dumps with options builds a new one per call: twice the cost).
_encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode

TraceSink = Union[str, "os.PathLike[str]", IO[str], Callable[[dict], Any], "TraceWriter"]


def finite(value: float) -> float | None:
    """A float JSON can hold: None for inf and NaN."""
    return value if math.isfinite(value) else None


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # alpha = inf in the settings, as --json writes it
    if isinstance(value, tuple):
        return list(value)
    return value


class TraceWriter:
    """Where a trace goes: a path (opened, buffered, closed by ``close``), an open text file
    (written to, flushed, never closed), or a callable that receives each event as a dict.

    One writer may serve several requests (``job`` numbers them); events arrive from the thread
    that steps the scheduler, and a lock keeps lines whole if several threads ever write."""

    def __init__(self, sink: "str | os.PathLike[str] | IO[str] | Callable[[dict], Any]"):
        self._lock = threading.Lock()
        self._jobs = 0
        self._file: IO[str] | None = None
        self._owned = False
        self._call: Callable[[dict], Any] | None = None
        self.closed = False
        if isinstance(sink, (str, os.PathLike)):
            self._file = open(sink, "w", encoding="utf-8", buffering=BUFFER_BYTES)
            self._owned = True
        elif hasattr(sink, "write"):
            self._file = sink  # type: ignore[assignment]
        elif callable(sink):
            self._call = sink
        else:
            raise TypeError(f"trace takes a path, an open text file or a callable, got {type(sink).__name__}")

    def write(self, event: dict) -> None:
        if self.closed:
            return  # a cancelled request's chain, stepped once more after its caller closed the trace
        if self._call is not None:
            self._call(event)
            return
        line = _encode(event) + "\n"
        with self._lock:
            self._file.write(line)  # type: ignore[union-attr]

    def job(self, settings: Any, prompt_tokens: int, chains: list[int], **extra: Any) -> "JobTrace":
        """Start a request's trace with its header line; the JobTrace its samplers write to."""
        with self._lock:
            number = self._jobs
            self._jobs += 1
        self.write({
            "event": "header", "job": number, "format": TRACE_FORMAT, "version": __version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": settings.method, "seed": settings.seed,
            "prompt_tokens": prompt_tokens, "chains": list(chains),
            "settings": {key: _json_value(value) for key, value in asdict(settings).items()},
            **extra,
        })
        return JobTrace(self, number)

    def flush(self) -> None:
        if self._file is not None and not self.closed:
            with self._lock:
                self._file.flush()

    def close(self) -> None:
        """Flush; close the file when the writer opened it."""
        if self.closed:
            return
        self.flush()
        if self._owned and self._file is not None:
            self._file.close()
        self.closed = True

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JobTrace:
    """One request's events. ``owns_writer``: the writer was opened for this request alone and
    is closed when it finishes (a path given to ``Model.generate``)."""

    __slots__ = ("writer", "job", "owns_writer")

    def __init__(self, writer: TraceWriter, job: int, owns_writer: bool = False):
        self.writer = writer
        self.job = job
        self.owns_writer = owns_writer

    def fields(self, **fields: Any) -> dict:
        """The fields every event of one chain (or replica) starts with: ``job``, then these."""
        return {"job": self.job, **fields}

    def emit(self, event: dict) -> None:
        """Write one event (its ``event`` kind, ``job`` and fields)."""
        self.writer.write(event)

    def sample(self, index: int, sample: Any) -> None:
        """The line of a chain's final sample."""
        from .output import stats_record

        stats = sample.stats
        logp = float(sum(sample.logprobs))
        self.emit({"event": "sample", "job": self.job, "chain": index, "tokens": len(sample.tokens), "logp": logp,
                   "target": finite(stats.alpha * logp),
                   "stop_reason": stats.stop_reason, "text": sample.text, "token_ids": list(sample.tokens),
                   "stats": stats_record(stats)})

    def finish(self) -> None:
        """The request is over (done, failed or cancelled): its lines reach the sink."""
        if self.owns_writer:
            self.writer.close()
        else:
            self.writer.flush()


def open_trace(trace: "TraceSink | None") -> tuple[TraceWriter | None, bool]:
    """A writer for what a caller passed as ``trace``, and whether the caller owns (must close) it."""
    if trace is None:
        return None, False
    if isinstance(trace, TraceWriter):
        return trace, False
    return TraceWriter(trace), True


__all__ = ["JobTrace", "TraceSink", "TraceWriter", "finite", "open_trace"]
