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
    # A rerun tries the skipped problem again; it still does not fit, and nothing is added.
    again = ps_local("eval", str(tiny_gguf), str(task), "--methods", "power,standard", "--out", str(out),
                     "--ctx", "16", "--max-tokens", "4", "--mcmc-steps", "2", "--block-size", "4")
    assert again.returncode == 0 and again.stderr.count("skipped (") == 2 and "correct" not in again.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)
    # With room (a larger --ctx, the same explicit --max-tokens: the same configuration), it runs.
    roomy = ps_local("eval", str(tiny_gguf), str(task), "--methods", "power,standard", "--out", str(out),
                     "--ctx", "64", "--max-tokens", "4", "--mcmc-steps", "2", "--block-size", "4")
    assert roomy.returncode == 0, roomy.stderr
    assert roomy.stderr.count("correct") == 2  # only the long problem's two methods were sampled
    summary = json.loads((out / "summary.json").read_text())
    assert summary["power"]["problems"] == 3 and summary["power"]["skipped"] == 0


def test_a_rerun_with_another_effective_length_or_cache_is_refused(tiny_gguf, tmp_path):
    """Without --max-tokens, --ctx sets each sample's length bound: a rerun with another --ctx
    would mix two distributions, so it is refused with what differs."""
    task = write_task(tmp_path / "task.jsonl", [{"id": "a", "prompt": "yes", "answer": "yes"}])
    out = tmp_path / "out"
    common = ["--methods", "standard", "--out", str(out), "--threads", "2", "--seed", "1"]
    first = ps_local("eval", str(tiny_gguf), str(task), "--ctx", "24", *common)
    assert first.returncode == 0, first.stderr
    config = json.loads((out / "run.json").read_text())
    assert config["settings"]["max_tokens"] == "min(3072, 24 - prompt tokens)"
    assert config["runtime"] == {"cache_type": "f16"} and config["task"]["grader"] == "exact"
    other = ps_local("eval", str(tiny_gguf), str(task), "--ctx", "32", *common)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "settings.max_tokens: min(3072, 24 - prompt tokens) -> min(3072, 32 - prompt tokens)" in other.stderr


def test_the_cache_type_is_part_of_the_configuration(tiny_gguf, tmp_path):
    """q8_0 changes the model's logits (the tiny model's heads are too small for it, so this is
    checked on the configuration itself)."""
    from ps_local.eval.run_config import claim_folder, run_config
    from ps_local.eval.tasks import Problem
    from ps_local.errors import UserError
    from ps_local.settings import SamplingSettings

    def config(cache_type: str) -> dict:
        return run_config(tiny_gguf, "t", "exact", [Problem("a", "yes", "yes")], {}, SamplingSettings(seed=1),
                          4096, cache_type)

    claim_folder(tmp_path, config("f16"))
    claim_folder(tmp_path, config("f16"))  # the same: resumes
    with pytest.raises(UserError, match="runtime.cache_type: f16 -> q8_0"):
        claim_folder(tmp_path, config("q8_0"))


# -- a run knows what produced it -------------------------------------------------------------

FAST = ["--max-tokens", "4", "--block-size", "4", "--mcmc-steps", "2", "--threads", "2", "--grader", "regex",
        "-n", "2", "--methods", "power"]


@pytest.fixture()
def words(tmp_path) -> Path:
    return write_task(tmp_path / "words.jsonl", [{"id": f"w{i}", "prompt": "yes no", "answer": "yes"} for i in range(3)])


def results(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines()]


def test_another_model_cannot_use_the_same_folder(tiny_gguf, words, tmp_path):
    from conftest import write_tiny_model

    other = write_tiny_model(tmp_path / "other.gguf", "--seed", "5")
    out = tmp_path / "out"
    first = ps_local("eval", str(tiny_gguf), str(words), "--out", str(out), "--seed", "1", *FAST)
    assert first.returncode == 0, first.stderr
    config = json.loads((out / "run.json").read_text())
    assert config["model"]["size"] == tiny_gguf.stat().st_size and config["settings"]["max_tokens"] == 4
    assert len({line["config"] for line in results(out)}) == 1
    second = ps_local("eval", str(other), str(words), "--out", str(out), "--seed", "1", *FAST)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert "another configuration" in second.stderr and "model.sha256_edges" in second.stderr
    changed = ps_local("eval", str(tiny_gguf), str(words), "--out", str(out), "--seed", "1", *FAST[2:],
                       "--max-tokens", "6")
    assert changed.returncode == 2 and "settings.max_tokens: 4 -> 6" in changed.stderr, changed.stderr
    assert len(results(out)) == 6  # nothing was added by the refused runs


def test_independent_runs_merge_completely_and_other_configurations_do_not(tiny_gguf, words, tmp_path):
    for name, seed in (("a", "1"), ("b", "2")):
        run = ps_local("eval", str(tiny_gguf), str(words), "--out", str(tmp_path / name), "--seed", seed, *FAST)
        assert run.returncode == 0, run.stderr
    merged = ps_local("eval", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m"))
    assert merged.returncode == 0, merged.stderr
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["power"]["samples"] == 12 and "4" in summary["power"]["pass_at_k"]  # 2 runs x 3 x 2
    other = ps_local("eval", str(tiny_gguf), str(words), "--out", str(tmp_path / "c"), "--seed", "1", *FAST,
                     "--alpha", "2")
    assert other.returncode == 0, other.stderr
    refused = ps_local("eval", "merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "m2"))
    assert refused.returncode == 2 and "settings.alpha: 4.0 -> 2.0" in refused.stderr, refused.stderr


def test_grading_runs_beside_the_sampling(tiny_gguf, words, tmp_path):
    """Grades are computed on the grading threads, never on the sampling thread, and every
    sample still gets its line."""
    import threading

    from ps_local.eval.run import EvalPlan, read_results, run_eval
    from ps_local.session import Session
    from ps_local.settings import SamplingSettings
    from ps_local.eval.tasks import Grade, load_task

    task = load_task(str(words), grader="regex")
    threads: list[str] = []

    class Recording(type(task)):  # the same task, with a grader that notes where it runs
        def grade(self, problem, completion):
            threads.append(threading.current_thread().name)
            return Grade(completion, True, "correct")

    recording = Recording(task.name, task.problems, task.grader, task.template, task.stops)
    plan = EvalPlan(("power", "standard"), 2, tmp_path / "out")
    settings = SamplingSettings(max_tokens=4, block_size=4, mcmc_steps=2, seed=3)
    with Session(tiny_gguf) as session:
        records = run_eval(session, recording, plan, settings, lambda line: None)
    assert len(records) == len(read_results([plan.out])) == 3 * 2 * 2
    assert len(threads) == 12 and all(name.startswith("ps-local-grade") for name in threads)
