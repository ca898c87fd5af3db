#!/usr/bin/env python3
"""How far finite runs are from p^alpha: mean log p (what p^alpha sharpens) against tokens decoded.

For each prompt and length, every sampler configuration draws ``--samples`` independent samples
and reports the mean of the samples' base-model log p with its standard error, how many
distinct samples it drew, and the tokens it decoded per sample. Reference rows run far past
convergence: long independent MH chains and SMC with the most particles a run may have. Where
the two agree (within two standard errors of their difference) their pooled mean is p^alpha's
mean log p, and every row is reported as its distance from it. The curves go to a PNG, the table
to stdout (markdown); every row goes to a JSON-lines file, which a rerun reads instead of
sampling again (so a long measurement resumes, and --plot-only redraws it).

    python scripts/convergence.py --out runs/convergence               # the README's picture
    python scripts/convergence.py --lengths 48 --samples 8 --configs "power:N=10;smc:N=64"
    python scripts/convergence.py --model m.gguf --prompt "Q: ... A:" --stop "Q:" --out runs/m

A configuration is METHOD[:KEY=VALUE,...], configurations separated by ';'. Keys: N (MH steps
per block for power and ppt, particles for smc), tau (proposal temperature), B (block size),
S (MH steps per token: --steps-per-token), K (SMC rejuvenation moves: --rejuvenate), ess (SMC
--ess-threshold), ramp (SMC --alpha-ramp), W (PPT pilot steps: --ladder-warmup), ladder (PPT
rungs separated by /). ``default`` is what
`ps-local generate` does with no sampler option; ``paper`` is the paper's settings
(--method power --mcmc-steps 10 --block-size 192).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ps_local.settings import DEFAULT_METHOD, SamplingSettings

DEFAULT_PROMPTS = ("Q: Why is the sky blue? A:",)
DEFAULT_STOPS = ("Q:",)
# The curves: MH at tau = 1/alpha and at a hotter proposal, SMC with and without rejuvenation, PPT.
DEFAULT_CONFIGS = ";".join([
    "low-temp",
    "paper", "power:N=40", "power:N=160",
    "power:N=40,tau=0.5", "power:N=160,tau=0.5",
    "smc:N=16", "smc:N=32", "smc:N=64", "smc:N=128",
    "smc:N=16,K=1", "smc:N=32,K=1",
    "ppt:N=10", "ppt:N=10,W=8",
    "default",
])
REFERENCE_CONFIGS = "power:N=640;smc:N=255"
KEYS = {"N": None, "tau": ("proposal_temp", float), "B": ("block_size", int), "S": ("steps_per_token", float),
        "K": ("smc_rejuvenate", int), "W": ("ladder_warmup", int), "ess": ("ess_threshold", float),
        "ramp": ("smc_ramp", int)}


@dataclass
class Row:
    """One configuration at one prompt and length: every sample's log p and cost."""

    model: str
    prompt: str
    stops: list[str]
    length: int
    config: str
    seed: int
    logp: list[float] = field(default_factory=list)
    tokens_decoded: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    reference: bool = False
    settings: str = ""  # what the configuration meant when it ran ("default" changes with ps-local)

    @property
    def key(self) -> tuple:
        return (self.model, self.prompt, tuple(self.stops), self.length, self.settings, self.seed, len(self.logp))

    @property
    def mean(self) -> float:
        return statistics.fmean(self.logp)

    @property
    def stderr(self) -> float:
        return statistics.stdev(self.logp) / math.sqrt(len(self.logp)) if len(self.logp) > 1 else math.nan

    @property
    def cost(self) -> float:
        return statistics.fmean(self.tokens_decoded)

    @property
    def distinct(self) -> int:
        return len(set(self.texts))


def parse_config(text: str, length: int, seed: int, stops: tuple[str, ...], alpha: float) -> SamplingSettings:
    """METHOD[:KEY=VALUE,...], ``default`` or ``paper``, as SamplingSettings for one length."""
    common = dict(max_tokens=length, seed=seed, stop=stops)
    if text == "default":
        # What `ps-local generate` does with no sampler option (its particles fitted by the session).
        return SamplingSettings(method=DEFAULT_METHOD, **common)
    if text == "paper":
        return SamplingSettings(method="power", alpha=alpha, mcmc_steps=10, block_size=192, **common)
    method, _, rest = text.partition(":")
    options: dict = {"method": method, "alpha": alpha, "block_size": 192, **common}
    try:
        values = dict(part.split("=", 1) for part in rest.split(",") if part)
        for key, value in values.items():
            if key == "N":
                options["particles" if method == "smc" else "mcmc_steps"] = int(value)
            elif key == "ladder":
                options["ladder"] = tuple(float(a) for a in value.split("/"))
            elif key in KEYS:
                name, kind = KEYS[key]  # type: ignore[misc]
                options[name] = kind(value)
            else:
                raise ValueError(f"unknown key {key!r}")
        settings = SamplingSettings(**options)
        settings.validate()
    except (ValueError, TypeError) as error:
        raise SystemExit(f"convergence.py: bad configuration {text!r}: {error}") from None
    return settings


def family(config: str) -> str:
    """The curve a configuration belongs to: its method and keys other than N."""
    if config in ("default", "paper", "low-temp"):
        return config
    method, _, rest = config.partition(":")
    keys = [part for part in rest.split(",") if part and not part.startswith("N=")]
    return method + (f" ({', '.join(keys)})" if keys else "")


def load_rows(path: Path | None) -> list[Row]:
    if path is None or not path.exists():
        return []
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def measure(session, model: str, prompt: str, stops: tuple[str, ...], length: int, config: str, samples: int,
            seed: int, alpha: float) -> Row:
    settings = parse_config(config, length, seed, stops, alpha)
    row = Row(model, prompt, list(stops), length, config, seed, settings=repr(settings))
    started = time.perf_counter()
    for result in session.generate(session.tokenize(prompt), settings, samples):
        row.logp.append(sum(result.logprobs))
        row.tokens_decoded.append(result.stats.tokens_decoded)
        row.texts.append(result.text)
    row.wall_s = time.perf_counter() - started
    return row


@dataclass
class Reference:
    mean: float
    stderr: float
    rows: list[Row]
    agree: bool  # every pair of reference rows within two standard errors of their difference


def reference_of(rows: list[Row]) -> Reference | None:
    """The pooled (inverse-variance) mean log p of the reference rows, and whether they agree."""
    usable = [row for row in rows if row.reference and len(row.logp) > 1 and row.stderr > 0]
    if not usable:
        return None
    weights = [1 / row.stderr**2 for row in usable]
    mean = sum(w * row.mean for w, row in zip(weights, usable)) / sum(weights)
    agree = all(abs(a.mean - b.mean) <= 2 * math.hypot(a.stderr, b.stderr)
                for i, a in enumerate(usable) for b in usable[i + 1 :])
    return Reference(mean, 1 / math.sqrt(sum(weights)), usable, agree)


def table(rows: list[Row], reference: Reference | None) -> str:
    lines = ["| sampler | mean log p (± s.e.) | distance to p^α | distinct samples | tokens decoded per sample | wall s |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r.reference, family(r.config), r.cost)):
        distance = f"{reference.mean - row.mean:+.2f}" if reference is not None else ""
        name = f"{row.config} (reference)" if row.reference else row.config
        lines.append(f"| {name} | {row.mean:.2f} ± {row.stderr:.2f} | {distance} | {row.distinct}/{len(row.logp)} | "
                     f"{row.cost:,.0f} | {row.wall_s:.0f} |")
    if reference is not None:
        verdict = "agree" if reference.agree else "DISAGREE: run them longer before trusting the distances"
        lines.append(f"\nReference: mean log p {reference.mean:.2f} ± {reference.stderr:.2f} from "
                     f"{', '.join(r.config for r in reference.rows)} ({verdict}). Distance: reference minus the "
                     "row's mean; positive means the samples are less likely than p^α's.")
    return "\n".join(lines)


def plot(groups: dict[tuple[str, int], tuple[list[Row], Reference | None]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6.2 * len(groups), 5.4), squeeze=False)
    # One colour per curve across the panels, one legend for the figure.
    names = sorted({family(row.config) for rows, _ in groups.values() for row in rows if not row.reference})
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {name: palette(number % palette.N) for number, name in enumerate(names)}
    handles: dict[str, object] = {}
    for axis, ((prompt, length), (rows, reference)) in zip(axes[0], groups.items()):
        curves: dict[str, list[Row]] = {}
        for row in rows:
            if not row.reference:
                curves.setdefault(family(row.config), []).append(row)
        if reference is not None:
            handles["p^α ± 1 nat"] = axis.axhspan(reference.mean - 1, reference.mean + 1, color="0.9")
            handles["p^α (reference)"] = axis.axhline(reference.mean, color="0.3", lw=1, ls="--")
        for name, members in curves.items():
            members.sort(key=lambda r: r.cost)
            style = dict(marker="*", ms=14, ls="none") if name in ("default", "paper", "low-temp") else dict(marker="o")
            handles[name] = axis.errorbar([r.cost for r in members], [r.mean for r in members],
                                          yerr=[r.stderr for r in members], capsize=2, color=colour[name], **style)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 3×10¹ 4×10¹ ... overlap
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xlabel("tokens decoded per sample")
        axis.set_ylabel("mean log p of the samples")
        axis.set_title(f"{prompt[:40]!r}, up to {length} tokens", fontsize=10)
        axis.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF file [default: the demo model, Gemma 3 270M]")
    parser.add_argument("--prompt", action="append", default=None, help="prompt (repeatable)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable) [default: Q:]")
    parser.add_argument("--no-stop", action="store_true")
    parser.add_argument("--lengths", default="48,192", help="most new tokens, comma-separated")
    parser.add_argument("--samples", type=int, default=16, help="independent samples per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--reference", default=REFERENCE_CONFIGS, help="configurations run far past convergence")
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"),
                        help="folder of rows.jsonl (resumed), table.md and curves.png")
    parser.add_argument("--plot-only", action="store_true", help="draw and tabulate the rows already measured")
    args = parser.parse_args()

    prompts = tuple(args.prompt or DEFAULT_PROMPTS)
    stops = () if args.no_stop else tuple(args.stop) if args.stop is not None else DEFAULT_STOPS
    lengths = [int(x) for x in args.lengths.split(",")]
    configs = [c for c in args.configs.split(";") if c]
    references = [c for c in args.reference.split(";") if c]
    for length in lengths:  # a typo stops the run before any sampling
        for config in configs + references:
            parse_config(config, length, args.seed, stops, args.alpha)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = args.out / "rows.jsonl"
    done = {row.key: row for row in load_rows(rows_file)}

    session = None
    if not args.plot_only:
        from ps_local.default_model import default_model_path
        from ps_local.session import RuntimeOptions, Session

        model_path = args.model or default_model_path()
        session = Session(model_path, RuntimeOptions(threads=args.threads))
    model = (args.model or Path("default")).name
    groups: dict[tuple[str, int], tuple[list[Row], Reference | None]] = {}
    try:
        for prompt in prompts:
            for length in lengths:
                rows = []
                for config, is_reference in [(c, True) for c in references] + [(c, False) for c in configs]:
                    settings = parse_config(config, length, args.seed, stops, args.alpha)
                    key = (model, prompt, stops, length, repr(settings), args.seed, args.samples)
                    row = done.get(key)
                    if row is None and session is not None:
                        row = measure(session, model, prompt, stops, length, config, args.samples, args.seed,
                                      args.alpha)
                        row.reference = is_reference
                        with rows_file.open("a") as out:
                            out.write(json.dumps(asdict(row)) + "\n")
                        print(f"{prompt[:30]!r} {length} {config}: {row.mean:.2f} ± {row.stderr:.2f}, "
                              f"{row.cost:.0f} tokens, {row.wall_s:.0f} s", file=sys.stderr, flush=True)
                    if row is not None:
                        rows.append(replace(row, reference=is_reference))
                groups[(prompt, length)] = (rows, reference_of(rows))
    finally:
        if session is not None:
            session.close()

    report = []
    for (prompt, length), (rows, reference) in groups.items():
        report.append(f"### {model}, {prompt!r}, stop {list(stops)}, up to {length} tokens, "
                      f"{args.samples} samples per row, α = {args.alpha:g}\n\n{table(rows, reference)}\n")
    text = "\n".join(report)
    print(text)
    (args.out / "table.md").write_text(text)
    if any(rows for rows, _ in groups.values()):
        plot(groups, args.out / "curves.png")
        print(f"\ncurves: {args.out / 'curves.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
