"""HumanEval grading: a completion runs against its tests in the sandbox (sandbox.py), never
inside ps-local."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .sandbox import Limits, run_python

TIME_LIMIT_S = 10.0
LIMITS = Limits(wall_s=TIME_LIMIT_S, cpu_s=int(TIME_LIMIT_S), memory_bytes=1 << 30)


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # passed | failed | timed out


def check_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_tests(program: str, time_limit_s: float = TIME_LIMIT_S) -> ExecutionResult:
    limits = replace(LIMITS, wall_s=time_limit_s, cpu_s=max(1, int(time_limit_s)))
    result = run_python(program, limits)
    if result.timed_out:
        return ExecutionResult(False, "timed out")
    return ExecutionResult(result.returncode == 0, "passed" if result.returncode == 0 else "failed")
