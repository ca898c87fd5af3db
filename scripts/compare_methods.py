#!/usr/bin/env python3
"""What power sampling changes, measured: power, low-temperature and standard sampling side by
side on one prompt over several seeds, with the base model's log p of each whole sample (what
p^alpha sharpens) and per token, how repetitive each sample is, and how often the MH chain moved.

    python scripts/compare_methods.py                       # the README's demo settings
    python scripts/compare_methods.py --seeds 0-9 --alpha 4 --prompt "..." --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ps_local.default_model import default_model_path
from ps_local.session import RuntimeOptions, Session
from ps_local.settings import Sample, SamplingSettings

# The README's first question, with the paper's MH at B = 32 for power ("What power sampling changes").
DEMO_PROMPT = "Q: Why is the sky blue? A:"
DEMO = dict(alpha=4.0, max_tokens=96, block_size=32, mcmc_steps=10)
DEMO_STOP = ("Q:",)


def distinct_bigrams(tokens: list[int]) -> float:
    """Share of distinct token bigrams: near 1 for varied text, low for a loop."""
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def describe(result: Sample) -> dict:
    stats = result.stats
    return {
        "seed": stats.seed,
        "tokens": len(result.tokens),
        "logp": sum(result.logprobs),  # what p^alpha sharpens: the whole sequence's log p
        "mean_logp": sum(result.logprobs) / len(result.logprobs) if result.logprobs else 0.0,
        "distinct_bigrams": distinct_bigrams(result.tokens),
        "moved": stats.moved,
        "accepted": stats.accepted,
        "mh_steps": stats.mh_steps,
        "tokens_decoded": stats.tokens_decoded,
        "wall_s": stats.wall_s,
        "stop": stats.stop_reason,
        "text": result.text,
    }


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF file [default: the demo model, Gemma 3 270M]")
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=DEMO["alpha"])
    parser.add_argument("--max-tokens", type=int, default=DEMO["max_tokens"])
    parser.add_argument("--block-size", type=int, default=DEMO["block_size"])
    parser.add_argument("--mcmc-steps", type=int, default=DEMO["mcmc_steps"])
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--no-stop", action="store_true", help="no stop string at all")
    parser.add_argument("--methods", default="power,low-temp,standard")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show-text", action="store_true", help="print every sample's text")
    args = parser.parse_args()

    stops = () if args.no_stop else tuple(args.stop) if args.stop is not None else DEMO_STOP
    model = args.model or default_model_path()
    rows: dict[str, list[dict]] = {}
    started = time.perf_counter()
    with Session(model, RuntimeOptions(threads=args.threads)) as session:
        prompt = session.tokenize(args.prompt)
        for method in args.methods.split(","):
            rows[method] = []
            for seed in parse_seeds(args.seeds):
                settings = SamplingSettings(method=method, alpha=args.alpha, max_tokens=args.max_tokens,
                                            block_size=args.block_size, mcmc_steps=args.mcmc_steps, seed=seed,
                                            stop=stops)
                (result,) = session.generate(prompt, settings)
                rows[method].append(describe(result))
                print(f"{method} seed {seed}: log p {rows[method][-1]['logp']:.1f}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    print(f"Model {model.name}, prompt {args.prompt!r}, α={args.alpha:g}, T_max={args.max_tokens}, "
          f"B={args.block_size}, N={args.mcmc_steps}, stop {list(stops)}, seeds {args.seeds}, "
          f"{args.threads} threads ({time.perf_counter() - started:.0f} s)\n")
    print("| method | sequence log p | log p per token | distinct bigrams | tokens | moved / MH steps | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, samples in rows.items():
        moved = sum(s["moved"] for s in samples)
        steps = sum(s["mh_steps"] for s in samples)
        print(f"| {method} | {statistics.mean(s['logp'] for s in samples):.1f} | "
              f"{statistics.mean(s['mean_logp'] for s in samples):.3f} | "
              f"{statistics.mean(s['distinct_bigrams'] for s in samples):.2f} | "
              f"{statistics.mean(s['tokens'] for s in samples):.0f} | "
              f"{f'{moved}/{steps}' if steps else ''} | {statistics.mean(s['wall_s'] for s in samples):.1f} |")
    if args.show_text:
        for method, samples in rows.items():
            for s in samples:
                print(f"\n--- {method}, seed {s['seed']} (log p {s['logp']:.1f}, {s['tokens']} tokens, {s['stop']}):"
                      f"\n{s['text']}")


if __name__ == "__main__":
    main()
