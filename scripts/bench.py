#!/usr/bin/env python3
"""Side-by-side speed of power sampling, in one run, same model, prompt and seed for every row.

Rows: ps-local as shipped; the same chain decoding one proposal at a time with and without
exact early rejection; the reference implementation's strategy (prompt and kept prefix
re-evaluated for every proposal); plain decoding of as many tokens as a power run decoded
(the sequential limit); standard sampling of T_max tokens; -n 8 against 8 single runs; and the
three samplers of p^alpha side by side: MH, Power-SMC with 8 and 16 particles, parallel power
tempering with 4 replicas. Last, the cost of one batched decode of n = 1 ... 32 sequences on
this machine, which decides what SMC's and PPT's batches cost here.

    python scripts/bench.py                  # Gemma 3 270M, 2 threads, α=4, B=128, N=10, T_max=512
    python scripts/bench.py --only samplers  # MH, SMC, PPT, standard sampling and the batch curve
    python scripts/bench.py --json           # the same figures as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ps_local.default_model import default_model_path
from ps_local.engine import LlamaEngine
from ps_local.protocol import DecodeRequest
from ps_local.samplers import slots_per_chain
from ps_local.scheduler import sample
from ps_local.settings import Sample, SamplingSettings

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
PROMPT = "Chapter 1\n\nThe old lighthouse keeper had not spoken to anyone in eleven years. "


class ReevaluatingEngine:
    """The reference implementation's strategy, for comparison only: a branch keeps nothing
    in the cache, so each proposal first re-evaluates the prompt and the kept prefix."""

    def __init__(self, inner: LlamaEngine):
        self.inner = inner
        self.n_vocab = inner.n_vocab
        self.tokens: dict[int, list[int]] = {}
        self.to_reevaluate: dict[int, list[int]] = {}
        self.tokens_reevaluated = 0

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def token_bytes(self, token: int) -> bytes:
        return self.inner.token_bytes(token)

    def is_end_of_generation(self, token: int) -> bool:
        return self.inner.is_end_of_generation(token)

    def length(self, slot: int) -> int:
        return len(self.tokens.get(slot, []))  # what the slot would hold, had it kept its cache

    def reset(self) -> None:
        self.inner.reset()
        self.tokens.clear()
        self.to_reevaluate.clear()

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.inner.copy_prefix(src, dst, 0)
        self.tokens[dst] = self.tokens.get(src, [])[:length]
        self.to_reevaluate[dst] = list(self.tokens[dst])

    def decode(self, requests: Sequence[DecodeRequest]) -> np.ndarray:
        expanded = []
        for slot, tokens in requests:
            again = self.to_reevaluate.pop(slot, [])
            self.tokens_reevaluated += len(again)
            self.tokens.setdefault(slot, []).extend(tokens)
            expanded.append((slot, again + list(tokens)))
        return self.inner.decode(expanded)


@dataclass
class Row:
    name: str
    wall_s: float
    tokens_decoded: int
    tokens_reevaluated: int = 0
    mh_steps: int = 0
    samples: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def mh_steps_per_s(self) -> float:
        return self.mh_steps / self.wall_s if self.wall_s else 0.0


def run_power(engine, prompt, settings, num_samples=1, round_width=1, name="") -> tuple[Row, list[Sample]]:
    chains = num_samples
    per_chain = slots_per_chain(settings, round_width)
    engine_core = getattr(engine, "inner", engine)
    engine_core.allocate(len(prompt) + per_chain * settings.max_tokens * chains + 8, 1 + per_chain * chains)
    started = time.perf_counter()
    samples = sample(engine, prompt, settings, num_samples, chains_per_batch=chains, max_round_width=round_width)
    wall = time.perf_counter() - started
    row = Row(
        name,
        wall,
        sum(s.stats.tokens_decoded for s in samples),
        sum(s.stats.tokens_reevaluated for s in samples) + getattr(engine, "tokens_reevaluated", 0),
        sum(s.stats.mh_steps for s in samples),
        len(samples),
        {
            "proposal_tokens": sum(s.stats.proposal_tokens for s in samples),
            "early_rejections": sum(s.stats.early_rejections for s in samples),
            "discarded_tokens": sum(s.stats.discarded_tokens for s in samples),
            "accepted": sum(s.stats.accepted for s in samples),
            "stop_reasons": sorted({s.stats.stop_reason for s in samples}),
            "generated_tokens": sum(len(s.tokens) for s in samples),
            "reused_tokens": sum(s.stats.reused_tokens for s in samples),
            "particle_tokens": sum(s.stats.particle_tokens or 0 for s in samples),
            "swap_acceptance": samples[0].stats.swap_acceptance,
        },
    )
    if getattr(engine, "tokens_reevaluated", 0):
        row.tokens_decoded += engine.tokens_reevaluated
    return row, samples


def batch_cost(engine: LlamaEngine, prompt: list[int], sizes: Sequence[int], repeats: int = 12) -> dict[int, float]:
    """Median seconds of one llama_decode over n sequences, each appending one token."""
    engine.allocate(len(prompt) + (max(sizes) + 1) * (repeats + 2) + 8, max(sizes) + 1)
    costs = {}
    for size in sizes:
        engine.reset()
        (row,) = engine.decode([(0, prompt)])
        for slot in range(1, size + 1):
            engine.copy_prefix(0, slot, len(prompt))
        token = int(row.argmax())
        engine.decode([(slot, [token]) for slot in range(1, size + 1)])  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.decode([(slot, [token]) for slot in range(1, size + 1)])
            times.append(time.perf_counter() - started)
        costs[size] = float(np.median(times))
    return costs


def plain_decoding(engine: LlamaEngine, prompt: list[int], count: int, segment: int) -> Row:
    """Decode ``count`` tokens one at a time, in sequences of at most ``segment`` tokens
    after the prompt (positions like the chain's): what llama.cpp alone needs."""
    engine.allocate(len(prompt) + segment + 8, 2)
    engine.reset()
    (row,) = engine.decode([(0, prompt)])
    started = time.perf_counter()
    done = 0
    while done < count:
        engine.copy_prefix(0, 1, len(prompt))
        token = int(row.argmax())
        for _ in range(min(segment, count - done)):
            (next_row,) = engine.decode([(1, [token])])
            token = int(next_row.argmax())
            done += 1
    return Row("plain decoding, same token count (sequential limit)", time.perf_counter() - started, count)


def samplers_of_p_alpha(engine: LlamaEngine, prompt: list[int], settings: SamplingSettings, batch_width: int,
                        log, measured: dict[str, Row]) -> dict[str, Row]:
    """MH (as shipped), Power-SMC with 8 and 16 particles and PPT with 4 replicas, at the same
    alpha and length, and standard sampling: the comparison the README's method guide rests on.
    ``measured``: rows of this run already taken ("mh", "standard"), not run again."""
    rows: dict[str, Row] = dict(measured)
    if "mh" not in rows:
        log("samplers of p^alpha: MH ...")
        rows["mh"], _ = run_power(engine, prompt, settings, round_width=batch_width,
                                  name=f"MH (power), B={settings.block_size}, N={settings.mcmc_steps}")
    for particles in (8, 16):
        log(f"samplers of p^alpha: SMC, {particles} particles ...")
        smc = SamplingSettings(**{**settings.__dict__, "method": "smc", "particles": particles})
        rows[f"smc{particles}"], _ = run_power(engine, prompt, smc, name=f"Power-SMC, N={particles}")
    log("samplers of p^alpha: PPT, 4 replicas ...")
    ppt = SamplingSettings(**{**settings.__dict__, "method": "ppt"})
    width = max(1, batch_width // len(ppt.power_ladder))  # the session's default: a batch of about 8
    rows["ppt4"], _ = run_power(engine, prompt, ppt, round_width=width,
                                name=f"PPT, K=4 (ladder {','.join(f'{a:.3g}' for a in ppt.power_ladder)})")
    if "standard" not in rows:
        log("samplers of p^alpha: standard sampling ...")
        rows["standard"], _ = run_power(engine, prompt, SamplingSettings(**{**settings.__dict__, "method": "standard"}),
                                        name="standard sampling, T_max tokens")
    return rows


def print_samplers(rows: dict[str, Row], costs: dict[int, float]) -> None:
    standard, mh = rows["standard"].wall_s, rows["mh"].wall_s
    print("| sampler | wall s | tokens decoded | decoded per output token | cost multiple (× plain decoding) | × MH |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in ("mh", "smc8", "smc16", "ppt4", "standard"):
        row = rows[key]
        per_token = row.tokens_decoded / max(1, row.extra["generated_tokens"])
        print(f"| {row.name} | {row.wall_s:.1f} | {row.tokens_decoded} | {per_token:.2f} | "
              f"{row.wall_s / standard:.2f}× | {row.wall_s / mh:.2f}× |")
    print()
    for particles in (8, 16):
        extra = rows[f"smc{particles}"].extra
        print(f"- SMC N={particles}: {rows[f'smc{particles}'].tokens_decoded} tokens decoded for "
              f"{extra['particle_tokens']} particle tokens (identical prefixes share batch entries: "
              f"{extra['particle_tokens'] / max(1, rows[f'smc{particles}'].tokens_decoded):.1f}× fewer)")
    swaps = rows["ppt4"].extra["swap_acceptance"] or []
    print(f"- PPT swap acceptance per adjacent pair: {', '.join(f'{rate:.0%}' for rate in swaps)}")
    print()
    print("One llama_decode of n sequences, each appending one token (median of 12):\n")
    print("| n | " + " | ".join(str(n) for n in costs) + " |")
    print("|---|" + "---:|" * len(costs))
    print("| ms per decode | " + " | ".join(f"{1000 * c:.1f}" for c in costs.values()) + " |")
    print("| tokens/s | " + " | ".join(f"{n / c:.0f}" for n, c in costs.items()) + " |")
    print("| × one sequence's cost | " + " | ".join(f"{c / costs[1]:.2f}" for c in costs.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF file [default: the demo model, Gemma 3 270M]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--mcmc-steps", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-width", type=int, default=8, help="proposals per batched MH round (shipped: 8)")
    parser.add_argument("--n8-max-tokens", type=int, default=128, help="T_max of the -n 8 comparison")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--only", choices=["samplers"], help="only MH, SMC, PPT, standard sampling and the batch curve")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = args.model or default_model_path()
    engine = LlamaEngine(model, n_threads=args.threads)
    prompt = engine.tokenize(args.prompt)
    settings = SamplingSettings(
        alpha=args.alpha, block_size=args.block_size, mcmc_steps=args.mcmc_steps,
        max_tokens=args.max_tokens, seed=args.seed,
    )
    sequential = SamplingSettings(**{**settings.__dict__, "early_rejection": False, "reuse_tables": False})
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    if args.only == "samplers":
        samplers = samplers_of_p_alpha(engine, prompt, settings, args.round_width, log, {})
        log("batched decode cost ...")
        costs = batch_cost(engine, prompt, BATCH_SIZES)
        if args.json:
            print(json.dumps({"settings": vars(args) | {"model": str(model)}, "batch_cost_s": costs,
                              "samplers": {key: row.__dict__ for key, row in samplers.items()}}, indent=2, default=str))
            return
        print(f"Model {model.name}, {args.threads} threads, α={args.alpha:g}, B={args.block_size}, "
              f"N={args.mcmc_steps}, T_max={args.max_tokens}, seed {args.seed}\n")
        print_samplers(samplers, costs)
        return

    rows: dict[str, Row] = {}
    log("power, as shipped ...")
    rows["shipped"], _ = run_power(engine, prompt, settings, round_width=args.round_width,
                                   name=f"ps-local power as shipped (early rejection, reused tables, up to {args.round_width} proposals per batch)")
    log("power, one proposal at a time, early rejection only ...")
    rows["early"], _ = run_power(engine, prompt, SamplingSettings(**{**settings.__dict__, "reuse_tables": False}),
                                 name="one proposal at a time, early rejection only")
    log("power, sequential chain ...")
    rows["sequential"], _ = run_power(engine, prompt, sequential,
                                      name="sequential chain: every proposal token decoded, one proposal at a time")
    log("power, re-evaluating prompt and prefix per proposal ...")
    rows["reference"], _ = run_power(ReevaluatingEngine(engine), prompt, sequential,
                                     name="reference strategy: prompt + prefix re-evaluated per proposal")
    log("plain decoding ...")
    rows["limit"] = plain_decoding(engine, prompt, rows["sequential"].tokens_decoded, args.max_tokens)
    log("standard sampling ...")
    standard_settings = SamplingSettings(**{**settings.__dict__, "method": "standard"})
    rows["standard"], _ = run_power(engine, prompt, standard_settings, name="standard sampling, T_max tokens")

    n8 = SamplingSettings(**{**settings.__dict__, "max_tokens": args.n8_max_tokens,
                             "block_size": min(args.block_size, max(1, args.n8_max_tokens // 4))})
    log("-n 8, batched ...")
    rows["n8"], _ = run_power(engine, prompt, n8, num_samples=8, name=f"-n 8 batched (T_max {n8.max_tokens})")
    log("8 single runs ...")
    singles = []
    for k in range(8):
        single = SamplingSettings(**{**n8.__dict__, "seed": args.seed + k})
        singles.append(run_power(engine, prompt, single, round_width=args.round_width, name="")[0])
    rows["n8_sequential"] = Row(f"8 single runs as shipped (T_max {n8.max_tokens})",
                                sum(r.wall_s for r in singles), sum(r.tokens_decoded for r in singles),
                                sum(r.tokens_reevaluated for r in singles), sum(r.mh_steps for r in singles), 8)

    samplers = samplers_of_p_alpha(engine, prompt, settings, args.round_width, log,
                                   {"mh": rows["shipped"], "standard": rows["standard"]})
    log("batched decode cost ...")
    costs = batch_cost(engine, prompt, BATCH_SIZES)

    seconds_per_token = rows["limit"].wall_s / rows["limit"].tokens_decoded
    standard_wall = rows["standard"].wall_s
    figures = {
        "efficiency_sequential": rows["sequential"].tokens_decoded * seconds_per_token / rows["sequential"].wall_s,
        "efficiency_shipped": rows["shipped"].tokens_decoded * seconds_per_token / rows["shipped"].wall_s,
        "early_rejection_token_saving": 1 - rows["early"].extra["proposal_tokens"] / rows["sequential"].extra["proposal_tokens"],
        "single_chain_speedup": rows["sequential"].wall_s / rows["shipped"].wall_s,
        "n8_speedup": rows["n8_sequential"].wall_s / rows["n8"].wall_s,
        "reference_slowdown": rows["reference"].wall_s / rows["sequential"].wall_s,
    }
    if args.json:
        print(json.dumps({"settings": vars(args) | {"model": str(model)}, "figures": figures,
                          "rows": {key: row.__dict__ for key, row in rows.items()}, "batch_cost_s": costs,
                          "samplers": {key: row.__dict__ for key, row in samplers.items()}}, indent=2, default=str))
        return

    print(f"Model {model.name}, {args.threads} threads, α={args.alpha:g}, B={args.block_size}, "
          f"N={args.mcmc_steps}, T_max={args.max_tokens}, seed {args.seed}; "
          f"stop: {rows['shipped'].extra['stop_reasons']}\n")
    print("| run | wall s | tokens decoded | tokens re-evaluated | MH steps/s | efficiency | cost multiple |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key in ("shipped", "early", "sequential", "reference", "limit", "standard", "n8", "n8_sequential"):
        row = rows[key]
        efficiency = row.tokens_decoded * seconds_per_token / row.wall_s if key not in ("n8", "n8_sequential") else None
        multiple = row.wall_s / standard_wall if key not in ("limit", "n8", "n8_sequential") else None
        print(f"| {row.name} | {row.wall_s:.1f} | {row.tokens_decoded} | {row.tokens_reevaluated} | "
              f"{row.mh_steps_per_s:.2f} | {'' if efficiency is None else f'{efficiency:.2f}'} | "
              f"{'' if multiple is None else f'{multiple:.1f}×'} |")
    print()
    print(f"- efficiency of the sequential chain (limit / actual): {figures['efficiency_sequential']:.2f}")
    print(f"- proposal tokens drawn from reused tables (shipped): "
          f"{rows['shipped'].extra['reused_tokens'] / max(1, rows['shipped'].extra['proposal_tokens']):.0%}")
    print(f"- proposal tokens saved by exact early rejection: {figures['early_rejection_token_saving']:.0%}")
    print(f"- single chain, shipped vs sequential chain: {figures['single_chain_speedup']:.2f}× faster")
    print(f"- -n 8 batched vs 8 single runs: {figures['n8_speedup']:.2f}× the samples per second")
    print(f"- reference strategy vs sequential chain: {figures['reference_slowdown']:.2f}× slower")
    print("\nThe samplers of p^α at the same α and T_max:\n")
    print_samplers(samplers, costs)


if __name__ == "__main__":
    main()
