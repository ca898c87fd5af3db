#!/usr/bin/env python3
"""Convergence table: total variation to exact p^alpha against MH steps, on the tiny GGUF.

Runs K independent one-block chains through the real llama.cpp engine for each number of MH
steps and prints a Markdown table, with low-temperature sampling and the sampling-noise floor
(median TV of K exact draws from p^alpha) as reference rows.

    python scripts/exactness.py [--chains 2000] [--model tiny.gguf]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_gguf import write_tiny_gguf  # noqa: E402

from ps_local.engine import LlamaEngine  # noqa: E402
from ps_local.exact import enumerate_sequences, noise_floor, total_variation, tv_bound  # noqa: E402
from ps_local.scheduler import sample  # noqa: E402
from ps_local.settings import SamplingSettings  # noqa: E402

STEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200)
PROMPT = "yes no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=3)
    parser.add_argument("--model", type=Path, help="a tiny GGUF (default: written by make_tiny_gguf.py)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or write_tiny_gguf(Path(scratch) / "tiny.gguf")
        with LlamaEngine(model, n_threads=2) as engine:
            prompt = engine.tokenize(PROMPT)
            batch = 64
            engine.allocate(len(prompt) + 2 * args.max_tokens * batch + 8, 1 + 2 * batch)
            exact = enumerate_sequences(engine, prompt, args.max_tokens, args.alpha)
            target = exact.power(args.alpha)

            def tv_after(steps: int, **options: object) -> float:
                settings = SamplingSettings(
                    alpha=args.alpha, max_tokens=args.max_tokens, block_size=args.max_tokens,
                    mcmc_steps=steps, seed=steps, **options,  # type: ignore[arg-type]
                )
                samples = sample(engine, prompt, settings, args.chains, chains_per_batch=batch)
                return total_variation([s.tokens for s in samples], exact, target)

            started = time.perf_counter()
            print(f"TV to exact p^{args.alpha:g} on the tiny GGUF (prompt {PROMPT!r}, T_max = {args.max_tokens}, "
                  f"{len(exact.sequences)} sequences, EOS-ended mass {target[exact.ended].sum():.2f} under p^alpha), "
                  f"{args.chains} independent one-block chains per row:\n")
            print("| MH steps | power sampling (ps-local) | without log n − log n' (reference code) |")
            print("|---:|---:|---:|")
            for steps in STEPS:
                print(f"| {steps} | {tv_after(steps):.3f} | {tv_after(steps, length_term=False):.3f} |", flush=True)
            low_temp = tv_after(0, method="low-temp")
            print(f"| low-temperature sampling (τ = 1/α) | {low_temp:.3f} | |")
            print(f"| noise floor: median TV of {args.chains} exact draws | {noise_floor(target, args.chains):.3f} | |")
            print(f"| bound the tests use: 99.9th percentile of that noise | {tv_bound(target, args.chains):.3f} | |")
            print(f"\n({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
