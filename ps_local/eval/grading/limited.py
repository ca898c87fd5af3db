"""Run a command under resource limits: the wrapper program of ps-local's sandbox.

ps-local starts this file as a fresh, single-threaded interpreter (never ``preexec_fn`` in
ps-local's own process, whose llama.cpp threads make forking and running Python unsafe). It
joins the run's cgroup, sets its limits, cuts the network, then replaces itself with the
command:

    python -I limited.py cpu=SECONDS memory=BYTES processes=N file=BYTES [join=CGROUP_PROCS ...]
                         [network=open|namespace|bwrap:PATH] -- COMMAND...

``join`` names the ``cgroup.procs`` file of each folder of the run's cgroup (one per cgroup v1
hierarchy, one on v2). ``network=namespace`` runs the command in a new network namespace, which
has only a loopback interface, down: directly where the process may (root, CAP_SYS_ADMIN), else
inside a new user namespace in which it keeps its uid and gid (where the kernel lets normal users
make one). ``network=bwrap:PATH`` has bubblewrap at PATH do it (``--unshare-net``; its loopback
is up, with nothing listening). When the asked-for isolation fails, the command does not run.

``python -I limited.py probe-network`` tries ``network=namespace`` and says what it took.

Only the standard library, no ps_local import: it must start fast and run in ``-I`` mode.
"""

from __future__ import annotations

import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
USAGE = ("usage: limited.py cpu=SECONDS memory=BYTES processes=N file=BYTES [join=CGROUP_PROCS ...] "
         "[network=open|namespace|bwrap:PATH] -- COMMAND...")


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


def unshare(flags: int) -> None:
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(flags)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def isolate_network() -> str:
    """Move this process into a new network namespace; say how."""
    try:
        unshare(CLONE_NEWNET)
        return "a network namespace"
    except PermissionError:
        pass  # not root: a user namespace of its own gives it the right to make one
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER | CLONE_NEWNET)
    # The same ids inside as outside (the only mapping a normal user may write).
    for name, text in (("uid_map", f"{uid} {uid} 1\n"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1\n")):
        with open(f"/proc/self/{name}", "w", encoding="ascii") as handle:
            handle.write(text)
    return "a user and network namespace"


def main() -> None:
    if sys.argv[1:] == ["probe-network"]:
        try:
            print(isolate_network())
        except OSError as error:
            sys.exit(f"no network namespace: {error}")
        return
    if "--" not in sys.argv[1:] or sys.argv.index("--") == len(sys.argv) - 1:
        sys.exit(USAGE)
    split = sys.argv.index("--")
    options, command = sys.argv[1:split], sys.argv[split + 1:]
    settings: dict[str, str] = {"network": "open"}
    joins = []
    for option in options:
        name, _, value = option.partition("=")
        if name == "join":
            joins.append(value)
        else:
            settings[name] = value
    try:
        cpu_s, memory, processes, file_size = (int(settings[name]) for name in ("cpu", "memory", "processes", "file"))
    except (KeyError, ValueError):
        sys.exit(USAGE)
    network = settings["network"]
    for join in joins:
        # Joined before anything else runs, so every process the program starts is inside.
        with open(join, "w", encoding="ascii") as cgroup_procs:
            cgroup_procs.write(str(os.getpid()))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))  # a bigger write: SIGXFSZ
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    # The count is per user, so it starts from what the user runs already. (The kernel does
    # not apply it to root: see sandbox.py.) Set before a user namespace is made, which keeps
    # it as the bound on the user's processes outside.
    allowed = user_tasks(os.getuid()) + processes
    resource.setrlimit(resource.RLIMIT_NPROC, (allowed, allowed))
    if network == "namespace":
        try:
            isolate_network()
        except OSError as error:
            sys.exit(f"limited.py: no network namespace, so the command does not run: {error}")
    elif network.startswith("bwrap:"):
        command = [network[len("bwrap:"):], "--dev-bind", "/", "/", "--unshare-net", "--", *command]
    elif network != "open":
        sys.exit(USAGE)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
