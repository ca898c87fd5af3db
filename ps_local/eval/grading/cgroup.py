"""A cgroup for each sandboxed run: a process limit that also binds root, and a memory limit on
the run as a whole.

RLIMIT_NPROC bounds a normal user's fork bomb, but the kernel exempts root from it, and root is
who runs most containers and CI jobs; a cgroup's ``pids.max`` binds every user. RLIMIT_AS bounds
each process's memory, not their sum; the cgroup's memory limit (``memory.max`` on cgroup v2,
``memory.limit_in_bytes`` on v1) bounds the sum, swap included where swap is accounted
(``memory.swap.max`` 0, ``memory.memsw.limit_in_bytes``): past it the kernel's OOM killer kills
a process of the run. The cgroup also lists every process of the run, including one that left
its process group with ``setsid``, so all of them are killed at the end.

Made only where ps-local may: a writable cgroup v1 ``pids`` or ``memory`` hierarchy, or a
cgroup v2 folder whose children get those controllers (as root on most hosts; delegated subtrees
for normal users). Each controller is used where it can be, the other run without it: without
pids the run relies on RLIMIT_NPROC, without memory on RLIMIT_AS alone. On v1 a run has a
folder in each hierarchy, on v2 one folder.

A run's folders are named ``ps-local-PID-START-…`` after the ps-local process that made them
(its pid and start time). The first time a run cgroup is needed, the folders of a ps-local that
no longer runs (SIGKILLed before it could remove them) are removed, and what still runs in them
is killed.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("pids", "memory")
_PROBE = {"pids": 1, "memory": 64 << 20}
# ps-local-PID-START-HEX; folders from before the start time was added: ps-local-PID-HEX.
_NAME = re.compile(r"^ps-local-(\d+)-(?:(\d+)-)?[0-9a-f]+$")


class RunCgroup:
    """One run's cgroup, a folder in each hierarchy: a process joins it by writing its pid to
    each folder's ``cgroup.procs`` (``join_files``)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    @property
    def join_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in self.paths]

    def pids(self) -> list[int]:
        found: set[int] = set()
        for folder in self._folders():
            try:
                found.update(int(line) for line in (folder / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
        found.discard(0)  # a process outside this pid namespace
        return sorted(found)

    def destroy(self, timeout_s: float = 5.0) -> None:
        """Kill every process in the cgroup and remove its folders. Forks are stopped first (a
        limit below the current count only refuses new processes), so the kill loop ends."""
        for folder in self._folders():
            try:
                (folder / "pids.max").write_text("0")
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        while True:
            folders = self._folders()
            for folder in folders:
                if (folder / "cgroup.kill").exists():  # cgroup v2, Linux 5.14+: all at once
                    try:
                        (folder / "cgroup.kill").write_text("1")
                    except OSError:
                        pass
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for folder in folders:  # the deepest first
                try:
                    folder.rmdir()  # refused while a process (or an unreaped one) is inside
                except OSError:
                    pass
            if not any(path.exists() for path in self.paths) or time.monotonic() >= deadline:
                return
            time.sleep(0.01)

    def _folders(self) -> list[Path]:
        """Each folder with the folders a (root) program made inside it, the deepest first."""
        folders = []
        for path in self.paths:
            for top, _, _ in os.walk(path, topdown=False):
                folders.append(Path(top))
        return folders


def create(processes: int, memory_bytes: int | None = None) -> RunCgroup | None:
    """A new cgroup allowing ``processes`` processes and threads and, where the memory
    controller is available and ``memory_bytes`` is given, that much memory in total; None where
    no cgroup can be made."""
    made = []
    for hierarchy in _hierarchies():
        folder = _make(hierarchy.path)
        if folder is None:
            continue
        limits = {"pids": processes, "memory": memory_bytes}
        if all(limits[c] is None or _limit(folder, hierarchy.version, c, limits[c]) for c in hierarchy.controllers):
            made.append(folder)
        else:
            RunCgroup([folder]).destroy()
    return RunCgroup(made) if made else None


def controllers() -> frozenset[str]:
    """The controllers a run's cgroup gets here (of ``pids`` and ``memory``)."""
    return frozenset(c for hierarchy in _hierarchies() for c in hierarchy.controllers)


def available(controller: str = "pids") -> bool:
    return controller in controllers()


@dataclass(frozen=True)
class _Hierarchy:
    path: Path  # this process's own cgroup there, in which the runs' folders are made
    version: int  # 1 or 2
    controllers: tuple[str, ...]  # of CONTROLLERS, those a folder made here gets


@functools.lru_cache(maxsize=1)
def _hierarchies() -> tuple[_Hierarchy, ...]:
    """Where a run's folders are made, for each controller the first place whose children get
    it (probed once); folders left by a ps-local that no longer runs are removed on the way."""
    found: list[_Hierarchy] = []
    covered: set[str] = set()
    for path, version, offered in _candidates():
        wanted = [c for c in offered if c not in covered]
        if not wanted:
            continue
        probe = _make(path)
        if probe is None:
            continue
        works = tuple(c for c in wanted if _limit(probe, version, c, _PROBE[c]))
        RunCgroup([probe]).destroy()
        if works:
            found.append(_Hierarchy(path, version, works))
            covered.update(works)
    _remove_stale([hierarchy.path for hierarchy in found])
    return tuple(found)


def _candidates() -> list[tuple[Path, int, tuple[str, ...]]]:
    """This process's own cgroup in each mounted hierarchy that may offer pids or memory: the
    folder, the cgroup version, and the controllers it may offer."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    v1: dict[str, tuple[Path, str]] = {}  # controller -> (mount point, root of the mount)
    v2: tuple[Path, str] | None = None
    for line in mounts:
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        kind, options = fields[dash + 1], fields[dash + 3].split(",") if len(fields) > dash + 3 else []
        if kind == "cgroup":
            for controller in CONTROLLERS:
                if controller in options:
                    v1.setdefault(controller, (point, root))
        elif kind == "cgroup2" and v2 is None:
            v2 = (point, root)
    candidates = []
    for line in memberships:
        if line.count(":") < 2:
            continue
        number, names, relative = line.split(":", 2)
        offered = tuple(c for c in CONTROLLERS if c in names.split(",") and c in v1)
        if offered:
            folder = _inside(*v1[offered[0]], relative)
            if folder is not None:
                candidates.append((folder, 1, offered))
        elif v2 is not None and number == "0" and names == "":
            folder = _inside(*v2, relative)
            if folder is not None:
                candidates.append((folder, 2, CONTROLLERS))
    return candidates


def _inside(point: Path, root: str, relative: str) -> Path | None:
    """The folder of cgroup ``relative`` under a mount of the hierarchy's ``root`` folder (a
    container often sees only its own part of the hierarchy)."""
    root, relative = root.rstrip("/"), relative.rstrip("/")
    if relative != root and not relative.startswith(root + "/"):
        return None
    return point / relative[len(root):].lstrip("/")


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _limit(folder: Path, version: int, controller: str, value: int) -> bool:
    """Set ``controller``'s limit on a run's folder; False where the folder lacks the controller."""
    try:
        if controller == "pids":
            (folder / "pids.max").write_text(str(value))
        elif version == 2:
            (folder / "memory.max").write_text(str(value))
            if (folder / "memory.swap.max").exists():
                (folder / "memory.swap.max").write_text("0")
        else:
            (folder / "memory.limit_in_bytes").write_text(str(value))
            if (folder / "memory.memsw.limit_in_bytes").exists():  # swap accounted: none beyond
                (folder / "memory.memsw.limit_in_bytes").write_text(str(value))
        return True
    except OSError:  # missing: no such controller here
        return False


def _make(parent: Path) -> Path | None:
    pid, start = os.getpid(), _start_time(os.getpid())
    child = parent / (f"ps-local-{pid}-{start}-{uuid.uuid4().hex[:8]}" if start is not None
                      else f"ps-local-{pid}-{uuid.uuid4().hex[:12]}")
    try:
        child.mkdir()
    except OSError:
        return None
    return child


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None when it does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _stale(name: str) -> bool:
    """Whether ``name`` is a run's folder whose ps-local no longer runs (its pid is free, or
    taken by a process that started at another time)."""
    match = _NAME.match(name)
    if match is None:
        return False
    pid = int(match.group(1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process
    started = _start_time(pid)
    return match.group(2) is not None and started is not None and started != int(match.group(2))


def _remove_stale(parents: list[Path]) -> None:
    """Remove every run folder left in ``parents`` by a ps-local that no longer runs, killing
    what runs inside (a run's folders in all hierarchies together, pids first)."""
    stale: dict[str, list[Path]] = {}
    for parent in parents:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            if _stale(name) and (parent / name).is_dir():
                stale.setdefault(name, []).append(parent / name)
    for folders in stale.values():
        RunCgroup(folders).destroy()
