"""Model-written programs run here: never inside ps-local, always in a limited child.

Each run gets a fresh temporary folder, a Python interpreter in isolated mode started through
the ``limited.py`` wrapper (CPU time, memory, process count, file size and open files
limited, the network cut), its own session and process group, a cgroup where one can be made
(cgroup.py), and a wall-clock limit. When the run ends, however it ends (normal exit,
time-out, Ctrl-C or SIGTERM of ps-local), the whole process group and everything in its cgroup
is killed and the folder removed; the cgroups of a ps-local that was SIGKILLed are removed by
the next one.

What holds where (``process_limit()``, ``memory_limit()`` and ``network_isolation()`` say it
for this machine):

* processes: bounded by the cgroup's ``pids.max`` where there is a pids cgroup, else by
  RLIMIT_NPROC, which the kernel does not apply to root: as root without a writable pids cgroup
  (a default Docker container), nothing in ps-local bounds it (eval warns), so give the
  container a ``--pids-limit``. Without a cgroup, a program that starts a new session
  (``setsid``) leaves the process group and outlives the kill, bound only by its own CPU limit
  (a sleeping one can stay).
* memory: each process's address space by RLIMIT_AS; the run's total by the cgroup's memory
  limit (the same number, no swap) where there is a memory cgroup, else only per process (at
  most ``processes`` times the limit).
* network: none, in a new network namespace (only a loopback interface) made by limited.py as
  root or, for a normal user, inside a user namespace where the kernel allows unprivileged ones,
  else by bubblewrap (``bwrap``) where it is installed and works; where none of them can, the
  program has the network (``gaps()`` says so, for eval to warn). A run whose namespace cannot
  be made where the probe made one does not run.

Many files each under the size limit can still fill a disk within the time limit; a program run
as root can undo what root can (leave its cgroup, enter another network namespace); a kernel
exploit is out of scope. Run evaluations of untrusted models as a normal user in a container or
VM (see the README).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import cgroup as run_cgroup

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
    cgroup: run_cgroup.RunCgroup | None = None
    try:
        network = _network()
        network_option = network[0] if network is not None else "open"
        # bubblewrap stays as the program's parent: one more process.
        processes = limits.processes + (1 if network_option.startswith("bwrap:") else 0)
        cgroup = run_cgroup.create(processes + 1, limits.memory_bytes)  # the program and its processes
        script = workdir / "program.py"
        script.write_text(program, encoding="utf-8")
        command = [
            sys.executable, "-I", str(WRAPPER),
            f"cpu={limits.cpu_s}", f"memory={limits.memory_bytes}", f"processes={processes}",
            f"file={limits.file_bytes}", f"network={network_option}",
            *(f"join={path}" for path in (cgroup.join_files if cgroup is not None else [])), "--",
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
    if run_cgroup.available("pids"):
        return "a pids cgroup"
    if os.geteuid() != 0:
        return "RLIMIT_NPROC"
    return None


def memory_limit() -> str:
    """What bounds a sandboxed run's memory here: in total, or only each process's."""
    if run_cgroup.available("memory"):
        return "a memory cgroup (the run in total)"
    return "RLIMIT_AS (each process, not in total)"


def network_isolation() -> str | None:
    """What keeps a sandboxed program off the network here, or None when nothing does."""
    network = _network()
    return network[1] if network is not None else None


def gaps() -> list[str]:
    """What the sandbox cannot bound on this machine, for eval to print once at start."""
    found = []
    if process_limit() is None:
        found.append("running as root without a writable pids cgroup, so nothing bounds how many "
                     "processes a graded program starts; run as a normal user or in a container with a pids limit")
    if network_isolation() is None:
        found.append("no network namespace can be made here (not root, no unprivileged user namespaces, "
                     "no working bubblewrap), so graded programs have the network; run in a container "
                     "or VM without one")
    return found


@functools.lru_cache(maxsize=1)
def _network() -> tuple[str, str] | None:
    """How runs are kept off the network, probed once: limited.py's ``network=`` option and
    its description, or None."""
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL, "timeout": 30}
    try:
        probe = subprocess.run([sys.executable, "-I", str(WRAPPER), "probe-network"], **quiet)
        if probe.returncode == 0:
            return "namespace", probe.stdout.decode().strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        try:
            command = [bwrap, "--dev-bind", "/", "/", "--unshare-net", "--", sys.executable, "-I", "-c", ""]
            probe = subprocess.run(command, **quiet)
            if probe.returncode == 0:
                return f"bwrap:{bwrap}", "a network namespace made by bubblewrap"
        except (OSError, subprocess.TimeoutExpired):
            pass
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
