"""A pids cgroup for each sandboxed run: the process limit that also binds root.

RLIMIT_NPROC bounds a normal user's fork bomb, but the kernel exempts root from it, and root is
who runs most containers and CI jobs. A cgroup's ``pids.max`` binds every user, and the cgroup
also lists every process of the run, including one that left its process group with ``setsid``,
so all of them can be killed at the end.

Only where ps-local may create one: a writable cgroup v1 ``pids`` hierarchy, or a cgroup v2
folder whose children get the pids controller (as root on most hosts; delegated subtrees for
normal users). Elsewhere ``create`` returns None and the run relies on RLIMIT_NPROC.
"""

from __future__ import annotations

import functools
import os
import signal
import time
import uuid
from pathlib import Path


class PidsCgroup:
    """One run's cgroup: processes join it by writing their pid to ``cgroup.procs``."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def join_file(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> list[int]:
        try:
            return [int(line) for line in self.join_file.read_text().split()]
        except OSError:
            return []

    def destroy(self, timeout_s: float = 5.0) -> None:
        """Kill every process in the cgroup and remove it. Forks are stopped first (a limit
        below the current count only refuses new processes), so the kill loop ends."""
        try:
            (self.path / "pids.max").write_text("0")
        except OSError:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()  # refused while a process (or an unreaped one) is inside
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)


def create(processes: int) -> PidsCgroup | None:
    """A new cgroup allowing ``processes`` processes and threads, or None where none can be made."""
    parent = _parent()
    if parent is None:
        return None
    made = _make_child(parent, processes)
    return PidsCgroup(made) if made is not None else None


def available() -> bool:
    return _parent() is not None


@functools.lru_cache(maxsize=1)
def _parent() -> Path | None:
    """The first cgroup folder in which a child with a working ``pids.max`` can be made (probed once)."""
    for candidate in _candidates():
        probe = _make_child(candidate, 1)
        if probe is not None:
            PidsCgroup(probe).destroy()
            return candidate
    return None


def _candidates() -> list[Path]:
    """This process's own cgroup in each mounted hierarchy that may offer the pids controller."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    v1_mount = v2_mount = None
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        kind, point, options = fields[2], fields[1], fields[3].split(",")
        if kind == "cgroup" and "pids" in options and v1_mount is None:
            v1_mount = Path(point)
        elif kind == "cgroup2" and v2_mount is None:
            v2_mount = Path(point)
    candidates = []
    for line in memberships:
        number, controllers, relative = line.split(":", 2)
        relative = relative.lstrip("/")
        if v1_mount is not None and "pids" in controllers.split(","):
            candidates.append(v1_mount / relative)
        elif v2_mount is not None and number == "0" and controllers == "":
            candidates.append(v2_mount / relative)
    return candidates


def _make_child(parent: Path, processes: int) -> Path | None:
    child = parent / f"ps-local-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        child.mkdir()
    except OSError:
        return None
    try:
        (child / "pids.max").write_text(str(processes))  # missing: no pids controller here
        return child
    except OSError:
        try:
            child.rmdir()
        except OSError:
            pass
        return None
