"""``ps-local trace FILE``: what a trace (ps_local.trace) says about a run's chains.

Per request (``job``) and chain: MH steps, acceptance, moves and log p per block, tokens decoded;
SMC's resamplings and ESS; PPT's swap acceptance per adjacent pair of rungs. With several chains
of one prompt, R-hat and bulk ESS of log p (ArviZ, the ``diagnostics`` extra), and pictures.

Which draws R-hat compares: a chain of Algorithm 1 runs its MH steps block by block, and block k
targets p^alpha over sequences of at most L_k tokens, so the chain's log p is the log p of a
growing sequence: draws of different blocks are draws of different distributions and cannot be
pooled. Within block k, the states after each of its N MH steps are a Markov chain on that
block's target, the same for every chain of the prompt: R-hat and ESS are computed per block,
over the chains that ran it (a chain that ended in an earlier block has no draws there), from
those N draws each (the state the extension left is the chain's start, not a draw). For PPT they
are the alpha replica's (the one whose sequence is the sample). A block needs at least 2 chains and
4 MH steps; R-hat is rank-normalized split R-hat (Vehtari et al. 2021), ESS the bulk ESS.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .trace import TRACE_FORMAT

RHAT_LIMIT = 1.01  # Vehtari et al. (2021): use the draws only below it
ESS_PER_CHAIN = 100  # ... and with a bulk ESS of at least 100 per chain
MIN_DRAWS = 4  # split R-hat halves each chain; ArviZ needs 4 draws
MAX_PICTURES = 16
INSTALL_HINT = "pip install 'ps-local[diagnostics]'"


@dataclass(slots=True)
class Step:
    """One MH step, as much of its event as the summary needs."""

    block: int
    step: int
    mh_step: int
    logp: float  # the chain's log p after the step
    accepted: bool
    moved: bool
    early_rejected: bool
    tokens_decoded: int


@dataclass
class ChainTrace:
    steps: list[Step] = field(default_factory=list)
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)  # block -> its "block" event


@dataclass
class JobTrace:
    header: dict[str, Any]
    mh: dict[tuple[int, int | None], ChainTrace] = field(default_factory=lambda: defaultdict(ChainTrace))
    ess: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    resamples: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    swaps: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    rejuvenations: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    samples: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def number(self) -> int:
        return self.header["job"]

    @property
    def method(self) -> str:
        return self.header.get("method", "?")

    @property
    def top_replica(self) -> int | None:
        """The replica whose sequence is the sample: the last rung for PPT, none otherwise."""
        if self.method != "ppt":
            return None
        ladder = self.header.get("settings", {}).get("ladder")
        if ladder:
            return len(ladder) - 1
        replicas = [replica for _, replica in self.mh if replica is not None]
        return max(replicas) if replicas else None

    def chains(self) -> list[int]:
        found = set(self.header.get("chains", [])) | set(self.samples) | set(self.ess) | set(self.swaps)
        found |= {chain for chain, _ in self.mh}
        return sorted(found)


@dataclass
class Trace:
    path: Path
    jobs: list[JobTrace]
    notes: list[str]


def read_trace(path: Path) -> Trace:
    """Every request of a trace file; UserError (one line) for a file that is not a trace."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such trace file: {path}")
    if not path.is_file():
        raise UserError(f"not a trace file: {path}")
    jobs: dict[int, JobTrace] = {}
    notes: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        number = 0
        pending_error: str | None = None
        for number, line in enumerate(lines, start=1):
            if pending_error is not None:  # a bad line that was not the last one
                raise UserError(pending_error)
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                if number == 1:
                    raise UserError(f"{path} is not a ps-local trace (its first line is not JSON)") from None
                pending_error = f"{path}: line {number} is not JSON"
                continue
            if not isinstance(event, dict) or "event" not in event:
                raise UserError(f"{path} is not a ps-local trace (line {number} is not a trace event)")
            if number == 1 and event.get("event") != "header":
                raise UserError(f"{path} is not a ps-local trace (its first line is not a trace header)")
            _take(jobs, event, path, number)
        if pending_error is not None:
            notes.append(f"the last line is cut short (an interrupted run?): line {number} skipped")
    if not jobs:
        raise UserError(f"{path} is not a ps-local trace (it is empty)")
    formats = {job.header.get("format") for job in jobs.values()}
    if any(not isinstance(f, int) or f > TRACE_FORMAT for f in formats):
        notes.append(f"written by a newer ps-local (trace format {sorted(map(str, formats))}): some fields may be missed")
    return Trace(path, list(jobs.values()), notes)


def _take(jobs: dict[int, JobTrace], event: dict[str, Any], path: Path, number: int) -> None:
    kind = event["event"]
    job_number = event.get("job")
    if kind == "header":
        jobs[job_number] = JobTrace(event)  # type: ignore[index]
        return
    job = jobs.get(job_number)  # type: ignore[arg-type]
    if job is None:
        raise UserError(f"{path}: line {number} belongs to job {job_number}, which has no header line before it")
    chain = event.get("chain")
    try:
        if kind == "mh":
            logp = event["logp_proposal"] if event["accepted"] else event["logp_current"]
            job.mh[(chain, event.get("replica"))].steps.append(Step(
                event["block"], event["step"], event["mh_step"], float(logp), bool(event["accepted"]),
                bool(event["moved"]), bool(event.get("early_rejected")), int(event.get("tokens_decoded", 0))))
        elif kind == "block":
            job.mh[(chain, event.get("replica"))].blocks[event["block"]] = event
        elif kind == "ess":
            job.ess[chain].append(event)
        elif kind == "resample":
            job.resamples[chain].append(event)
        elif kind == "swap":
            job.swaps[chain].append(event)
        elif kind == "rejuvenate":
            job.rejuvenations[chain].append({key: int(event[key]) for key in ("moves", "accepted", "moved")})
        elif kind == "sample":
            job.samples[chain] = event
        # other kinds (a newer ps-local's) are skipped
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: line {number} is not a valid {kind} event ({type(error).__name__}: {error})") from None


# -- the summary ---------------------------------------------------------------------------


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _mh_totals(steps: list[Step]) -> dict[str, Any]:
    count = len(steps)
    accepted = sum(s.accepted for s in steps)
    moved = sum(s.moved for s in steps)
    return {"steps": count, "accepted": accepted, "moved": moved, "early_rejected": sum(s.early_rejected for s in steps),
            "acceptance": _rate(accepted, count), "moved_rate": _rate(moved, count)}


def _block_rows(chain: ChainTrace) -> list[dict[str, Any]]:
    by_block: dict[int, list[Step]] = defaultdict(list)
    for step in chain.steps:
        by_block[step.block].append(step)
    rows = []
    for block in sorted(set(by_block) | set(chain.blocks)):
        steps = by_block.get(block, [])
        start = chain.blocks.get(block, {})
        row = {"block": block, **_mh_totals(steps), "tokens_before": start.get("tokens_before"),
               "tokens_start": start.get("tokens"), "logp_start": start.get("logp"),
               "logp_final": steps[-1].logp if steps else start.get("logp"),
               "tokens_decoded": steps[-1].tokens_decoded if steps else start.get("tokens_decoded")}
        rows.append(row)
    return rows


def _swap_rows(swaps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pairs: dict[tuple[int, int], list[bool]] = defaultdict(list)
    alphas: dict[tuple[int, int], list[float]] = {}
    for swap in swaps:
        key = tuple(swap["rungs"])
        pairs[key].append(bool(swap["accepted"]))  # type: ignore[index]
        alphas[key] = swap.get("alphas")  # type: ignore[index,assignment]
    return [{"rungs": list(key), "alphas": alphas[key], "proposed": len(flags), "accepted": sum(flags),
             "rate": _rate(sum(flags), len(flags))} for key, flags in sorted(pairs.items())]


def summarize_job(job: JobTrace) -> dict[str, Any]:
    header = job.header
    settings = header.get("settings", {})
    top = job.top_replica
    chains = []
    for chain in job.chains():
        sample = job.samples.get(chain)
        stats = (sample or {}).get("stats", {})
        record: dict[str, Any] = {
            "chain": chain, "finished": sample is not None,
            "tokens": sample.get("tokens") if sample else None, "logp": sample.get("logp") if sample else None,
            "stop_reason": sample.get("stop_reason") if sample else None,
            "tokens_decoded": stats.get("tokens_decoded"), "text": sample.get("text") if sample else None,
        }
        main = job.mh.get((chain, top))
        if main is not None:
            record["mh"] = _mh_totals(main.steps)
            record["blocks"] = _block_rows(main)
            if record["tokens_decoded"] is None and main.steps:
                record["tokens_decoded"] = main.steps[-1].tokens_decoded
        replicas = sorted(replica for c, replica in job.mh if c == chain and replica is not None)
        if replicas:
            record["replicas"] = [{"replica": replica, "alpha": _replica_alpha(job, chain, replica),
                                   **_mh_totals(job.mh[(chain, replica)].steps)} for replica in replicas]
        if job.swaps.get(chain):
            record["swaps"] = _swap_rows(job.swaps[chain])
        checks = job.ess.get(chain)
        if checks:
            resamples = job.resamples.get(chain, [])
            final = next((c for c in reversed(checks) if c.get("final")), None)
            record["smc"] = {
                "checks": sum(not c.get("final") for c in checks), "resamples": len(resamples),
                "ess_min": min(float(c["ess"]) for c in checks), "particles": checks[0].get("particles"),
                "ess_final": final["ess"] if final else None,
                "distinct_ancestors": stats.get("distinct_ancestors", resamples[-1]["distinct_ancestors"]
                                                if resamples else None),
                "log_normalizer": final.get("log_normalizer") if final else None,
            }
            sweeps = job.rejuvenations.get(chain)
            if sweeps:  # resample-move: the particles' MH moves
                record["smc"]["rejuvenation"] = {"sweeps": len(sweeps),
                                                 **{key: sum(s[key] for s in sweeps) for key in sweeps[0]}}
        chains.append(record)
    summary: dict[str, Any] = {
        "job": job.number, "method": job.method, "seed": header.get("seed"),
        "prompt_tokens": header.get("prompt_tokens"), "version": header.get("version"),
        "settings": settings, "chains": chains,
    }
    for key in ("problem", "prompt_index", "task"):
        if key in header:
            summary[key] = header[key]
    all_swaps = [swap for swaps in job.swaps.values() for swap in swaps]
    if all_swaps:
        summary["swaps"] = _swap_rows(all_swaps)
    if any(key[1] == top for key in job.mh):
        summary["convergence"] = convergence(job)
    return summary


def _replica_alpha(job: JobTrace, chain: int, replica: int) -> float | None:
    trace = job.mh[(chain, replica)]
    event = next(iter(trace.blocks.values()), None)
    return event.get("alpha") if event else None


def block_draws(job: JobTrace) -> dict[int, dict[int, list[float]]]:
    """Block -> chain -> its log p after each of the block's MH steps (the alpha replica's for PPT)."""
    top = job.top_replica
    draws: dict[int, dict[int, list[float]]] = defaultdict(dict)
    for (chain, replica), trace in job.mh.items():
        if replica != top:
            continue
        for step in trace.steps:
            draws[step.block].setdefault(chain, []).append(step.logp)
    return draws


def convergence(job: JobTrace) -> dict[str, Any]:
    """R-hat and bulk ESS of log p per block, over the chains that ran the block's MH steps."""
    steps = job.header.get("settings", {}).get("mcmc_steps")
    result: dict[str, Any] = {
        "draws": "log p of the chain's sequence after each MH step of the block"
                 + (" (the alpha replica)" if job.method == "ppt" else ""),
        "rhat_method": "rank-normalized split R-hat (ArviZ)", "ess_method": "bulk ESS (ArviZ)",
        "rhat_limit": RHAT_LIMIT, "blocks": [],
    }
    az = _arviz()
    if az is None:
        result["available"] = False
        result["install"] = INSTALL_HINT
    else:
        result["available"] = True
    for block, by_chain in sorted(block_draws(job).items()):
        # Chains that took every MH step of the block (one cancelled midway has fewer).
        full = max(len(d) for d in by_chain.values()) if steps is None else steps
        chains = sorted(chain for chain, d in by_chain.items() if len(d) == full)
        row: dict[str, Any] = {"block": block, "chains": len(chains), "draws_per_chain": full,
                               "rhat": None, "ess_bulk": None}
        if len(chains) < 2 or full < MIN_DRAWS:
            row["reading"] = f"not computed: needs at least 2 chains with {MIN_DRAWS} or more MH steps in the block"
        elif az is None:
            row["reading"] = f"not computed: R-hat and ESS need ArviZ ({INSTALL_HINT})"
        else:
            row.update(_diagnose(az, [by_chain[chain] for chain in chains]))
        result["blocks"].append(row)
    computed = [row for row in result["blocks"] if row.get("status") not in (None, "failed")]
    if computed:
        worst = max(computed, key=lambda row: _rhat_order(row))
        result["worst_block"] = worst["block"]
        result["rhat_max"] = worst["rhat"]
        result["converged"] = all(row["status"] in ("ok", "constant") for row in computed)
    return result


def _rhat_order(row: dict[str, Any]) -> float:
    if row["status"] == "constant":
        return 0.0
    return math.inf if row["rhat"] is None else row["rhat"]


def _arviz() -> Any:
    try:
        import warnings

        with warnings.catch_warnings():  # ArviZ 0.x announces its refactor on import
            warnings.simplefilter("ignore")
            import arviz  # type: ignore[import-not-found]
    except ImportError:
        return None
    return arviz


def _diagnose(az: Any, draws: list[list[float]]) -> dict[str, Any]:
    """R-hat and bulk ESS of a (chains, draws) array, with the usual reading."""
    import warnings

    import numpy as np

    values = np.asarray(draws, dtype=float)
    chains, per_chain = values.shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant halves: division by zero inside ArviZ
            # (chains, draws): ArviZ 0.x reads an array so, ArviZ 1.x by its default axes.
            rhat = float(np.asarray(az.rhat(values, method="rank")))
            ess = float(np.asarray(az.ess(values, method="bulk")))
    except Exception as error:  # an ArviZ this code does not know
        return {"rhat": None, "ess_bulk": None, "status": "failed",
                "reading": f"not computed: ArviZ {getattr(az, '__version__', '?')} failed ({type(error).__name__}: {error})"}
    row: dict[str, Any] = {"rhat": rhat if math.isfinite(rhat) else None,
                           "ess_bulk": ess if math.isfinite(ess) else None}
    if np.all(values == values.flat[0]):
        row.update(rhat=None, ess_bulk=None, status="constant",
                   reading="log p never changed and every chain holds the same value: the chains agree, "
                           "but nothing moved (R-hat is undefined)")
    elif not math.isfinite(rhat):
        row.update(rhat=None, ess_bulk=None, status="stuck",
                   reading="R-hat infinite: within each half-chain log p never changed while it differs "
                           "between them: the chains are stuck apart: run more steps (--mcmc-steps)")
    elif rhat > RHAT_LIMIT:
        row.update(status="disagree",
                   reading=f"R-hat above {RHAT_LIMIT}: the chains disagree: run more steps (--mcmc-steps)")
    else:
        row.update(status="ok", reading=f"R-hat at most {RHAT_LIMIT}: the chains agree")
    if row["status"] in ("ok", "disagree") and ess < ESS_PER_CHAIN * chains:
        row["reading"] += (f"; bulk ESS {ess:.0f} of {chains * per_chain} draws is below {ESS_PER_CHAIN} per chain, "
                           "so R-hat itself is a rough guide")
    return row


def summarize(trace: Trace, jobs: list[int] | None = None) -> dict[str, Any]:
    chosen = [job for job in trace.jobs if jobs is None or job.number in jobs]
    if jobs is not None and not chosen:
        known = ", ".join(str(job.number) for job in trace.jobs)
        raise UserError(f"{trace.path} has no job {', '.join(map(str, jobs))} (its jobs: {known})")
    return {"file": str(trace.path), "jobs": [summarize_job(job) for job in chosen], "notes": list(trace.notes)}


# -- text -------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _settings_line(job: dict[str, Any]) -> str:
    s = job["settings"]
    method = job["method"]
    parts = [f"job {job['job']}: {method}"]
    if "problem" in job:
        parts[0] += f" on {job['problem']}"
    if method in ("power", "ppt"):
        parts.append(f"alpha={_g(s.get('alpha'))} B={s.get('block_size')} N={s.get('mcmc_steps')}")
        if method == "ppt" and s.get("ladder"):
            parts.append("ladder=" + ",".join(f"{a:.3g}" for a in s["ladder"]))
    elif method == "smc":
        parts.append(f"alpha={_g(s.get('alpha'))} particles={s.get('particles')} "
                     f"ess-threshold={_g(s.get('ess_threshold'))}")
    parts.append(f"T_max={s.get('max_tokens')}, seed {job['seed']}, prompt {job['prompt_tokens']} tokens, "
                 f"{len(job['chains'])} chain{'s' if len(job['chains']) != 1 else ''}")
    return ", ".join(parts)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['file']}: {len(summary['jobs'])} job{'s' if len(summary['jobs']) != 1 else ''}"]
    lines += [f"note: {note}" for note in summary["notes"]]
    for job in summary["jobs"]:
        lines.append("")
        lines.append(_settings_line(job))
        for chain in job["chains"]:
            head = f"  chain {chain['chain']}: "
            if chain["finished"]:
                head += f"{chain['tokens']} tokens ({chain['stop_reason']}), log p {_num(chain['logp'])}"
            else:
                head += "unfinished"
            if "mh" in chain:
                mh = chain["mh"]
                whose = " (alpha replica)" if job["method"] == "ppt" else ""
                head += (f", MH steps {mh['steps']}{whose}: accepted {mh['accepted']} ({_pct(mh['acceptance'])}), "
                         f"moved {mh['moved']} ({_pct(mh['moved_rate'])})")
            if chain.get("tokens_decoded") is not None:
                head += f", {chain['tokens_decoded']} decoded"
            lines.append(head)
            for block in chain.get("blocks", []):
                lines.append(f"    block {block['block']}: extended {block['tokens_before']} -> {block['tokens_start']} "
                             f"tokens; {block['steps']} MH steps: accepted {block['accepted']}, moved {block['moved']}, "
                             f"early-rejected {block['early_rejected']}; log p {_num(block['logp_start'])} -> "
                             f"{_num(block['logp_final'])}; {block['tokens_decoded']} decoded so far")
            for replica in chain.get("replicas", []):
                lines.append(f"    replica {replica['replica']} (alpha {_num(replica['alpha'], 3)}): "
                             f"{replica['steps']} MH steps, accepted {_pct(replica['acceptance'])}, "
                             f"moved {_pct(replica['moved_rate'])}")
            if chain.get("swaps"):
                lines.append("    swaps accepted: " + ", ".join(
                    f"{s['rungs'][0]}<->{s['rungs'][1]} {s['accepted']}/{s['proposed']}" for s in chain["swaps"]))
            if "smc" in chain:
                smc = chain["smc"]
                lines.append(f"    smc: {smc['resamples']} resamplings in {smc['checks']} checks, ESS min "
                             f"{_num(smc['ess_min'], 1)} of {smc['particles']}, final ESS {_num(smc['ess_final'], 1)}, "
                             f"{smc['distinct_ancestors']} distinct ancestors, log normalizer "
                             f"{_num(smc['log_normalizer'])}")
                if "rejuvenation" in smc:
                    moves = smc["rejuvenation"]
                    lines.append(f"    rejuvenation: {moves['sweeps']} sweeps, {moves['moves']} MH moves, accepted "
                                 f"{_pct(_rate(moves['accepted'], moves['moves']))}, moved "
                                 f"{_pct(_rate(moves['moved'], moves['moves']))}")
        if job.get("swaps"):
            lines.append("  swap acceptance per pair (all chains): " + ", ".join(
                f"{s['rungs'][0]}<->{s['rungs'][1]} {_pct(s['rate'])} ({s['accepted']}/{s['proposed']})"
                for s in job["swaps"]))
        if "convergence" in job:
            lines += _convergence_lines(job["convergence"])
    return "\n".join(lines)


def _convergence_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"  R-hat and bulk ESS of log p over each block's MH steps ({result['draws']}):"]
    if not result["available"]:
        lines.append(f"    not computed: R-hat and ESS need ArviZ: {result['install']}")
        return lines
    for row in result["blocks"]:
        figures = ""
        if row.get("status") in ("ok", "disagree"):
            figures = f"R-hat {row['rhat']:.3f}, bulk ESS {row['ess_bulk']:.1f}; "
        lines.append(f"    block {row['block']} ({row['chains']} chain{'s' if row['chains'] != 1 else ''} x "
                     f"{row['draws_per_chain']} steps): "
                     f"{figures}{row['reading']}")
    return lines


# -- pictures ---------------------------------------------------------------------------------


def write_pictures(trace: Trace, out: Path, jobs: list[int] | None = None) -> tuple[list[Path], list[str]]:
    """One PNG per job with MH steps (log p, acceptance, moves) or SMC checks (ESS over tokens);
    the files written, and notes (what was left out)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["no pictures: they need matplotlib (pip install 'ps-local[eval]')"]
    chosen = [job for job in trace.jobs if (jobs is None or job.number in jobs) and (job.mh or job.ess)]
    notes = []
    if len(chosen) > MAX_PICTURES:
        notes.append(f"pictures of the first {MAX_PICTURES} of {len(chosen)} jobs (--job picks others)")
        chosen = chosen[:MAX_PICTURES]
    if not chosen:
        return [], ["no pictures: no MH steps or SMC checks in the trace (plain decoding only)"]
    out.mkdir(parents=True, exist_ok=True)
    stem = trace.path.stem
    written = []
    for job in chosen:
        name = f"{stem}.png" if len(trace.jobs) == 1 or jobs is not None and len(chosen) == 1 else \
            f"{stem}-job{job.number}.png"
        figure = _mh_figure(plt, job) if job.mh else _smc_figure(plt, job)
        path = out / name
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(path)
    return written, notes


def _title(job: JobTrace) -> str:
    s = job.header.get("settings", {})
    what = f"job {job.number}: {job.method}"
    if "problem" in job.header:
        what += f" on {job.header['problem']}"
    if job.method == "smc":
        return f"{what}, alpha={_g(s.get('alpha'))}, {s.get('particles')} particles, seed {job.header.get('seed')}"
    return (f"{what}, alpha={_g(s.get('alpha'))} B={s.get('block_size')} N={s.get('mcmc_steps')}, "
            f"seed {job.header.get('seed')}")


def _mh_figure(plt: Any, job: JobTrace) -> Any:
    top = job.top_replica
    figure, (logp_axis, accept_axis, moved_axis) = plt.subplots(3, 1, figsize=(7.5, 7.5), sharex=True)
    boundaries: set[int] = set()
    for (chain, replica), trace in sorted(job.mh.items(), key=lambda item: item[0][0]):
        if replica != top:
            continue
        xs, ys = [], []
        steps_by_block: dict[int, list[Step]] = defaultdict(list)
        for step in trace.steps:
            steps_by_block[step.block].append(step)
        for block in sorted(set(steps_by_block) | set(trace.blocks)):
            steps = steps_by_block.get(block, [])
            start = trace.blocks.get(block)
            first = steps[0].mh_step - 1 if steps else (xs[-1] if xs else 0)
            if start is not None:
                xs.append(first)
                ys.append(start["logp"])
                if block > 1:
                    boundaries.add(first)
            xs += [s.mh_step for s in steps]
            ys += [s.logp for s in steps]
        line, = logp_axis.plot(xs, ys, marker=".", markersize=3, linewidth=1, label=f"chain {chain}")
        counts = range(1, len(trace.steps) + 1)
        accepted = _running([s.accepted for s in trace.steps])
        moved = _running([s.moved for s in trace.steps])
        x = [s.mh_step for s in trace.steps]
        accept_axis.plot(x, [a / n for a, n in zip(accepted, counts)], color=line.get_color(), linewidth=1)
        moved_axis.plot(x, [m / n for m, n in zip(moved, counts)], color=line.get_color(), linewidth=1)
    for axis in (logp_axis, accept_axis, moved_axis):
        for boundary in sorted(boundaries):
            axis.axvline(boundary, color="grey", linewidth=0.5, linestyle=":")
    whose = " (alpha replica)" if job.method == "ppt" else ""
    logp_axis.set_ylabel("log p of the sequence")
    logp_axis.set_title(_title(job), fontsize=10)
    accept_axis.set_ylabel("accepted so far")
    moved_axis.set_ylabel("moved so far")
    accept_axis.set_ylim(-0.05, 1.05)
    moved_axis.set_ylim(-0.05, 1.05)
    moved_axis.set_xlabel(f"MH steps of the chain{whose} (dotted: a new block, its first point after its extension)")
    if len(job.chains()) <= 12:
        logp_axis.legend(fontsize=7, ncol=4, loc="lower right")
    figure.tight_layout()
    return figure


def _smc_figure(plt: Any, job: JobTrace) -> Any:
    figure, axis = plt.subplots(figsize=(7.5, 3.5))
    threshold = None
    for chain, checks in sorted(job.ess.items()):
        checks = [c for c in checks if not c.get("final")]
        line, = axis.plot([c["t"] for c in checks], [c["ess"] for c in checks], linewidth=1, label=f"chain {chain}")
        resampled = [c for c in checks if c.get("resampled")]
        axis.plot([c["t"] for c in resampled], [c["ess"] for c in resampled], "x", color=line.get_color(),
                  markersize=4)
        threshold = next((c["threshold"] for c in checks if c.get("threshold") is not None), threshold)
    if threshold is not None:
        axis.axhline(threshold, color="grey", linewidth=0.8, linestyle="--", label="resampling threshold")
    axis.set_xlabel("token position t (x: resampled)")
    axis.set_ylabel("ESS before resampling")
    axis.set_title(_title(job), fontsize=10)
    if len(job.ess) <= 12:
        axis.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    return figure


def _running(flags: list[bool]) -> list[int]:
    total, out = 0, []
    for flag in flags:
        total += flag
        out.append(total)
    return out
