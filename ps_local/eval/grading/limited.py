"""Run a command under resource limits: the wrapper program of ps-local's sandbox.

ps-local starts this file as a fresh, single-threaded interpreter (never ``preexec_fn`` in
ps-local's own process, whose llama.cpp threads make forking and running Python unsafe). It
sets its limits, then replaces itself with the command:

    python -I limited.py CPU_SECONDS MEMORY_BYTES PROCESSES FILE_BYTES CGROUP_PROCS -- COMMAND...

CGROUP_PROCS is the ``cgroup.procs`` file of the run's pids cgroup, which it joins first, or
``-`` where there is none.

Only the standard library, no ps_local import: it must start fast and run in ``-I`` mode.
"""

from __future__ import annotations

import os
import resource
import sys


def user_tasks(uid: int) -> int:
    """Threads the user runs now: RLIMIT_NPROC counts them all, not only the sandbox's."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="utf-8", errors="replace") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue  # gone meanwhile
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def main() -> None:
    if len(sys.argv) < 8 or sys.argv[6] != "--":
        sys.exit("usage: limited.py CPU_SECONDS MEMORY_BYTES PROCESSES FILE_BYTES CGROUP_PROCS -- COMMAND...")
    cpu_s, memory, processes, file_size = (int(value) for value in sys.argv[1:5])
    cgroup_procs, command = sys.argv[5], sys.argv[7:]
    if cgroup_procs != "-":
        # Joined before anything else runs, so every process the program starts is inside.
        with open(cgroup_procs, "w", encoding="ascii") as join:
            join.write(str(os.getpid()))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))  # a bigger write: SIGXFSZ
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    # The count is per user, so it starts from what the user runs already. (The kernel does
    # not apply it to root: see sandbox.py.)
    allowed = user_tasks(os.getuid()) + processes
    resource.setrlimit(resource.RLIMIT_NPROC, (allowed, allowed))
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
