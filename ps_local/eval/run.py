"""`ps-local eval`: methods side by side on a task, streamed to disk, resumable, shardable.

Every (problem, method, sample) becomes one JSON line in ``OUT/results*.jsonl`` as soon as it
is graded. A rerun with the same OUT skips what is there; shards write their own files, and
``merge`` summarizes any set of result directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import UserError
from ..output import method_diagnostics
from ..prompts import PromptSettings, prompt_tokens
from ..scheduler import Job
from ..session import Session
from ..settings import Sample, SamplingSettings
from ..trace import TraceWriter
from .grading.sandbox import gaps
from .run_config import claim_folder, fingerprint, run_config
from .tasks import Problem, Task

RESULTS_GLOB = "results*.jsonl"
SANDBOXED_GRADERS = ("math", "code")  # the ones that run a program
GRADING_WORKERS = 2  # checks mostly wait on their sandboxed process


@dataclass(frozen=True)
class EvalPlan:
    methods: tuple[str, ...]
    num_samples: int
    out: Path
    limit: int | None = None
    shard: tuple[int, int] | None = None  # (I, N), 1 <= I <= N
    chat: bool = False
    system: str | None = None
    grading_workers: int = GRADING_WORKERS  # 0: grade on the sampling thread (for comparison)
    parallel: int = 1  # (problem, method) requests sampled at once, their chains in shared decodes


def parse_shard(text: str) -> tuple[int, int]:
    match = [part.strip() for part in text.split("/")]
    if len(match) != 2 or not all(part.isdigit() for part in match):
        raise UserError(f"--shard takes I/N (for example 2/8), got {text!r}")
    index, count = int(match[0]), int(match[1])
    if not 1 <= index <= count:
        raise UserError(f"--shard {text}: I must be between 1 and N")
    return index, count


def select_problems(task: Task, plan: EvalPlan) -> list[Problem]:
    problems = task.problems[: plan.limit] if plan.limit is not None else task.problems
    if plan.shard is not None:
        index, count = plan.shard
        problems = [p for position, p in enumerate(problems) if position % count == index - 1]
    return problems


def results_file(plan: EvalPlan) -> Path:
    suffix = f".shard-{plan.shard[0]}-of-{plan.shard[1]}" if plan.shard else ""
    return plan.out / f"results{suffix}.jsonl"


def read_results(directories: Iterable[Path]) -> list[dict[str, Any]]:
    """Every result line under the directories, once per (problem, method, sample, run seed):
    shards of one run add up, independent runs with other seeds add their samples. A sample
    drawn after its problem was once skipped (a rerun with more room) replaces the skip."""
    chosen: dict[tuple[str, str, int, Any], dict[str, Any]] = {}
    for directory in directories:
        for path in sorted(Path(directory).glob(RESULTS_GLOB)):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: that sample runs again
                key = (record["id"], record["method"], record["sample"], record.get("run_seed"))
                if key not in chosen or (chosen[key].get("status") == "skipped" and record.get("status") != "skipped"):
                    chosen[key] = record
    return list(chosen.values())


def problem_seed(seed: int, problem_id: str, method: str) -> int:
    """A seed per (problem, method), stable across reruns and shards."""
    digest = hashlib.blake2b(f"{seed}|{problem_id}|{method}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def run_eval(
    session: Session,
    task: Task,
    plan: EvalPlan,
    base: SamplingSettings,
    log: Callable[[str], None],
    trace: TraceWriter | None = None,
) -> list[dict[str, Any]]:
    """Run what is missing of the plan, appending results as they finish; return all results.
    ``trace``: where the sampler events of every (problem, method) go, one job each."""
    plan.out.mkdir(parents=True, exist_ok=True)
    seed = base.seed if base.seed is not None else 0
    stops = tuple(dict.fromkeys(base.stop + task.stops))
    prompt_settings = PromptSettings(task.template, plan.chat, plan.system)
    config = run_config(session.engine.path, task.name, task.grader, task.problems,
                        {"template": task.template, "chat": plan.chat, "system": plan.system},
                        replace(base, seed=seed, stop=stops), session.options.ctx or session.engine.n_ctx_train,
                        session.options.cache_type)
    claim_folder(plan.out, config)  # refuses a folder that holds another configuration's results
    if task.grader in SANDBOXED_GRADERS:
        for gap in gaps():  # what the sandbox cannot bound on this machine
            log(f"warning: {gap}")
    stamp = {"config": fingerprint(config), "run_seed": seed}
    recorded = read_results([plan.out])
    done = {(r["id"], r["method"], r["sample"]) for r in recorded if r.get("status") != "skipped"}
    # A problem skipped before (its prompt did not fit) is tried again; recorded once per reason.
    skipped = {(r["id"], r["method"], r["sample"], r.get("reason")) for r in recorded if r.get("status") == "skipped"}
    problems = select_problems(task, plan)
    prompts = {problem.id: prompt_tokens(session.engine, problem.prompt, prompt_settings) for problem in problems}
    # Room for `parallel` requests at once (the cache grows only while nothing runs).
    concurrent = max(1, min(plan.parallel * plan.num_samples, session.options.chains_per_batch))
    if problems and plan.parallel > 1:
        session.make_room(plan.parallel * max(map(len, prompts.values())),
                          [replace(base, method=method) for method in plan.methods], concurrent)
    in_flight: list[Job] = []
    path = results_file(plan)
    with path.open("a", encoding="utf-8") as out:
        if out.tell() and not _ends_with_newline(path):
            out.write("\n")  # close a line an interruption cut short, so new lines stay whole
        # Grading runs beside the sampling, not on its path (see GradingPool).
        graders = GradingPool(task, out, log, plan.grading_workers)
        try:
            for number, problem in enumerate(problems, start=1):
                tokens = prompts[problem.id]
                for method in plan.methods:
                    missing = [k for k in range(plan.num_samples) if (problem.id, method, k) not in done]
                    if not missing:
                        continue
                    unfit = session.unfit_reason(tokens, replace(base, method=method))
                    if unfit is not None:
                        # One problem that cannot run must not end the evaluation: it is recorded.
                        for index in missing:
                            if (problem.id, method, index, unfit) not in skipped:
                                graders.write({"id": problem.id, "method": method, "sample": index,
                                               "prompt": problem.prompt, "status": "skipped", "reason": unfit,
                                               "correct": False, **stamp})
                        log(f"[{number}/{len(problems)}] {problem.id} {method}: skipped ({unfit})")
                        continue
                    settings = replace(base, method=method, seed=problem_seed(seed, problem.id, method), stop=stops)
                    label = f"[{number}/{len(problems)}] {problem.id} {method}"
                    graders.expect(label, len(missing))

                    def record(index: int, sample: Sample, problem: Problem = problem, method: str = method,
                               settings: SamplingSettings = settings, label: str = label) -> None:
                        graders.submit(label, problem, sample, {
                            "id": problem.id,
                            "method": method,
                            "sample": index,
                            "prompt": problem.prompt,
                            "completion": sample.text,
                            "tokens": sample.tokens,
                            "reference": problem.answer,
                            "tokens_decoded": sample.stats.tokens_decoded,
                            "wall_s": sample.stats.wall_s,
                            "acceptance_rate": sample.stats.acceptance_rate,
                            "moved_rate": sample.stats.moved / sample.stats.mh_steps if sample.stats.mh_steps else None,
                            **method_diagnostics(sample.stats),
                            "seed": settings.seed,
                            **stamp,
                        })

                    in_flight.append(session.submit(tokens, settings, plan.num_samples, on_sample=record,
                                                    chain_indices=missing, concurrent_chains=concurrent, trace=trace,
                                                    trace_info={"task": task.name, "problem": problem.id}))
                    while len(in_flight) >= plan.parallel:
                        in_flight = _wait_for_one(session, in_flight)
                        graders.raise_failure()
            while in_flight:
                in_flight = _wait_for_one(session, in_flight)
            graders.raise_failure()
        except BaseException:
            for job in in_flight:
                job.cancel()
            graders.cancel()
            raise
        graders.finish()
    return read_results([plan.out])


def _wait_for_one(session: Session, in_flight: list[Job]) -> list[Job]:
    """Step until one of the requests has finished (raising its error); those still running."""
    session.run(in_flight, until_any=True)
    running = []
    for job in in_flight:
        if job.done.is_set():
            job.result()  # raises what ended it early
        else:
            running.append(job)
    return running


class GradingPool:
    """Grades samples on worker threads while the next problems sample.

    A check waits on a sandboxed process (up to 10 s for code); on the sampling thread it
    would stall every chain of the batch. Each line is written and fsync'd as soon as its
    grade is known, so results stay streamed and resumable; an interruption loses only
    samples not yet graded, which a rerun samples again.
    """

    def __init__(self, task: Task, out: Any, log: Callable[[str], None], workers: int = GRADING_WORKERS):
        self.task = task
        self.out = out
        self.log = log
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ps-local-grade") if workers else None
        self._lock = threading.Lock()
        self._futures: list[Future[None]] = []
        self._tally: dict[str, list[int]] = {}  # label -> [still to grade, correct, samples]

    def expect(self, label: str, count: int) -> None:
        self._tally[label] = [count, 0, count]

    def submit(self, label: str, problem: Problem, sample: Sample, line: dict[str, Any]) -> None:
        if self._pool is None:
            self._grade(label, problem, sample, line)
        else:
            self._futures.append(self._pool.submit(self._grade, label, problem, sample, line))

    def _grade(self, label: str, problem: Problem, sample: Sample, line: dict[str, Any]) -> None:
        line.update(self.task.verdict(problem, sample.text))
        with self._lock:
            _write(self.out, line)
            tally = self._tally[label]  # under the lock: the graders share it
            tally[0] -= 1
            tally[1] += line["correct"]
            if tally[0] == 0:
                self.log(f"{label}: {tally[1]}/{tally[2]} correct")

    def write(self, line: dict[str, Any]) -> None:
        """A line known without grading (a skipped problem), between the graders' own."""
        with self._lock:
            _write(self.out, line)

    def raise_failure(self) -> None:
        """Re-raise, on the sampling thread, an error a finished grading job met (a full disk...)."""
        for future in self._futures:
            if future.done() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        self._futures = [future for future in self._futures if not future.done()]

    def finish(self) -> None:
        """Wait for every grade."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.raise_failure()

    def cancel(self) -> None:
        """Drop the grades not started; the checks in flight end, and clean up, first."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _write(out: Any, line: dict[str, Any]) -> None:
    out.write(json.dumps(line, ensure_ascii=False) + "\n")
    out.flush()
    os.fsync(out.fileno())  # a Ctrl-C or a crash keeps every finished sample


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
