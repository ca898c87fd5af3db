"""Model-written programs run here: never inside ps-local, always in a limited child.

Each run gets a fresh temporary folder, a Python interpreter in isolated mode started through
the ``limited.py`` wrapper (CPU time, memory, process count, file size and open files
limited), its own session and process group, a pids cgroup where one can be made
(pids_cgroup.py), and a wall-clock limit. When the run ends, however it ends (normal exit,
time-out, Ctrl-C or SIGTERM of ps-local), the whole process group and everything in its cgroup
is killed and the folder removed.

The process count is bounded by the cgroup where there is one, else by RLIMIT_NPROC, which the
kernel does not apply to root: as root without a writable pids cgroup (a default Docker
container), nothing in ps-local bounds it (``process_limit()`` says so and eval warns), so give
the container a ``--pids-limit``. Without a cgroup, a program that starts a new session
(``setsid``) leaves the process group and outlives the kill, bound only by its own CPU limit (a
sleeping one can stay). Memory is limited per process, not in total (at most ``processes``
times the limit). Many files each under the size limit can still fill a disk within the time
limit; the network is open; a kernel exploit is out of scope. Run evaluations of untrusted
models in a container or VM (see the README).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import pids_cgroup

WRAPPER = Path(__file__).resolve().with_name("limited.py")


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # address space
    processes: int = 16  # beyond what the sandbox's user already runs
    file_bytes: int = 16 << 20  # largest file it may write


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None: killed at the wall-clock limit
    stdout: bytes

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_python(program: str, limits: Limits = Limits(), stdin: bytes = b"") -> RunResult:
    """Run ``program`` (Python source) in the sandbox; its stdout is returned (stderr dropped)."""
    workdir = Path(tempfile.mkdtemp(prefix="ps-local-exec-"))
    process: subprocess.Popen[bytes] | None = None
    cgroup: pids_cgroup.PidsCgroup | None = None
    try:
        cgroup = pids_cgroup.create(limits.processes + 1)  # the program and its processes
        script = workdir / "program.py"
        script.write_text(program, encoding="utf-8")
        command = [
            sys.executable, "-I", str(WRAPPER),
            str(limits.cpu_s), str(limits.memory_bytes), str(limits.processes), str(limits.file_bytes),
            str(cgroup.join_file) if cgroup is not None else "-", "--",
            sys.executable, "-I", str(script),
        ]
        (workdir / "stdin").write_bytes(stdin)
        # Files, not pipes: a child the program leaves behind would hold a pipe open and
        # make ps-local wait for it; with files, the run ends when the program does.
        with (workdir / "stdin").open("rb") as given, (workdir / "stdout").open("wb") as taken:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                stdin=given,
                stdout=taken,
                stderr=subprocess.DEVNULL,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), "TMPDIR": str(workdir)},
                start_new_session=True,  # its own process group, set up by subprocess's C code
            )
        try:
            process.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            return RunResult(None, b"")
        return RunResult(process.returncode, (workdir / "stdout").read_bytes())
    finally:
        if process is not None:
            _kill_group(process)
        if cgroup is not None:
            cgroup.destroy()  # also the processes that left the group with setsid
        shutil.rmtree(workdir, ignore_errors=True)


def process_limit() -> str | None:
    """What bounds a sandboxed program's process count here, or None when nothing does."""
    if pids_cgroup.available():
        return "a pids cgroup"
    if os.geteuid() != 0:
        return "RLIMIT_NPROC"
    return None


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill everything left in the run's process group, also after a normal exit (a program
    may leave a child behind), then reap the leader."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
