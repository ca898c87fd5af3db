"""`ps-local eval`: graders, sandboxed HumanEval execution, pass@k, resume, shards, merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import FORK_CHILDREN as CHILDREN

from ps_local.eval.run import read_results
from ps_local.eval.summary import pass_at_k
from ps_local.eval.grading.code import check_program, run_tests
from ps_local.eval.grading.math import are_equivalent, grade, last_boxed

MATH500 = Path(__file__).resolve().parents[2] / "shared" / "data" / "MATH500.json"


def ps_local(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ps_local.cli", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, **kwargs)


# -- graders -------------------------------------------------------------------------------


EQUIVALENT = [
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),
    ("\\dfrac12", "0.5"),
    ("1/3", "\\frac{1}{3}"),
    ("\\frac{2}{4}", "\\frac12"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("[-2, 7)", "[-2,7)"),
    ("5\\text{ cm}", "5"),
    ("90^\\circ", "90"),
    ("x = 4", "4"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("2^{10}", "1024"),
    ("\\text{(C)}", "(C)"),
    ("10\\%", "10"),
]
DIFFERENT = [
    ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("[-2, 7)", "[-2, 7]"),
    ("(1, 2)", "(2, 1)"),
    ("(1, 2)", "(1, 2, 3)"),
    ("x^2", "x^3"),
    ("5\\text{ cm}", "6"),
    (None, "1"),
]


def test_equivalent_and_different_answers():
    """One sandboxed math-verify run grades every pair (a process per pair would cost ~1 s each)."""
    verdicts = are_equivalent(EQUIVALENT + DIFFERENT)
    for (candidate, reference), verdict in zip(EQUIVALENT, verdicts):
        assert verdict, (candidate, reference)
    for (candidate, reference), verdict in zip(DIFFERENT, verdicts[len(EQUIVALENT):]):
        assert not verdict, (candidate, reference)


def test_a_hostile_answer_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    hostile = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    answer, correct = grade(f"so the answer is \\boxed{{{hostile}}}", "1")
    assert answer == hostile and not correct
    assert not are_equivalent([(hostile, "None"), ("exec('1')", "1")])[0]
    assert not marker.exists()


def test_a_power_tower_is_bounded():
    started = time.monotonic()
    assert are_equivalent([("9^{9^{9^{9^{9}}}}", "1"), ("10^{10^{10^{10}}}!", "2")]) == [False, False]
    assert time.monotonic() - started < 120  # the sandbox's limits, not an endless computation


def test_last_boxed_handles_nested_braces():
    text = "First \\boxed{1}, then finally $\\boxed{\\frac{1}{\\sqrt{2}}}$."
    assert last_boxed(text) == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("no box here") is None
    assert last_boxed("cut off \\boxed{\\frac{1}{2") is None


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0


# -- HumanEval execution -------------------------------------------------------------------

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_a_correct_completion_passes():
    assert run_tests(check_program(PROMPT, "    return a + b\n", TEST, "add")).status == "passed"


def test_a_wrong_completion_fails():
    assert run_tests(check_program(PROMPT, "    return a - b\n", TEST, "add")).status == "failed"


def test_a_completion_that_loops_forever_times_out():
    started = time.monotonic()
    result = run_tests(check_program(PROMPT, "    while True:\n        pass\n", TEST, "add"), time_limit_s=2)
    assert result.status == "timed out" and not result.passed
    assert time.monotonic() - started < 30


def test_a_completion_cannot_take_all_memory():
    hog = "    x = bytearray(8 * 1024 ** 3)\n    return a + b\n"
    assert run_tests(check_program(PROMPT, hog, TEST, "add")).status == "failed"


def test_completions_run_outside_the_process(tmp_path):
    marker = tmp_path / "touched"
    completion = f"    import os\n    os.environ['PS_LOCAL_LEAK'] = '1'\n    open({str(marker)!r}, 'w')\n    return a + b\n"
    assert run_tests(check_program(PROMPT, completion, TEST, "add")).passed
    assert "PS_LOCAL_LEAK" not in os.environ and marker.exists()


# -- end to end on the tiny model ----------------------------------------------------------


@pytest.fixture()
def words_task(tmp_path) -> Path:
    path = tmp_path / "words.jsonl"
    path.write_text("".join(json.dumps({"id": f"w{i}", "prompt": "yes no", "answer": "yes"}) + "\n" for i in range(5)))
    return path


FAST = ["--max-tokens", "4", "--block-size", "4", "--mcmc-steps", "2", "--threads", "2", "--seed", "3",
        "--grader", "regex", "-n", "2"]


def lines(directory: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(directory.glob("results*.jsonl"))
            for line in path.read_text().splitlines()]


def test_jsonl_task_end_to_end_and_resume(tiny_gguf, words_task, tmp_path):
    out = tmp_path / "out"
    first = ps_local("eval", str(tiny_gguf), str(words_task), "--methods", "power,standard", "--out", str(out), *FAST)
    assert first.returncode == 0, first.stderr
    records = lines(out)
    assert len(records) == 5 * 2 * 2
    assert {"id", "method", "sample", "prompt", "completion", "tokens", "correct", "tokens_decoded", "wall_s",
            "acceptance_rate"} <= set(records[0])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"power", "standard"} and summary["power"]["problems"] == 5
    assert "pass@2" in first.stdout and (out / "summary.md").exists()
    # Proposals that changed the sequence, beside the acceptance rate (power only).
    assert "| moved |" in first.stdout
    assert 0 <= summary["power"]["mean_moved_rate"] <= summary["power"]["mean_acceptance_rate"] <= 1
    assert summary["standard"]["mean_moved_rate"] is None
    assert all(0 <= r["moved_rate"] <= r["acceptance_rate"] for r in records if r["method"] == "power")
    assert (out / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"

    # Lose the last three results (and leave a half-written line), as an interruption would.
    results = out / "results.jsonl"
    kept = results.read_text().splitlines()[:-3]
    results.write_text("\n".join(kept) + '\n{"id": "w4", "meth')
    again = ps_local("eval", str(tiny_gguf), str(words_task), "--methods", "power,standard", "--out", str(out), *FAST)
    assert again.returncode == 0, again.stderr
    resumed = read_results([results.parent])
    assert len(resumed) == 20 and resumed[: len(kept)] == [json.loads(line) for line in kept]
    assert again.stderr.count("correct") == 2  # only the (problem, method) pairs with missing samples ran
    # The same seeds give the same samples on a rerun.
    assert [essentials(r) for r in sorted_records(resumed)] == [essentials(r) for r in sorted_records(records)]


def essentials(record: dict) -> tuple:
    return record["id"], record["method"], record["sample"], record["tokens"], record["correct"]


def sorted_records(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["id"], r["method"], r["sample"]))


def test_parallel_problems_give_the_same_results(tiny_gguf, words_task, tmp_path):
    """--parallel 3: three problems' chains share decodes; every sample is there, and each is the
    sample the one-at-a-time run draws (seeds are per problem and chain)."""
    runs = {}
    for parallel in ("1", "3"):
        out = tmp_path / f"p{parallel}"
        done = ps_local("eval", str(tiny_gguf), str(words_task), "--methods", "power,standard", "--parallel", parallel,
                        "--out", str(out), *FAST)
        assert done.returncode == 0, done.stderr
        runs[parallel] = sorted_records(lines(out))
    assert len(runs["3"]) == 5 * 2 * 2
    assert [essentials(r) for r in runs["3"]] == [essentials(r) for r in runs["1"]]


def test_shards_and_merge_equal_one_run(tiny_gguf, words_task, tmp_path):
    whole = ps_local("eval", str(tiny_gguf), str(words_task), "--methods", "power", "--out", str(tmp_path / "all"),
                     *FAST)
    assert whole.returncode == 0, whole.stderr
    for index in (1, 2):
        shard = ps_local("eval", str(tiny_gguf), str(words_task), "--methods", "power", "--shard", f"{index}/2",
                         "--out", str(tmp_path / f"s{index}"), *FAST)
        assert shard.returncode == 0, shard.stderr
    assert {r["id"] for r in lines(tmp_path / "s1")} == {"w0", "w2", "w4"}
    merged = ps_local("eval", "merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m"))
    assert merged.returncode == 0, merged.stderr
    merged_summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    whole_summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert merged_summary["power"]["problems"] == 5
    assert merged_summary["power"]["accuracy"] == whole_summary["power"]["accuracy"]
    assert merged_summary["power"]["pass_at_k"] == whole_summary["power"]["pass_at_k"]


def test_ctrl_c_keeps_finished_results(tiny_gguf, tmp_path):
    many = tmp_path / "many.jsonl"  # long enough a run to be interrupted in the middle
    many.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "yes no", "answer": "yes"}) + "\n"
                            for i in range(2000)))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "ps_local.cli", "eval", str(tiny_gguf), str(many), "--methods", "power",
         "--out", str(out), "--max-tokens", "200", "--mcmc-steps", "50", "--block-size", "50", "-n", "1",
         "--grader", "regex"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    results = out / "results.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and read_results([results.parent]):
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    kept = read_results([out])
    assert 1 <= len(kept) < 2000


def test_math500_and_humaneval_run_on_the_tiny_model(tiny_gguf, tmp_path):
    math = ps_local("eval", str(tiny_gguf), "math500", "--data", str(MATH500), "--limit", "2", "--methods",
                    "power,low-temp", "--out", str(tmp_path / "math"), "--max-tokens", "6", "--mcmc-steps", "2")
    assert math.returncode == 0, math.stderr
    records = lines(tmp_path / "math")
    assert len(records) == 4 and records[0]["reference"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert all(r["correct"] is False for r in records)  # the tiny model only says yes and no
    human = ps_local("eval", str(tiny_gguf), "humaneval", "--limit", "1", "--methods", "greedy",
                     "--out", str(tmp_path / "code"), "--max-tokens", "6")
    assert human.returncode == 0, human.stderr
    (record,) = lines(tmp_path / "code")
    assert record["id"] == "HumanEval/0" and record["status"] == "failed"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["nope-task"], "unknown task"),
        (["humaneval", "--methods", "power,magic"], "--methods"),
        (["humaneval", "--shard", "3/2"], "--shard"),
        (["humaneval", "--limit", "0"], "--limit"),
    ],
)
def test_eval_bad_input(tiny_gguf, args, fragment, tmp_path):
    result = ps_local("eval", str(tiny_gguf), *args, "--out", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr


def test_merge_needs_results(tmp_path):
    result = ps_local("eval", "merge", str(tmp_path))
    assert result.returncode == 2 and "no results" in result.stderr


# -- the sandbox ---------------------------------------------------------------------------


def sandbox_processes(marker: str) -> list[str]:
    """Processes whose command line carries ``marker`` (a graded program's own text)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in command:
                found.append(command)
    return found


def exec_folders() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("ps-local-exec-")}


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_stopping_ps_local_during_a_check_leaves_no_process(tmp_path, stop):
    """A spinning completion, with a spinning child of its own, is killed and its folder
    removed when ps-local is stopped (Ctrl-C, or a scheduler's SIGTERM)."""
    started = tmp_path / "started"
    program = f"import os\nopen({str(started)!r}, 'w').close()\nos.fork()\nwhile True: pass\n"
    driver = ("import signal, sys\nfrom ps_local.cli import _terminate\n"
              "signal.signal(signal.SIGTERM, _terminate)\nfrom ps_local.eval.grading.code import run_tests\n"
              f"try:\n    run_tests({program!r}, time_limit_s=120)\n"
              "except BaseException as error:\n    print(type(error).__name__)\n    sys.exit(1)\n")
    before = exec_folders()
    process = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.exists(), "the check never started"
    time.sleep(0.5)
    running = [c for c in sandbox_processes("ps-local-exec-") if "program.py" in c]
    assert len(running) >= 2  # the program and its child: the check can see them
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=30)
    assert stdout.strip() == ("Terminated" if stop == signal.SIGTERM else "KeyboardInterrupt"), stderr
    time.sleep(0.5)
    assert [c for c in sandbox_processes("ps-local-exec-") if "program.py" in c] == []
    assert exec_folders() - before == set()


def test_a_disk_filler_is_stopped_and_cleaned_up():
    filler = "    open('big', 'wb').write(b'x' * (64 << 20))\n    return a + b\n"
    result = run_tests(check_program(PROMPT, filler, TEST, "add"))
    assert result.status == "failed"  # killed at the 16 MiB file-size limit


def test_a_process_that_outlives_its_program_is_killed():
    """A completion that leaves a child running after the checks pass: the group is killed
    after the normal exit too."""
    marker = "ps_local_orphan_marker"
    completion = (f"    import os, subprocess, sys\n    subprocess.Popen([sys.executable, '-c', "
                  f"'import time\\n# {marker}\\ntime.sleep(300)'])\n    return a + b\n")
    assert run_tests(check_program(PROMPT, completion, TEST, "add")).passed
    time.sleep(0.5)
    assert sandbox_processes(marker) == []


def test_math_grading_without_its_verifier_is_refused_at_start(monkeypatch):
    import importlib.util

    from ps_local.errors import UserError
    from ps_local.eval.tasks import load_task

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(UserError, match="math-verify"):
        load_task("math500", MATH500)


def _needs_a_process_limit():
    from ps_local.eval.grading.sandbox import process_limit

    if process_limit() is None:
        pytest.skip("running as root without a writable pids cgroup: nothing here bounds the process count")




def test_the_process_limit_binds():
    """The program may start its allowance of processes and no more; a larger allowance lets it
    start more (the limit, not something else, is what stops it)."""
    from ps_local.eval.grading.sandbox import Limits, run_python

    _needs_a_process_limit()
    made = {n: int(run_python(CHILDREN, Limits(wall_s=20, processes=n)).stdout) for n in (8, 32)}
    assert 1 <= made[8] <= 8
    assert made[32] > 8


def test_a_fork_bomb_is_contained():
    """Every process forks forever: the count stays at the limit while it runs, and nothing
    (processes, folder, cgroup) is left when the check ends."""
    import threading

    from ps_local.eval.grading.sandbox import Limits, run_python

    _needs_a_process_limit()
    marker = "ps_local_fork_bomb_marker"
    bomb = f"# {marker}\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    most, running = [0], threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            most[0] = max(most[0], len([c for c in sandbox_processes("ps-local-exec-") if "program.py" in c]))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    before = exec_folders()
    watcher.start()
    try:
        result = run_python(bomb, Limits(wall_s=3, processes=16))
    finally:
        running.clear()
        watcher.join()
    assert result.timed_out
    assert 2 <= most[0] <= 16 + 1 + 4  # the program, its 16, and slack for RLIMIT_NPROC's other tasks
    time.sleep(0.2)
    assert [c for c in sandbox_processes("ps-local-exec-") if "program.py" in c] == []
    assert exec_folders() - before == set()
    from ps_local.eval.grading import cgroup as run_cgroup

    for hierarchy in run_cgroup._hierarchies():  # its cgroup is gone too
        assert [d for d in os.listdir(hierarchy.path) if d.startswith(f"ps-local-{os.getpid()}-")] == []


def test_a_process_that_leaves_the_group_is_killed_where_there_is_a_cgroup():
    from ps_local.eval.grading import cgroup as run_cgroup
    from ps_local.eval.grading.sandbox import run_python

    if not run_cgroup.available("pids"):
        pytest.skip("no writable pids cgroup: a setsid escapee is bound only by its CPU limit (documented)")
    marker = "ps_local_setsid_marker"
    program = (f"import os, subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
               f"'import time\\n# {marker}\\ntime.sleep(300)'], start_new_session=True)\nprint('left')\n")
    assert run_python(program).stdout == b"left\n"
    time.sleep(0.3)
    assert sandbox_processes(marker) == []


def test_eval_compares_every_sampler_of_p_alpha_and_records_their_settings(tiny_gguf, words_task, tmp_path):
    out = tmp_path / "samplers"
    done = ps_local("eval", str(tiny_gguf), str(words_task), "--methods", "power,smc,ppt,low-temp",
                    "--particles", "4", "--ladder", "1,2,4", "--parallel", "3", "--out", str(out), *FAST)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"power", "smc", "ppt", "low-temp"}
    assert summary["smc"]["problems"] == summary["ppt"]["problems"] == 5
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["particles"] == 4 and settings["ladder"] == [1, 2, 4]
    results = lines(out)
    assert {r["particles"] for r in results if r["method"] == "smc"} == {4}
    assert all(r["ladder"] == [1, 2, 4] and len(r["swap_acceptance"]) == 2 for r in results if r["method"] == "ppt")
    bad = ps_local("eval", str(tiny_gguf), str(words_task), "--methods", "power,ppt", "--ladder", "1,3",
                   "--out", str(tmp_path / "bad"), *FAST)
    assert bad.returncode == 2 and "must end at --alpha 4" in bad.stderr and not (tmp_path / "bad").exists()
