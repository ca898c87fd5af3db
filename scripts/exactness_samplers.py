#!/usr/bin/env python3
"""Power-SMC and parallel power tempering against exact p^alpha, by enumeration.

Two tables of total variation to exact p^alpha (T_max = 3, every sequence enumerated):
1. Power-SMC against its number of particles N, on the numpy toy of the tests and on the tiny
   GGUF through llama.cpp (one particle is plain low-temperature sampling).
2. PPT (4 replicas, ladder 1 .. alpha) against MH at the same number of MH steps per chain, on
   the toy, the tiny GGUF and the held-out tiny GGUF whose MH chain mixes slowly at tau = 1/alpha.
With the sampling-noise floor (median TV of as many exact draws) and the bound the tests use.

    python scripts/exactness_samplers.py [--runs 2000]
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
from ps_local.toy_engine import ToyEngine  # noqa: E402

ALPHA = 4.0
MAX_TOKENS = 3
PARTICLES = (1, 4, 16, 64, 255)
STEPS = (5, 15, 30)
BATCH = 31  # chains per batch: 31 PPT chains of 4 x 2 slots fill llama.cpp's 256 sequences


def cases(scratch: Path) -> dict[str, tuple[object, list[int]]]:
    toy = ToyEngine(["</s>", "a", "b", "c"], eos=0, scale=2.5, seed=3, eos_bias=-0.5)
    found: dict[str, tuple[object, list[int]]] = {"numpy toy": (toy, [1, 2])}
    for name, options in (("tiny GGUF", {}), ("held-out GGUF", {"seed": 0, "logit_scale": 0.3})):
        engine = LlamaEngine(write_tiny_gguf(scratch / f"{name.split()[0]}.gguf", **options), n_threads=2)
        engine.allocate(3 + 255 * MAX_TOKENS + 8, 256)
        found[name] = (engine, engine.tokenize("yes no"))
    return found


def tv(engine, prompt, exact, runs: int, batch: int, **options) -> float:
    settings = SamplingSettings(**{**dict(alpha=ALPHA, max_tokens=MAX_TOKENS, block_size=MAX_TOKENS, seed=0),
                                   **options})
    samples = sample(engine, prompt, settings, runs, chains_per_batch=batch, max_round_width=1)
    return total_variation([s.tokens for s in samples], exact, exact.power(ALPHA))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="independent samples per cell")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        found = cases(Path(scratch))
        exact = {name: enumerate_sequences(engine, prompt, MAX_TOKENS, ALPHA) for name, (engine, prompt) in found.items()}

        print(f"Power-SMC: TV to exact p^{ALPHA:g} against particles N, {args.runs} runs per cell, T_max {MAX_TOKENS}\n")
        smc_cases = ("numpy toy", "tiny GGUF")
        print("| N | " + " | ".join(smc_cases) + " |")
        print("|---:|" + "---:|" * len(smc_cases))
        for particles in PARTICLES:
            cells = [tv(*found[name], exact[name], args.runs, max(1, 255 // particles), method="smc",
                        particles=particles) for name in smc_cases]
            print(f"| {particles} | " + " | ".join(f"{cell:.3f}" for cell in cells) + " |", flush=True)
        reference_rows(exact, smc_cases, args.runs)

        print(f"\nPPT (4 replicas) against MH: TV to exact p^{ALPHA:g} at the same MH steps per chain, "
              f"{args.runs} chains per cell\n")
        names = list(found)
        print("| MH steps | " + " | ".join(f"{name}: MH | {name}: PPT" for name in names) + " |")
        print("|---:|" + "---:|---:|" * len(names))
        for steps in STEPS:
            cells = []
            for name in names:
                for method in ("power", "ppt"):
                    cells.append(tv(*found[name], exact[name], args.runs, BATCH, method=method, mcmc_steps=steps))
            print(f"| {steps} | " + " | ".join(f"{cell:.3f}" for cell in cells) + " |", flush=True)
        reference_rows(exact, names, args.runs, pairs=True)
        for engine, _ in found.values():
            if isinstance(engine, LlamaEngine):
                engine.close()
    print(f"\n({time.perf_counter() - started:.0f} s)", file=sys.stderr)


def reference_rows(exact, names, runs: int, pairs: bool = False) -> None:
    repeat = 2 if pairs else 1
    for label, measure in (("noise floor (median TV of exact draws)", noise_floor), ("bound of the tests", tv_bound)):
        cells = [f"{measure(exact[name].power(ALPHA), runs):.3f}" for name in names for _ in range(repeat)]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
