"""The thread that steps the scheduler, and what happens when it dies.

An exception that escapes ``Session.step`` (a sampler bug, a broken engine) would end the
thread and leave every request waiting forever on a job nothing advances. So the worker
catches it: it records the failure, fails every job with it, and tells the server (which
answers 503 from then on and exits non-zero, for a supervisor to restart it: a fresh process
is the only safe way back, since the KV cache and the samplers' state are unknown).
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from typing import Callable

from ..errors import PsLocalError
from ..scheduler import JobCancelled
from ..session import Session


class SchedulerFailed(PsLocalError):
    """The scheduler's thread died; nothing more can run in this process."""


class Worker:
    """Steps ``session``'s scheduler while there is work, on a thread of its own."""

    def __init__(self, session: Session, on_failure: Callable[[SchedulerFailed], None] | None = None):
        self.session = session
        self.on_failure = on_failure  # called on the worker's thread, once
        self.failure: SchedulerFailed | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ps-local-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.session.step():
                    self.session.scheduler.wait_for_work(0.1)
        except BaseException as error:  # noqa: BLE001 - whatever it was, no request may wait on a dead thread
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self.failure = SchedulerFailed(f"the scheduler failed: {type(error).__name__}: {error}")
        if os.environ.get("PS_LOCAL_DEBUG"):  # as the CLI: the traceback only when asked for
            traceback.print_exception(error, file=sys.stderr)
        try:
            self.session.cancel_all(self.failure)
        except Exception:  # noqa: BLE001 - the engine may be broken too; handlers also watch self.failure
            pass
        if self.on_failure is not None:
            self.on_failure(self.failure)

    def stop(self) -> None:
        """Cancel every job left and end the thread (it blocks: call it off the event loop)."""
        self._stop.set()
        self.session.scheduler.wake()
        self._thread.join(timeout=30)
        if self.failure is None:
            self.session.cancel_all(JobCancelled("the server is shutting down"))
