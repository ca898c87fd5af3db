"""Evaluation tasks: bad ones fail before any sampling; a problem that cannot run is skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def ps_local(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ps_local.cli", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def write_task(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    "records, grader, fragment",
    [
        ([{"id": "a", "prompt": "yes", "answer": "yes"}, {"id": "a", "prompt": "no", "answer": "no"}], "exact",
         "same id 'a'"),
        ([{"id": "a", "prompt": "yes", "answer": "(unclosed"}], "regex", "not a valid regex"),
        ([{"id": "a", "prompt": "yes", "answer": "yes"}, ["not", "an", "object"]], "exact", "not a JSON object"),
    ],
)
def test_a_bad_task_fails_before_sampling(tiny_gguf, tmp_path, records, grader, fragment):
    task = write_task(tmp_path / "task.jsonl", records)
    out = tmp_path / "out"
    result = ps_local("eval", str(tiny_gguf), str(task), "--grader", grader, "--out", str(out), "--max-tokens", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not list(out.glob("results*.jsonl"))  # nothing sampled


def test_a_problem_that_does_not_fit_is_skipped_not_fatal(tiny_gguf, tmp_path):
    records = [{"id": "short", "prompt": "yes", "answer": "yes"},
               {"id": "long", "prompt": "yes no " * 20, "answer": "yes"},
               {"id": "short2", "prompt": "no", "answer": "no"}]
    task = write_task(tmp_path / "task.jsonl", records)
    out = tmp_path / "out"
    result = ps_local("eval", str(tiny_gguf), str(task), "--methods", "power,standard", "--out", str(out),
                      "--ctx", "16", "--max-tokens", "4", "--mcmc-steps", "2", "--block-size", "4")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    skipped = [line for line in lines if line.get("status") == "skipped"]
    assert {(line["id"], line["method"]) for line in skipped} == {("long", "power"), ("long", "standard")}
    assert "does not fit" in skipped[0]["reason"]
    assert {line["id"] for line in lines if line.get("status") != "skipped"} == {"short", "short2"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["power"]["problems"] == 2 and summary["power"]["skipped"] == 1
    # A rerun finds nothing left to do.
    again = ps_local("eval", str(tiny_gguf), str(task), "--methods", "power,standard", "--out", str(out),
                     "--ctx", "16", "--max-tokens", "4", "--mcmc-steps", "2", "--block-size", "4")
    assert again.returncode == 0 and "skipped (" not in again.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)
