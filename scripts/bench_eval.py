#!/usr/bin/env python3
"""Eval wall time with grading on the sampling thread against the grading pool, in one run.

Both rows sample the same problems with the same seed on the same loaded model, each into its
own fresh results folder, in alternating order (inline, pool, pool, inline, ... for --repeats)
so drift of the machine's speed falls on both.

    python scripts/bench_eval.py                      # humaneval, first 20 problems, power, T=256
    python scripts/bench_eval.py --limit 5 --repeats 1 --max-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ps_local.eval.run import GRADING_WORKERS, EvalPlan, run_eval
from ps_local.eval.summary import summarize
from ps_local.models import resolve_model
from ps_local.session import RuntimeOptions, Session
from ps_local.settings import SamplingSettings
from ps_local.eval.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="humaneval")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--method", default="power")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (inline and pool each)")
    args = parser.parse_args()

    task = load_task(args.task)
    base = SamplingSettings(method=args.method, max_tokens=args.max_tokens, seed=0)
    walls: dict[int, list[float]] = {0: [], GRADING_WORKERS: []}
    accuracy: dict[int, float] = {}
    with Session(resolve_model(args.model), RuntimeOptions(threads=args.threads)) as session:
        order = [0, GRADING_WORKERS]
        for repeat in range(args.repeats):
            for workers in order if repeat % 2 == 0 else order[::-1]:
                with tempfile.TemporaryDirectory(prefix="ps-local-bench-eval-") as out:
                    plan = EvalPlan((args.method,), 1, Path(out), args.limit, grading_workers=workers)
                    start = time.perf_counter()
                    records = run_eval(session, task, plan, base, log=lambda line: None)
                    walls[workers].append(time.perf_counter() - start)
                    accuracy[workers] = summarize(records)[args.method]["accuracy"]
                print(f"grading workers {workers}: {walls[workers][-1]:.1f} s", flush=True)
    print(f"\n{args.task} --limit {args.limit}, {args.method}, max_tokens {args.max_tokens}, "
          f"{args.threads} threads, {args.repeats} pair(s)")
    print("| grading | wall s (median) | accuracy |\n|---|---:|---:|")
    for workers, label in ((0, "on the sampling thread"), (GRADING_WORKERS, f"pool of {GRADING_WORKERS}")):
        print(f"| {label} | {statistics.median(walls[workers]):.1f} | {accuracy[workers]:.2f} |")
    print(f"pool / inline: {statistics.median(walls[GRADING_WORKERS]) / statistics.median(walls[0]):.3f}")


if __name__ == "__main__":
    main()
