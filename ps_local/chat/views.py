"""What a terminal shows while an answer is sampled (the seam for a live view of the chain)."""

from __future__ import annotations

from typing import Callable, Protocol, TextIO


from ..live import LiveView
from ..samplers.base import Progress
from ..settings import SamplingSettings


class AnswerView(Protocol):
    """Shows an answer while it is being sampled. ``progress`` is the sampler's progress callback
    (MH steps; the scheduler calls it on the thread that steps, here the main thread). A live
    view of the chain's text plugs in here: a view with one more callback (the sampler's trace
    events, say), which :meth:`ChatSession.answer` hands to ``Model.submit`` beside
    ``progress``."""

    def start(self, settings: SamplingSettings) -> None: ...
    def progress(self, progress: Progress) -> None: ...
    def stop(self) -> None: ...  # called before anything else is printed


class NoView:
    def start(self, settings: SamplingSettings) -> None:
        pass

    def progress(self, progress: Progress) -> None:
        pass

    def stop(self) -> None:
        pass

class LiveAnswerView:
    """The live view (ps_local.live.LiveView) of an answer: the status line and the chain's text,
    dim, until the answer is done; "sampling (method) ..." until the first report."""

    def __init__(self, stream: TextIO, token_bytes: Callable[[int], bytes],
                 hidden: Callable[[int], bool] | None = None):
        self.live = LiveView(stream, token_bytes, hidden=hidden)

    def start(self, settings: SamplingSettings) -> None:
        self.live.start(settings.method, "Ctrl-C stops the answer")

    def progress(self, progress: Progress) -> None:
        self.live.progress(progress)

    def stop(self) -> None:
        self.live.clear()


# -- the conversation ------------------------------------------------------------------------------
