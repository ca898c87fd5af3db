"""What a trace costs: the same runs with and without --trace, interleaved, and whether the
samples are the same.

    .venv/bin/python scripts/bench_trace.py            # the default model and the numpy toy
    .venv/bin/python scripts/bench_trace.py --toy-only

Default model: the README's first command (alpha 4, B 32, T_max 96, stop "Q:", seed 0), -n 1 and
-n 4, each run 2 x REPEATS times with and without a trace file, interleaved (see timed()). Toy: power and PPT on the
numpy toy engine with many MH steps, where the sampler's own work is smallest and a trace costs
the most in proportion.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ps_local.scheduler import sample  # noqa: E402
from ps_local.settings import SamplingSettings  # noqa: E402
from ps_local.toy_engine import ToyEngine  # noqa: E402
from ps_local.trace import TraceWriter  # noqa: E402

PROMPT = "Q: Why is the sky blue? A:"


def same(a, b) -> bool:
    return all(x.tokens == y.tokens and x.logprobs == y.logprobs and x.stats.accepted == y.stats.accepted
               for x, y in zip(a, b)) and len(a) == len(b)


def timed(run, repeats: int, folder: str) -> dict:
    """run(trace) -> samples, without and with a trace file; best times and the trace's size.

    On llama.cpp consecutive runs alternate between two layouts of the KV cache (the cached
    prompt's slot and the chains' slots), whose logits differ in the last bits, so a sample can
    differ between one run and the next whatever the trace: runs are compared with the runs of
    the same parity, in the order off, on, on, off (each mode meets both layouts equally)."""
    times: dict[tuple[int, bool], list[float]] = {(0, False): [], (0, True): [], (1, False): [], (1, True): []}
    references: dict[int, list] = {}
    lines = size = 0
    identical = True
    count = 0
    run(None)  # fills the prompt cache (the first run decodes the prompt, the others copy it)
    count += 1
    for repeat in range(repeats):
        for traced in (False, True, True, False):
            parity = count % 2
            count += 1
            path = os.path.join(folder, f"trace-{repeat}.jsonl")
            start = time.perf_counter()
            if traced:
                with TraceWriter(path) as writer:
                    samples = run(writer)
            else:
                samples = run(None)
            times[(parity, traced)].append(time.perf_counter() - start)
            identical = identical and same(references.setdefault(parity, samples), samples)
            if traced:
                lines = sum(1 for _ in open(path, encoding="utf-8"))
                size = os.path.getsize(path)
    # The fastest of each: on a shared machine, the run least disturbed by others.
    medians = {key: min(values) for key, values in times.items()}
    off = statistics.mean([medians[(0, False)], medians[(1, False)]])
    on = statistics.mean([medians[(0, True)], medians[(1, True)]])
    ratio = statistics.mean([medians[(p, True)] / medians[(p, False)] for p in (0, 1)])
    return {"off_s": off, "on_s": on, "overhead": ratio - 1, "lines": lines, "bytes": size, "identical": identical,
            "repeats": repeats}


def report(name: str, result: dict) -> None:
    print(f"| {name} | {result['off_s']:.3f} | {result['on_s']:.3f} | {result['overhead']:+.1%} | "
          f"{result['lines']:,} | {result['bytes'] / 1024:,.0f} KiB | {'yes' if result['identical'] else 'NO'} |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--toy-only", action="store_true")
    args = parser.parse_args()
    print(f"| run | best s, no trace | best s, trace | overhead | trace lines | trace size | same samples |")
    print("|---|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as folder:
        vocab = ["</s>"] + [f"w{k}" for k in range(40)]
        for method, steps in (("power", 200), ("ppt", 50)):
            settings = SamplingSettings(method=method, alpha=4.0, max_tokens=24, block_size=8, mcmc_steps=steps,
                                        seed=0)
            result = timed(lambda trace: sample(ToyEngine(vocab, eos=0, seed=1, scale=1.0), [1, 2, 3], settings,
                                                num_samples=4, max_round_width=2, trace=trace), args.repeats, folder)
            report(f"numpy toy, {method}, -n 4, N={steps}, T_max 24, B 8", result)
        if args.toy_only:
            return
        import ps_local

        with ps_local.load("default", threads=args.threads) as model:
            for n in (1, 4):
                result = timed(lambda trace: model.generate(PROMPT, n=n, stop="Q:", max_tokens=96, block_size=32,
                                                            seed=0, trace=trace), args.repeats, folder)
                report(f"default model, README's first command, -n {n}", result)


if __name__ == "__main__":
    main()
