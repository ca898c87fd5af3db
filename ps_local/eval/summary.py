"""What an evaluation's results say: accuracy and pass@k per method, as JSON, a table and a
picture; and which result folders may be merged."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from .run_config import differences, fingerprint, read_config


def check_mergeable(directories: Iterable[Path]) -> None:
    """UserError when the folders hold results of different configurations (seeds aside)."""
    configs = [(Path(d), config) for d in directories if (config := read_config(Path(d))) is not None]
    for directory, config in configs[1:]:
        if fingerprint(config) != fingerprint(configs[0][1]):
            changed = differences(configs[0][1], config)
            raise UserError(f"{configs[0][0]} and {directory} hold results of different configurations "
                            f"({'; '.join(changed[:4])}); merge runs of one configuration (seeds may differ)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: accuracy, pass@k, and mean cost."""
    summary: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        skipped = sum(1 for r in records if r["method"] == method and r.get("status") == "skipped")
        rows = [r for r in records if r["method"] == method and r.get("status") != "skipped"]
        if not rows:
            summary[method] = {"problems": 0, "samples": 0, "skipped": skipped, "accuracy": 0.0, "pass_at_k": {},
                               "mean_tokens_decoded": 0.0, "mean_wall_s": 0.0, "mean_acceptance_rate": None,
                               "mean_moved_rate": None}
            continue
        by_problem: dict[str, list[bool]] = {}
        for row in rows:
            by_problem.setdefault(row["id"], []).append(bool(row["correct"]))
        n = min(len(v) for v in by_problem.values())
        ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128, n) if k <= n})
        rates = [r["acceptance_rate"] for r in rows if r.get("acceptance_rate") is not None]
        moved = [r["moved_rate"] for r in rows if r.get("moved_rate") is not None]
        summary[method] = {
            "problems": len(by_problem),
            "samples": len(rows),
            "skipped": skipped,
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "pass_at_k": {
                str(k): sum(pass_at_k(len(v), sum(v), k) for v in by_problem.values()) / len(by_problem) for k in ks
            },
            "mean_tokens_decoded": sum(r["tokens_decoded"] for r in rows) / len(rows),
            "mean_wall_s": sum(r["wall_s"] for r in rows) / len(rows),
            "mean_acceptance_rate": sum(rates) / len(rates) if rates else None,
            "mean_moved_rate": sum(moved) / len(moved) if moved else None,
        }
    return summary


def summary_table(summary: dict[str, dict[str, Any]]) -> str:
    ks = sorted({int(k) for s in summary.values() for k in s["pass_at_k"]})
    header = "| method | problems | skipped | accuracy | " + " | ".join(f"pass@{k}" for k in ks)
    header += " | tokens decoded | wall s | acceptance | moved |"
    lines = [header, "|---|---:|---:|---:|" + "---:|" * len(ks) + "---:|---:|---:|---:|"]
    for method, s in summary.items():
        passes = " | ".join(f"{s['pass_at_k'][str(k)]:.3f}" if str(k) in s["pass_at_k"] else "" for k in ks)
        acceptance = "" if s["mean_acceptance_rate"] is None else f"{s['mean_acceptance_rate']:.2f}"
        moved = "" if s.get("mean_moved_rate") is None else f"{s['mean_moved_rate']:.2f}"
        lines.append(
            f"| {method} | {s['problems']} | {s.get('skipped', 0)} | {s['accuracy']:.3f} | {passes} | "
            f"{s['mean_tokens_decoded']:.0f} | {s['mean_wall_s']:.1f} | {acceptance} | {moved} |"
        )
    return "\n".join(lines)


def write_summary(summary: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """summary.json, summary.md and (with matplotlib) pass_at_k.png; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(summary_table(summary) + "\n", encoding="utf-8")
    written = [out / "summary.json", out / "summary.md"]
    plot = plot_pass_at_k(summary, out / "pass_at_k.png")
    return written + ([plot] if plot else [])


def plot_pass_at_k(summary: dict[str, dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for method, s in summary.items():
        ks = sorted(int(k) for k in s["pass_at_k"])
        axes.plot(ks, [s["pass_at_k"][str(k)] for k in ks], marker="o", label=method)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("k (samples per problem)")
    axes.set_ylabel("pass@k")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
