"""The sandbox's network and memory isolation, and the cgroups a killed ps-local leaves.

Each test checks what this machine allows and skips, saying why, where it cannot make what it
tests (no namespace, no memory cgroup); where it can, it also runs a negative control: the same
program without the isolation, to show the isolation is what stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import FORK_CHILDREN as CHILDREN

from ps_local.eval.grading import cgroup as run_cgroup
from ps_local.eval.grading import sandbox
from ps_local.eval.grading.sandbox import WRAPPER, Limits, run_python

# -- network ---------------------------------------------------------------------------------

CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
    print("connected")
except OSError as error:
    print("refused:", error)
"""


@pytest.fixture
def local_server():
    """A TCP server on loopback only, accepting whatever connects; yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


def _outside(program: str, **popen) -> str:
    done = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, timeout=30, **popen)
    return done.stdout.decode()


def test_a_graded_program_cannot_reach_the_network(local_server):
    if sandbox.network_isolation() is None:
        pytest.skip("no network namespace here (not root, no unprivileged user namespaces, no bubblewrap)")
    program = CONNECT.format(port=local_server)
    assert _outside(program) == "connected\n"  # the server answers outside the sandbox
    assert run_python(program).stdout.startswith(b"refused:")


def test_bubblewrap_cuts_the_network_where_it_is_installed(local_server, monkeypatch):
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap is not installed")
    if subprocess.run([bwrap, "--dev-bind", "/", "/", "--unshare-net", "--", "true"], capture_output=True).returncode:
        pytest.skip("bubblewrap cannot make a network namespace here")
    monkeypatch.setattr(sandbox, "_network", lambda: (f"bwrap:{bwrap}", "bubblewrap"))
    program = CONNECT.format(port=local_server)
    assert _outside(program) == "connected\n"
    assert run_python(program).stdout.startswith(b"refused:")
    if sandbox.process_limit() is not None:
        # bubblewrap stays as the program's parent, outside the allowance: the program's 8.
        made = int(run_python(CHILDREN, Limits(wall_s=20, processes=8)).stdout)
        assert made == 8 if run_cgroup.available("pids") else 1 <= made <= 8


def test_a_program_whose_namespace_cannot_be_made_does_not_run(tmp_path):
    """The probe said namespaces work, but this one fails: the program is not run with the
    network instead."""
    ran = tmp_path / "ran"
    driver = (f"import importlib.util, sys\n"
              f"spec = importlib.util.spec_from_file_location('limited', {str(WRAPPER)!r})\n"
              "limited = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(limited)\n"
              "def refused(flags):\n    raise PermissionError(1, 'Operation not permitted')\n"
              "limited.unshare = refused\n"
              f"sys.argv = ['limited.py', 'cpu=5', 'memory=1000000000', 'processes=4', 'file=1000', "
              f"'network=namespace', '--', 'touch', {str(ran)!r}]\n"
              "limited.main()\n")
    done = subprocess.run([sys.executable, "-I", "-c", driver], capture_output=True, timeout=30)
    assert done.returncode != 0 and b"no network namespace" in done.stderr
    assert not ran.exists()


def test_where_nothing_cuts_the_network_the_sandbox_says_so(monkeypatch):
    monkeypatch.setattr(sandbox, "_network", lambda: None)
    assert sandbox.network_isolation() is None
    assert any("have the network" in gap for gap in sandbox.gaps())


def _as_nobody():
    """An interpreter and Popen arguments that run it as a normal user (uid and gid 65534), for
    the wrapper and the program; skips where there is none (this one may sit under /root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a process as another user")
    as_nobody = {"user": 65534, "group": 65534, "extra_groups": [], "cwd": "/"}
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
        try:
            ran = subprocess.run([python, "-I", str(WRAPPER), "cpu=5", "memory=1000000000", "processes=4",
                                  "file=1000", "--", python, "-I", "-c", ""], capture_output=True, **as_nobody)
        except OSError:
            continue
        if ran.returncode == 0:
            return python, as_nobody
    pytest.skip("no interpreter here that a normal user may run the wrapper with")


def test_a_normal_user_gets_a_network_namespace_inside_a_user_namespace(local_server):
    """Not root: limited.py makes a user namespace (keeping the uid) to make the network one."""
    python, as_nobody = _as_nobody()
    wrapper = [python, "-I", str(WRAPPER)]
    probe = subprocess.run([*wrapper, "probe-network"], capture_output=True, **as_nobody)
    if probe.returncode:
        pytest.skip(f"this kernel does not let a normal user make a user namespace: {probe.stderr.decode().strip()}")
    assert probe.stdout == b"a user and network namespace\n"
    program = CONNECT.format(port=local_server) + "import os\nprint(os.getuid(), os.getgid())\n"
    limits = ["cpu=5", "memory=1000000000", "processes=4", "file=1000"]

    def run(network: str) -> str:
        command = [*wrapper, *limits, f"network={network}", "--", python, "-I", "-c", program]
        return subprocess.run(command, capture_output=True, timeout=30, **as_nobody).stdout.decode()

    assert run("open") == "connected\n65534 65534\n"
    isolated = run("namespace")
    assert isolated.startswith("refused:") and isolated.endswith("\n65534 65534\n")


def test_the_process_limit_still_binds_a_normal_user_in_a_user_namespace():
    """RLIMIT_NPROC is set before the user namespace is made, so it still counts the user's
    processes outside it."""
    python, as_nobody = _as_nobody()
    wrapper = [python, "-I", str(WRAPPER)]
    if subprocess.run([*wrapper, "probe-network"], capture_output=True, **as_nobody).returncode:
        pytest.skip("this kernel does not let a normal user make a user namespace")
    made = {}
    for allowed in (8, 24):
        command = [*wrapper, "cpu=20", "memory=1000000000", f"processes={allowed}", "file=1000", "network=namespace",
                   "--", python, "-I", "-c", CHILDREN]
        # Its children sleep holding the output pipe: read the count, then kill them all.
        run = subprocess.Popen(command, stdout=subprocess.PIPE, start_new_session=True, **as_nobody)
        try:
            made[allowed] = int(run.stdout.readline())
        finally:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            run.stdout.close()
    assert 1 <= made[8] <= 8
    assert made[24] > 8



# -- memory ----------------------------------------------------------------------------------

# Children each well under the per-process limit (RLIMIT_AS), together well above it. Each
# makes itself the OOM killer's first choice, so the parent lives to report.
CHILDREN_ALLOCATING = """
import os, time
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write("1000")
        held = b"x" * (100 << 20)  # written, so resident
        time.sleep(1)
        os._exit(0)
    children.append(pid)
statuses = [os.waitpid(pid, 0)[1] for pid in children]
print(sum(os.WIFSIGNALED(s) and os.WTERMSIG(s) == 9 for s in statuses), sum(s == 0 for s in statuses))
"""


def test_the_memory_limit_binds_the_run_in_total(monkeypatch):
    if not run_cgroup.available("memory"):
        pytest.skip("no writable memory cgroup: memory is limited per process only (documented)")
    limits = Limits(wall_s=30, memory_bytes=256 << 20)
    killed, finished = map(int, run_python(CHILDREN_ALLOCATING, limits).stdout.split())
    assert killed >= 1 and killed + finished == 4  # 4 x 100 MiB do not fit in 256 MiB
    # Negative control: the same run with the cgroup's memory limit left off.
    create = run_cgroup.create
    monkeypatch.setattr(run_cgroup, "create", lambda processes, memory_bytes=None: create(processes, None))
    assert run_python(CHILDREN_ALLOCATING, limits).stdout == b"0 4\n"


# -- stale cgroups ---------------------------------------------------------------------------


def _dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


@pytest.mark.parametrize("owner", ["dead pid", "reused pid", "dead pid, old name"])
def test_the_cgroups_of_a_killed_ps_local_are_removed_at_the_next_start(owner):
    """A ps-local SIGKILLed during a check leaves its run's cgroup folders, with the program
    still running inside. The next ps-local removes them, killing the program, and leaves those
    of a ps-local that still runs."""
    hierarchies = run_cgroup._hierarchies()
    if not hierarchies:
        pytest.skip("no writable cgroup here")
    if owner == "dead pid":
        name = f"ps-local-{_dead_pid()}-123456-0123abcd"
    elif owner == "reused pid":  # the pid now belongs to a process that started at another time
        name = f"ps-local-{os.getppid()}-1-0123abcd"
    else:
        name = f"ps-local-{_dead_pid()}-0123456789ab"
    start = run_cgroup._start_time(os.getpid())
    live = f"ps-local-{os.getpid()}-{start}-fedc4321"  # this process's: it still runs
    sleeper = subprocess.Popen(["sleep", "300"])
    reaped = threading.Thread(target=sleeper.wait)  # reaped as soon as it dies
    reaped.start()
    made = []
    try:
        for hierarchy in hierarchies:
            for folder in (hierarchy.path / name, hierarchy.path / live):
                folder.mkdir()
                made.append(folder)
            (hierarchy.path / name / "cgroup.procs").write_text(str(sleeper.pid))
        run_cgroup._hierarchies.cache_clear()  # as at the start of a new ps-local
        assert run_python("print('ran')").stdout == b"ran\n"
        reaped.join(timeout=10)
        assert sleeper.returncode == -signal.SIGKILL
        for hierarchy in hierarchies:
            assert not (hierarchy.path / name).exists()
            assert (hierarchy.path / live).exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        reaped.join()
        for folder in made:
            if folder.exists():
                run_cgroup.RunCgroup([folder]).destroy()


def test_a_check_left_running_by_a_sigkilled_ps_local_is_killed_at_the_next_start(tmp_path):
    """The real case: ps-local is SIGKILLed during a check, so nothing removes the check's
    cgroup and its program keeps running; the next ps-local's first run removes both."""
    if not run_cgroup._hierarchies():
        pytest.skip("no writable cgroup here")
    started = tmp_path / "started"
    program = f"open({str(started)!r}, 'w').close()\nimport time\ntime.sleep(300)\n"
    driver = ("from ps_local.eval.grading.sandbox import Limits, run_python\n"
              f"run_python({program!r}, Limits(wall_s=300))\n")
    ps_local = subprocess.Popen([sys.executable, "-c", driver])
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the check never started"
    ps_local.kill()
    ps_local.wait()
    left = [hierarchy.path / name for hierarchy in run_cgroup._hierarchies()
            for name in os.listdir(hierarchy.path) if name.startswith(f"ps-local-{ps_local.pid}-")]
    inside = run_cgroup.RunCgroup(left).pids()
    assert left and inside and all(map(_running, inside))  # its folders, the program running inside
    run_cgroup._hierarchies.cache_clear()  # as at the start of a new ps-local
    assert run_python("print('ran')").stdout == b"ran\n"
    assert not any(folder.exists() for folder in left)
    time.sleep(0.2)
    assert [pid for pid in inside if _running(pid)] == []


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (not gone, not a zombie left to its new parent to reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
