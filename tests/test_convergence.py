"""scripts/convergence.py: rows measured through llama.cpp on the tiny model, a table and a
picture, a reference that says when its runs disagree, and a rerun that resumes instead of
sampling again."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from convergence import Row, parse_config, reference_of  # noqa: E402


def run(tiny_gguf: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convergence.py"), "--model", str(tiny_gguf), "--prompt", "yes no",
         "--no-stop", "--lengths", "3", "--samples", "24", "--threads", "1", "--configs", "low-temp;smc:N=8;default",
         "--reference", "power:N=30;smc:N=64", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_a_measurement_its_table_picture_and_resumption(tiny_gguf: Path, tmp_path: Path) -> None:
    first = run(tiny_gguf, tmp_path)
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert sorted(row["config"] for row in rows) == sorted(["low-temp", "smc:N=8", "default", "power:N=30", "smc:N=64"])
    for row in rows:
        assert len(row["logp"]) == 24 and all(value <= 0 for value in row["logp"])
        assert all(count >= 1 for count in row["tokens_decoded"])
    assert "| smc:N=8 |" in first.stdout and "power:N=30 (reference)" in first.stdout
    assert "Reference: mean log p" in first.stdout and "distance to p^α" in first.stdout
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "table.md").read_text() in first.stdout
    again = run(tiny_gguf, tmp_path)  # every row is on file: nothing is sampled again
    assert again.returncode == 0 and again.stderr.count("tokens,") == 0
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(rows)


def row(config: str, logp: list[float]) -> Row:
    return Row("m", "p", [], 3, config, 0, logp, [1] * len(logp), ["x"] * len(logp), reference=True)


def test_the_reference_pools_runs_that_agree_and_says_when_they_do_not() -> None:
    agree = reference_of([row("a", [-5.0, -5.2, -4.8, -5.1]), row("b", [-5.1, -4.9, -5.0, -5.2])])
    assert agree is not None and agree.agree and math.isclose(agree.mean, -5.0375, abs_tol=0.02)
    apart = reference_of([row("a", [-5.0, -5.2, -4.8, -5.1]), row("b", [-9.0, -9.1, -8.9, -9.2])])
    assert apart is not None and not apart.agree  # the negative control: far apart, flagged


def test_configurations_name_the_settings() -> None:
    settings = parse_config("power:N=40,tau=0.5,S=2", 48, 0, ("Q:",), 4.0)
    assert (settings.method, settings.mcmc_steps, settings.proposal_temp, settings.steps_per_token) == \
        ("power", 40, 0.5, 2.0)
    assert parse_config("smc:N=32,K=1", 48, 0, (), 4.0).smc_rejuvenate == 1
    assert parse_config("paper", 48, 0, (), 4.0).block_size == 192
    assert parse_config("default", 48, 0, (), 4.0).method == "smc"
