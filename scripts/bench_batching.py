#!/usr/bin/env python3
"""What batching across requests buys, side by side in one run on one model and machine.

1. Server: 8 power requests sent at once to `ps-local serve`, against the same 8 sent one after
   another to the same server; with the latency of each request under the concurrent load.
2. API: `generate(n=8)` against 8 calls of `generate(n=1)` with the same chains.
3. Eval: `ps-local eval TASK --limit L --parallel 8` against `--parallel 1` (problems per hour).

    python scripts/bench_batching.py                      # default model, 2 threads
    python scripts/bench_batching.py --skip-eval --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

PROMPT = "Q: Why is the sky blue? A:"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(base: str, body: dict) -> dict:
    request = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read())


def bench_server(args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ps_local.cli", "serve", args.model, "--port", str(port),
                               "--threads", str(args.threads), "--ctx", "1024"], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.5)
        bodies = [{"prompt": PROMPT, "max_tokens": args.max_tokens, "block_size": args.block_size, "stop": ["Q:"],
                   "seed": seed, "method": "power"} for seed in range(8)]
        post(base, {**bodies[0], "max_tokens": 4})  # warm-up
        start = time.perf_counter()
        tokens_one_by_one = sum(post(base, body)["usage"]["completion_tokens"] for body in bodies)
        one_by_one = time.perf_counter() - start
        latencies: list[float] = []
        tokens_together = []

        def one(body: dict) -> None:
            began = time.perf_counter()
            tokens_together.append(post(base, body)["usage"]["completion_tokens"])
            latencies.append(time.perf_counter() - began)

        threads = [threading.Thread(target=one, args=(body,)) for body in bodies]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        together = time.perf_counter() - start
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    latencies.sort()
    return {"one_by_one_s": one_by_one, "together_s": together, "speedup": one_by_one / together,
            "latency_median_s": statistics.median(latencies),
            "latency_p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
            "tokens_one_by_one": tokens_one_by_one, "tokens_together": sum(tokens_together)}


def bench_api(args: argparse.Namespace) -> dict[str, float]:
    import ps_local

    with ps_local.load(args.model, threads=args.threads) as model:
        settings = dict(max_tokens=args.max_tokens, block_size=args.block_size, stop="Q:")
        model.generate(PROMPT, max_tokens=4, seed=0)  # warm-up
        start = time.perf_counter()
        singles = [model.generate(PROMPT, seed=seed, **settings)[0] for seed in range(8)]
        single_s = time.perf_counter() - start
        start = time.perf_counter()
        batched = model.generate(PROMPT, n=8, seed=0, **settings)
        batched_s = time.perf_counter() - start
    return {"eight_singles_s": single_s, "n8_s": batched_s, "speedup": single_s / batched_s,
            "tokens_singles": sum(len(s.tokens) for s in singles), "tokens_n8": sum(len(s.tokens) for s in batched)}


def bench_eval(args: argparse.Namespace) -> dict[str, float]:
    walls = {}
    for parallel in (1, 8):
        with tempfile.TemporaryDirectory(prefix="ps-local-bench-") as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ps_local.cli", "eval", args.model, args.task, "--methods", "power",
                            "--limit", str(args.limit), "--parallel", str(parallel), "--max-tokens",
                            str(args.eval_max_tokens), "--threads", str(args.threads), "--seed", "0", "--out", out,
                            "-q"], check=True, stdout=subprocess.DEVNULL)
            walls[parallel] = time.perf_counter() - start
    return {"parallel_1_s": walls[1], "parallel_8_s": walls[8],
            "problems_per_hour_1": 3600 * args.limit / walls[1], "problems_per_hour_8": 3600 * args.limit / walls[8],
            "speedup": walls[1] / walls[8]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--task", default="humaneval")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--eval-max-tokens", type=int, default=192)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {"server": bench_server(args), "api": bench_api(args)}
    if not args.skip_eval:
        results["eval"] = bench_eval(args)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"model {args.model}, {args.threads} threads, power α=4, B={args.block_size}, max_tokens {args.max_tokens}")
    server, api = results["server"], results["api"]
    print("| comparison | one at a time | batched | ratio |\n|---|---:|---:|---:|")
    print(f"| server: 8 requests, sequential vs concurrent | {server['one_by_one_s']:.1f} s | "
          f"{server['together_s']:.1f} s | {server['speedup']:.2f}× |")
    print(f"| API: 8 × generate(n=1) vs generate(n=8) | {api['eight_singles_s']:.1f} s | {api['n8_s']:.1f} s | "
          f"{api['speedup']:.2f}× |")
    if "eval" in results:
        ev = results["eval"]
        print(f"| eval {args.task} --limit {args.limit} (T={args.eval_max_tokens}): --parallel 1 vs 8 | "
              f"{ev['problems_per_hour_1']:.0f} problems/h | {ev['problems_per_hour_8']:.0f} problems/h | "
              f"{ev['speedup']:.2f}× |")
    print(f"server latency under 8 concurrent requests: median {server['latency_median_s']:.1f} s, "
          f"p95 {server['latency_p95_s']:.1f} s")
    print(f"tokens generated: server {server['tokens_one_by_one']} / {server['tokens_together']}, "
          f"API {api['tokens_singles']} / {api['tokens_n8']}")


if __name__ == "__main__":
    main()
