"""HumanEval grading: run a completion against its tests in a separate, limited process.

Model-written code never runs inside ps-local: each check is a fresh Python interpreter in an
empty temporary directory, with a wall-clock limit, a memory limit and no inherited
environment secrets. That contains accidents, not a determined attacker: run untrusted
evaluations in a container.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

TIME_LIMIT_S = 10.0
MEMORY_LIMIT_BYTES = 1 << 30  # 1 GiB of address space


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # passed | failed | timed out


def _limit_resources() -> None:  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.setsid()  # its own process group, so a timeout can end everything it started


def check_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_tests(program: str, time_limit_s: float = TIME_LIMIT_S) -> ExecutionResult:
    with tempfile.TemporaryDirectory(prefix="ps-local-exec-") as workdir:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", program],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            preexec_fn=_limit_resources,
        )
        try:
            code = process.wait(timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            process.wait()
            return ExecutionResult(False, "timed out")
    return ExecutionResult(code == 0, "passed" if code == 0 else "failed")
