"""Traces (ps_local.trace) and `ps-local trace` (ps_local.trace_report).

Every field of every event is checked on the numpy toy against what it should say, computed
again from scratch where it can be (log p, log q, log A, ESS, the log normalizer); samples with
and without a trace are compared bit for bit; the CLI summarizes a real trace of the tiny GGUF;
R-hat separates well-mixed chains from chains far from equilibrium.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

import ps_local
from ps_local import trace_report
from ps_local.output import stats_record
from ps_local.samplers.mh import Chain, block_ends
from ps_local.samplers.smc import SmcRun, effective_sample_size, log_mean_exp
from ps_local.scheduler import sample
from ps_local.settings import SamplingSettings
from ps_local.toy_engine import ToyEngine
from ps_local.trace import TraceWriter
from ps_local.trace_report import read_trace, summarize

VOCAB = ["</s>"] + [f"w{k}" for k in range(12)]
PROMPT = [1, 2, 3]


def toy(**kwargs) -> ToyEngine:
    return ToyEngine(VOCAB, eos=0, **{"seed": 3, "scale": 1.5, **kwargs})


def run(settings: SamplingSettings, n: int = 3, width: int = 2, engine: ToyEngine | None = None,
        progress=None) -> tuple[list, list[dict]]:
    """Samples and the trace's events (through a callable sink)."""
    events: list[dict] = []
    with TraceWriter(events.append) as writer:
        samples = sample(engine or toy(), PROMPT, settings, num_samples=n, max_round_width=width, trace=writer,
                         progress=progress)
    return samples, events


def same_samples(a, b) -> bool:
    def fields(s):
        stats = asdict(s.stats)
        stats.pop("wall_s")
        return s.tokens, s.logprobs, s.text, stats
    return len(a) == len(b) and all(fields(x) == fields(y) for x, y in zip(a, b))


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - row.max() - math.log(np.exp(row - row.max()).sum())


def scores(engine: ToyEngine, tokens: tuple[int, ...], temperature: float) -> tuple[list[float], list[float]]:
    """Each token's log p and log q (temperature ``temperature``), from scratch."""
    logp, logq = [], []
    for position, token in enumerate(tokens):
        row = engine.logits(PROMPT + list(tokens[:position]))
        logp.append(float(log_softmax(row)[token]))
        logq.append(float(log_softmax(row.astype(np.float64) / temperature)[token]))
    return logp, logq


POWER = SamplingSettings(method="power", alpha=4.0, max_tokens=12, block_size=4, mcmc_steps=5, seed=11)
SMC = SamplingSettings(method="smc", alpha=4.0, max_tokens=10, particles=8, ess_threshold=0.9, seed=5)
PPT = SamplingSettings(method="ppt", alpha=4.0, max_tokens=12, block_size=4, mcmc_steps=4, seed=7)


# -- the trace changes nothing -----------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    POWER,
    replace(POWER, proposal_temp=1.0, table_size=1),  # draws outside tables, re-evaluations
    replace(POWER, alpha=math.inf),
    SMC,
    replace(SMC, proposal_temp=0.5, smc_ramp=3),
    PPT,
    replace(PPT, ladder_warmup=3, swap_every=2),
    replace(POWER, method="low-temp"),
    replace(POWER, method="standard"),
], ids=["power", "power-tau1-tables1", "max-swap", "smc", "smc-ramp-tau", "ppt", "ppt-warmup", "low-temp", "standard"])
@pytest.mark.parametrize("width", [1, 3])
def test_a_trace_changes_no_sample(settings, width):
    """Bit for bit on the toy: the same samples, statistics and decodes with and without a trace."""
    plain = sample(toy(), PROMPT, settings, num_samples=3, max_round_width=width)
    traced, events = run(settings, width=width)
    assert same_samples(plain, traced)
    assert events[0]["event"] == "header" and sum(e["event"] == "sample" for e in events) == 3


def test_every_sink_gets_the_same_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    stream = io.StringIO()
    events: list[dict] = []
    for sink in (path, stream, events.append):
        with TraceWriter(sink) as writer:
            sample(toy(), PROMPT, POWER, num_samples=2, trace=writer)
    from_file = [json.loads(line) for line in path.read_text().splitlines()]
    from_stream = [json.loads(line) for line in stream.getvalue().splitlines()]
    def strip(found: list[dict]) -> list[dict]:  # what differs between runs: the clock
        for event in found:
            event.pop("time", None)
            event.get("stats", {}).pop("wall_s", None)
        return found

    assert strip(from_file) == strip(from_stream) == strip(json.loads(json.dumps(events)))
    assert not stream.closed  # a caller's file stays open


# -- every field of every event ----------------------------------------------------------------


def test_header():
    samples, events = run(POWER)
    header = events[0]
    assert header["event"] == "header" and header["job"] == 0 and header["format"] == 1
    assert header["version"] == ps_local.__version__ and header["time"]
    assert header["method"] == "power" and header["seed"] == 11 and header["prompt_tokens"] == len(PROMPT)
    assert header["chains"] == [0, 1, 2]
    assert header["settings"]["alpha"] == 4.0 and header["settings"]["max_tokens"] == 12
    assert header["settings"]["block_size"] == 4 and header["settings"]["mcmc_steps"] == 5
    assert set(header["settings"]) == set(asdict(POWER))
    assert all(e["job"] == 0 for e in events)


@pytest.mark.parametrize("settings", [
    POWER,
    replace(POWER, proposal_temp=1.0, table_size=1),
    replace(POWER, alpha=math.inf),
], ids=["tau-1/alpha", "tau1-tables1", "max-swap"])
def test_mh_and_block_events(monkeypatch, settings):
    """Each MH event against the step it describes: log p and log q of both sequences from
    scratch, the MH ratio, the decision; block events against the chain's course."""
    engine = toy()
    seen = []  # (current tokens, proposal tokens, keep, state) of every traced step, in order
    original = Chain._trace_step

    def recording(self, move, current, log_n, accepted, moved):
        seen.append((tuple(current.tokens), tuple(move.proposal.tokens), move.keep, move.state))
        original(self, move, current, log_n, accepted, moved)

    monkeypatch.setattr(Chain, "_trace_step", recording)
    samples, events = run(settings, engine=engine)
    mh = [e for e in events if e["event"] == "mh"]
    assert len(mh) == len(seen) == sum(s.stats.mh_steps for s in samples) > 0
    alpha, temperature = settings.alpha, settings.temperature
    kinds = {"early": 0, "accepted": 0, "rejected": 0}
    for event, (current, proposal, keep, state) in zip(mh, seen):
        assert set(event) == {"event", "job", "chain", "block", "step", "mh_step", "m", "n", "n_proposal",
                              "logp_current", "logp_proposal", "target_current", "target_proposal", "log_accept",
                              "log_u", "early_rejected", "accepted", "moved", "tokens_decoded"}
        lp, lq = scores(engine, current, temperature)
        lp2, lq2 = scores(engine, proposal, temperature)
        assert event["m"] == keep + 1 and event["n"] == len(current) and event["n_proposal"] == len(proposal)
        assert proposal[:keep] == current[:keep]
        assert event["logp_current"] == pytest.approx(sum(lp), abs=1e-4)
        assert event["logp_proposal"] == pytest.approx(sum(lp2), abs=1e-4)
        assert event["early_rejected"] == (state == "hopeless")
        if math.isinf(alpha):
            assert event["target_current"] is None and event["target_proposal"] is None
            better = sum(lp2[keep:]) > sum(lp[keep:])
            assert event["accepted"] == (better and state == "finished")
            assert event["log_accept"] == (0.0 if event["accepted"] else None)
        else:
            assert event["target_current"] == pytest.approx(alpha * event["logp_current"])
            assert event["target_proposal"] == pytest.approx(alpha * event["logp_proposal"])
            log_a = (alpha * (sum(lp2[keep:]) - sum(lp[keep:])) - (sum(lq2[keep:]) - sum(lq[keep:]))
                     + math.log(len(current)) - math.log(len(proposal)))
            assert event["log_accept"] == pytest.approx(log_a, abs=1e-4)
            if event["early_rejected"]:
                assert event["log_accept"] <= event["log_u"] + 1e-9  # the bound fell below log u
            else:
                assert event["accepted"] == (event["log_u"] < event["log_accept"])
        assert event["log_u"] <= 0
        if event["early_rejected"]:
            assert not event["accepted"]
        assert event["moved"] == (event["accepted"] and proposal != current)
        kinds["early" if event["early_rejected"] else "accepted" if event["accepted"] else "rejected"] += 1
    assert all(kinds.values()), kinds  # every kind of step was checked

    ends = block_ends(settings.token_budget, settings.block_size)
    for index, found in enumerate(samples):
        mine = [e for e in events if e.get("chain") == index]
        steps = [e for e in mine if e["event"] == "mh"]
        blocks = [e for e in mine if e["event"] == "block"]
        # The chain's MH steps in order, N per block, numbered within their block.
        assert [e["mh_step"] for e in steps] == list(range(1, len(steps) + 1))
        assert [b["block"] for b in blocks] == list(range(1, len(blocks) + 1))
        state_logp, state_tokens = None, 0
        for block in blocks:
            assert set(block) == {"event", "job", "chain", "block", "blocks", "end", "tokens_before", "tokens",
                                  "logp", "ended", "tokens_decoded"}
            number = block["block"]
            assert block["blocks"] == len(ends) and block["end"] == ends[number - 1]
            assert block["tokens_before"] == state_tokens and block["tokens_before"] <= block["tokens"] <= block["end"]
            in_block = [e for e in steps if e["block"] == number]
            assert [e["step"] for e in in_block] == list(range(1, settings.mcmc_steps + 1))
            # Each step starts where the last one left the chain (the extension, for the first).
            state_logp, state_tokens = block["logp"], block["tokens"]
            for event in in_block:
                assert event["logp_current"] == state_logp and event["n"] == state_tokens
                if event["accepted"]:
                    state_logp, state_tokens = event["logp_proposal"], event["n_proposal"]
            assert block["ended"] in (None, "eos", "stop")
        # The chain ends where its last step left it, and its counters add up.
        assert state_logp == pytest.approx(sum(found.logprobs), abs=1e-9) and state_tokens == len(found.tokens)
        assert sum(e["accepted"] for e in steps) == found.stats.accepted
        assert sum(e["moved"] for e in steps) == found.stats.moved
        assert sum(e["early_rejected"] for e in steps) == found.stats.early_rejections
        decoded = [e["tokens_decoded"] for e in mine if "tokens_decoded" in e]
        assert decoded == sorted(decoded) and decoded[-1] <= found.stats.tokens_decoded


def test_sample_events():
    for settings in (POWER, SMC, PPT, replace(POWER, method="low-temp")):
        samples, events = run(settings)
        lines = {e["chain"]: e for e in events if e["event"] == "sample"}
        assert sorted(lines) == [0, 1, 2]
        for index, found in enumerate(samples):
            line = lines[index]
            assert set(line) == {"event", "job", "chain", "tokens", "logp", "target", "stop_reason", "text",
                                 "token_ids", "stats"}
            assert line["tokens"] == len(found.tokens) and line["token_ids"] == found.tokens
            assert line["logp"] == pytest.approx(sum(found.logprobs))
            assert line["target"] == pytest.approx(settings.alpha * line["logp"])
            assert line["stop_reason"] == found.stats.stop_reason and line["text"] == found.text
            assert line["stats"] == json.loads(json.dumps(stats_record(found.stats)))
    assert "block" not in {e["event"] for e in events} and "mh" not in {e["event"] for e in events}  # low-temp


def test_smc_events(monkeypatch):
    """ESS checks and resamplings against the population they describe: ESS and the log
    normalizer from the weights, from scratch; counts against the particles after."""
    checked = []
    original = SmcRun._maybe_resample

    def recording(self, t):
        before = (self.log_w.copy(), self.log_normalizer)
        original(self, t)
        checked.append((self.stats.chain, t, *before, [p.origin for p in self.particles]))

    monkeypatch.setattr(SmcRun, "_maybe_resample", recording)
    samples, events = run(SMC)
    checks = [e for e in events if e["event"] == "ess" and not e.get("final")]
    resamples = [e for e in events if e["event"] == "resample"]
    assert len(checks) == len(checked) and resamples
    by_check = {(c[0], c[1]): c for c in checked}
    particles = SMC.particles
    for event in checks:
        assert set(event) == {"event", "job", "chain", "t", "ess", "particles", "threshold", "resampled"}
        _, _, log_w, _, _ = by_check[(event["chain"], event["t"])]
        assert event["ess"] == pytest.approx((np.exp(log_w).sum() ** 2) / (np.exp(2 * log_w)).sum(), rel=1e-9)
        assert event["particles"] == particles and event["threshold"] == pytest.approx(SMC.ess_threshold * particles)
        assert event["resampled"] == (event["ess"] < event["threshold"])
    for event in resamples:
        assert set(event) == {"event", "job", "chain", "t", "ess", "counts", "survivors", "distinct_ancestors",
                              "log_normalizer"}
        _, _, log_w, log_normalizer, origins = by_check[(event["chain"], event["t"])]
        assert event["ess"] == pytest.approx(effective_sample_size(log_w))
        assert len(event["counts"]) == particles and sum(event["counts"]) == particles
        assert event["survivors"] == sum(1 for c in event["counts"] if c)
        assert event["distinct_ancestors"] == len(set(origins))
        assert event["log_normalizer"] == pytest.approx(log_normalizer + log_mean_exp(log_w))
        # Heavier particles get more copies (systematic resampling: within one of N w_i).
        weights = np.exp(log_w - log_w.max())
        expected = particles * weights / weights.sum()
        assert np.all(np.abs(np.array(event["counts"]) - expected) < 1 + 1e-9)
    for index, found in enumerate(samples):
        mine = [e for e in checks if e["chain"] == index]
        assert [e["t"] for e in mine] == list(range(1, len(mine) + 1))
        final = [e for e in events if e["event"] == "ess" and e.get("final") and e["chain"] == index]
        assert len(final) == 1
        assert set(final[0]) == {"event", "job", "chain", "t", "ess", "particles", "threshold", "resampled", "final",
                                 "chosen", "log_normalizer"}
        assert 0 <= final[0]["chosen"] < particles
        assert final[0]["log_normalizer"] == pytest.approx(found.stats.log_normalizer)
        assert min(e["ess"] for e in mine + final) == pytest.approx(found.stats.ess_min)
        assert sum(e["chain"] == index for e in resamples) == found.stats.resamples


def test_ppt_events():
    """Swaps against the replicas' states: a sweep after every ``swap_every`` MH steps and after
    the block's last, the sweep's order, the log p of the two sequences at each swap, log A from
    the ladder, the acceptance the statistics report."""
    for settings in (PPT, replace(PPT, swap_every=3)):
        check_ppt_events(settings)


def check_ppt_events(settings: SamplingSettings):
    samples, events = run(settings, n=3)
    ladder = settings.power_ladder
    rungs = len(ladder)
    sweeps = -(-settings.mcmc_steps // settings.swap_every)
    for index, found in enumerate(samples):
        mine = [e for e in events if e.get("chain") == index]
        swaps = [e for e in mine if e["event"] == "swap"]
        blocks = sorted({e["block"] for e in swaps})
        assert len(swaps) == len(blocks) * sweeps * (rungs - 1)
        proposed, accepted = np.zeros(rungs - 1), np.zeros(rungs - 1)
        for block in blocks:
            # Each rung's state: the extension's, then its steps' and the sweeps' in their order.
            states, steps = [], []
            for replica in range(rungs):
                start = [e for e in mine if e["event"] == "block" and e["block"] == block and e["replica"] == replica]
                mine_steps = [e for e in mine if e["event"] == "mh" and e["block"] == block and e["replica"] == replica]
                assert len(start) == 1 and len(mine_steps) == settings.mcmc_steps
                assert start[0]["alpha"] == pytest.approx(ladder[replica])
                assert all(e["alpha"] == pytest.approx(ladder[replica]) for e in mine_steps)
                states.append(start[0]["logp"])
                steps.append(mine_steps)
            done = 0
            for sweep in range(1, sweeps + 1):
                in_sweep = [e for e in swaps if e["block"] == block and e["sweep"] == sweep]
                assert [e["rungs"] for e in in_sweep] == [[k, k + 1] for k in range(rungs - 1)]
                upto = min(sweep * settings.swap_every, settings.mcmc_steps)
                for replica in range(rungs):
                    for step in steps[replica][done:upto]:
                        if step["accepted"]:
                            states[replica] = step["logp_proposal"]
                done = upto
                for event in in_sweep:
                    assert set(event) == {"event", "job", "chain", "block", "sweep", "step", "rungs", "alphas", "logp",
                                          "log_accept", "accepted"}
                    assert event["step"] == upto
                    k = event["rungs"][0]
                    assert event["alphas"] == pytest.approx([ladder[k], ladder[k + 1]])
                    assert event["logp"] == [states[k], states[k + 1]]
                    assert event["log_accept"] == pytest.approx((ladder[k + 1] - ladder[k]) * (states[k] - states[k + 1]))
                    proposed[k] += 1
                    if event["accepted"]:
                        accepted[k] += 1
                        states[k], states[k + 1] = states[k + 1], states[k]
                    elif event["log_accept"] >= 0:
                        pytest.fail("a swap with log A >= 0 must be accepted")
        assert found.stats.swap_acceptance == pytest.approx((accepted / np.maximum(proposed, 1)).tolist())
        # The alpha replica holds the sample: its last state is the sample's log p.
        assert states[-1] == pytest.approx(sum(found.logprobs), abs=1e-9)
        top = [e for e in mine if e["event"] == "mh" and e["replica"] == rungs - 1]
        assert sum(e["accepted"] for e in top) == found.stats.accepted
    assert any(e["accepted"] for e in events if e["event"] == "swap")
    assert not all(e["accepted"] for e in events if e["event"] == "swap")


def test_progress_carries_the_chains_current_tokens():
    reports = []
    samples, _ = run(POWER, n=2, progress=reports.append)
    for index, found in enumerate(samples):
        mine = [p for p in reports if p.chain == index]
        assert mine and all(isinstance(p.tokens, tuple) for p in mine)
        assert list(mine[-1].tokens) == found.tokens
        assert mine[-1].logp == pytest.approx(sum(found.logprobs))


# -- ps-local trace ----------------------------------------------------------------------------


def write_trace(path: Path, settings: SamplingSettings, n: int, engine: ToyEngine | None = None) -> Path:
    with TraceWriter(path) as writer:
        sample(engine or toy(), PROMPT, settings, num_samples=n, chains_per_batch=8, trace=writer)
    return path


def test_summary_counts_what_the_samples_report(tmp_path):
    path = tmp_path / "t.jsonl"
    with TraceWriter(path) as writer:
        power = sample(toy(), PROMPT, POWER, num_samples=3, trace=writer)
        smc = sample(toy(), PROMPT, SMC, num_samples=2, trace=writer)
        ppt = sample(toy(), PROMPT, PPT, num_samples=2, trace=writer)
    summary = summarize(read_trace(path))
    assert [job["method"] for job in summary["jobs"]] == ["power", "smc", "ppt"]
    for job, samples in zip(summary["jobs"], (power, smc, ppt)):
        for chain, found in zip(job["chains"], samples):
            assert chain["finished"] and chain["tokens"] == len(found.tokens)
            assert chain["logp"] == pytest.approx(sum(found.logprobs))
            assert chain["tokens_decoded"] == found.stats.tokens_decoded
            if "mh" in chain:
                assert chain["mh"]["steps"] == found.stats.mh_steps
                assert chain["mh"]["accepted"] == found.stats.accepted and chain["mh"]["moved"] == found.stats.moved
                assert sum(b["steps"] for b in chain["blocks"]) == found.stats.mh_steps
                if job["method"] == "power":  # (ppt: a last swap may hand the alpha replica another sequence)
                    assert chain["blocks"][-1]["logp_final"] == pytest.approx(sum(found.logprobs))
            if "smc" in chain:
                assert chain["smc"]["resamples"] == found.stats.resamples
                assert chain["smc"]["ess_min"] == pytest.approx(found.stats.ess_min)
            if "swaps" in chain:
                assert [s["rate"] for s in chain["swaps"]] == pytest.approx(found.stats.swap_acceptance)
    assert "convergence" in summary["jobs"][0] and "convergence" not in summary["jobs"][1]
    assert [s["rungs"] for s in summary["jobs"][2]["swaps"]] == [[0, 1], [1, 2], [2, 3]]


TOY4 = ["</s>", "a", "b", "c", "d"]


def mixing(steps: int, seed: int) -> dict:
    """One block of T_max 3 on a 5-token toy, alpha 10, tau 1, 8 chains: with few steps the chains
    sit where their tau = 1 extensions put them, far apart under a peaked p^10."""
    settings = SamplingSettings(method="power", alpha=10.0, proposal_temp=1.0, max_tokens=3, block_size=3,
                                mcmc_steps=steps, seed=seed)
    engine = ToyEngine(TOY4, eos=0, seed=0, scale=1.5)
    events: list[dict] = []
    with TraceWriter(events.append) as writer:
        sample(engine, [1, 2], settings, num_samples=8, chains_per_batch=8, trace=writer)
    return events


def convergence_of(events: list[dict], tmp_path: Path) -> dict:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return summarize(read_trace(path))["jobs"][0]["convergence"]


@pytest.mark.parametrize("seed", [1, 2])
def test_rhat_separates_mixed_chains_from_chains_far_from_equilibrium(tmp_path, seed):
    pytest.importorskip("arviz")
    mixed = convergence_of(mixing(1500, seed), tmp_path)
    stuck = convergence_of(mixing(10, seed), tmp_path)
    assert mixed["available"] and mixed["converged"]
    (block,) = mixed["blocks"]
    assert block["chains"] == 8 and block["draws_per_chain"] == 1500
    assert block["status"] == "ok" and 0.99 < block["rhat"] < 1.01 and block["ess_bulk"] > 400
    assert not stuck["converged"]
    (block,) = stuck["blocks"]
    assert block["status"] in ("disagree", "stuck") and (block["rhat"] is None or block["rhat"] > 1.05)
    assert "run more steps" in block["reading"]


def crafted(tmp_path: Path, draws: np.ndarray, name: str = "crafted.jsonl") -> Path:
    """A trace of one block whose chains' log p after each MH step are ``draws`` (chains, steps)."""
    chains, steps = draws.shape
    lines = [{"event": "header", "job": 0, "format": 1, "version": "0", "method": "power", "seed": 0,
              "prompt_tokens": 3, "chains": list(range(chains)),
              "settings": {"alpha": 4.0, "block_size": 8, "mcmc_steps": steps, "max_tokens": 8}}]
    for chain in range(chains):
        lines.append({"event": "block", "job": 0, "chain": chain, "block": 1, "blocks": 1, "end": 8,
                      "tokens_before": 0, "tokens": 8, "logp": -20.0, "ended": None, "tokens_decoded": 8})
        current = -20.0
        for step in range(steps):
            value = float(draws[chain, step])
            lines.append({"event": "mh", "job": 0, "chain": chain, "block": 1, "step": step + 1,
                          "mh_step": step + 1, "m": 1, "n": 8, "n_proposal": 8, "logp_current": current,
                          "logp_proposal": value, "target_current": 4 * current, "target_proposal": 4 * value,
                          "log_accept": 0.0, "log_u": -1.0, "early_rejected": False, "accepted": True,
                          "moved": value != current, "tokens_decoded": 8 + step})
            current = value
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_rhat_on_crafted_chains(tmp_path):
    pytest.importorskip("arviz")
    rng = np.random.default_rng(0)
    mixed = summarize(read_trace(crafted(tmp_path, rng.normal(-10, 1, size=(4, 1000)))))["jobs"][0]["convergence"]
    assert mixed["converged"] and mixed["blocks"][0]["rhat"] < 1.01
    # Chains started in different places and still drifting towards the same level.
    drift = np.array([start * np.exp(-np.arange(50) / 200) for start in (-5.0, -10.0, -15.0, -20.0)])
    drifting = summarize(read_trace(crafted(tmp_path, drift + rng.normal(0, 0.3, size=(4, 50)))))
    block = drifting["jobs"][0]["convergence"]["blocks"][0]
    assert block["status"] == "disagree" and block["rhat"] > 1.5
    # Stuck apart: every chain constant at its own value.
    stuck = np.repeat(np.array([[-1.0], [-2.0], [-3.0], [-4.0]]), 10, axis=1)
    block = summarize(read_trace(crafted(tmp_path, stuck)))["jobs"][0]["convergence"]["blocks"][0]
    assert block["status"] == "stuck" and block["rhat"] is None
    # All agree and never moved: undefined, said so.
    block = summarize(read_trace(crafted(tmp_path, np.full((4, 10), -3.0))))["jobs"][0]["convergence"]["blocks"][0]
    assert block["status"] == "constant" and "nothing moved" in block["reading"]
    # One chain: nothing to compare.
    block = summarize(read_trace(crafted(tmp_path, rng.normal(size=(1, 20)))))["jobs"][0]["convergence"]["blocks"][0]
    assert block["rhat"] is None and "at least 2 chains" in block["reading"]


def test_without_arviz_the_summary_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(trace_report, "_arviz", lambda: None)
    path = crafted(tmp_path, np.random.default_rng(0).normal(size=(4, 20)))
    summary = summarize(read_trace(path))
    result = summary["jobs"][0]["convergence"]
    assert result["available"] is False and result["install"] == "pip install 'ps-local[diagnostics]'"
    assert summary["jobs"][0]["chains"][0]["mh"]["steps"] == 20  # the rest of the summary is there
    text = trace_report.format_summary(summary)
    assert "pip install 'ps-local[diagnostics]'" in text and "chain 3:" in text


def ps_local_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ps_local.cli", *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_generate_trace_and_the_trace_command(tiny_gguf, tmp_path):
    trace = tmp_path / "run.jsonl"
    generated = ps_local_cli("generate", str(tiny_gguf), "hello world", "--method", "power", "-n", "4",
                             "--max-tokens", "8", "--block-size", "4", "--mcmc-steps", "5", "--seed", "1", "--threads", "2", "--json",
                             "--trace", str(trace))
    assert generated.returncode == 0, generated.stderr
    samples = [json.loads(line) for line in generated.stdout.splitlines()]
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert events[0]["event"] == "header" and events[0]["seed"] == 1 and events[0]["chains"] == [0, 1, 2, 3]
    assert events[0]["prompt_tokens"] == len(samples[0]["prompt_token_ids"])
    finals = {e["chain"]: e for e in events if e["event"] == "sample"}
    assert [finals[s["stats"]["chain"]]["token_ids"] for s in samples] == [s["tokens"] for s in samples]
    assert sum(e["event"] == "mh" for e in events) == sum(s["stats"]["mh_steps"] for s in samples)

    out = tmp_path / "pictures"
    shown = ps_local_cli("trace", str(trace), "--out", str(out))
    assert shown.returncode == 0, shown.stderr
    assert "job 0: power" in shown.stdout and "chain 3:" in shown.stdout and "block 2:" in shown.stdout
    assert "R-hat" in shown.stdout
    picture = out / "run.png"
    assert picture.read_bytes()[:4] == b"\x89PNG" and str(picture) in shown.stdout

    as_json = ps_local_cli("trace", str(trace), "--json", "--no-pictures")
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    job = summary["jobs"][0]
    assert job["method"] == "power" and len(job["chains"]) == 4
    assert [c["mh"]["steps"] for c in job["chains"]] == [s["stats"]["mh_steps"] for s in
                                                         sorted(samples, key=lambda s: s["stats"]["chain"])]
    assert {"blocks", "available", "rhat_limit"} <= set(job["convergence"])
    assert "pictures" not in summary


def test_eval_trace_names_each_problem(tiny_gguf, tmp_path):
    task = tmp_path / "words.jsonl"
    task.write_text("".join(json.dumps({"id": f"w{i}", "prompt": "yes no", "answer": "yes"}) + "\n" for i in range(2)))
    trace = tmp_path / "eval.jsonl"
    done = ps_local_cli("eval", str(tiny_gguf), str(task), "--methods", "power,smc", "--out", str(tmp_path / "out"),
                        "--max-tokens", "4", "--block-size", "4", "--mcmc-steps", "2", "--threads", "2", "--seed", "3",
                        "--grader", "regex", "-n", "2", "--trace", str(trace))
    assert done.returncode == 0, done.stderr
    headers = [json.loads(line) for line in trace.read_text().splitlines() if '"header"' in line[:20]]
    assert sorted((h["problem"], h["method"]) for h in headers) == [
        ("w0", "power"), ("w0", "smc"), ("w1", "power"), ("w1", "smc")]
    assert [h["job"] for h in headers] == [0, 1, 2, 3] and all(h["task"] == "words" for h in headers)
    shown = ps_local_cli("trace", str(trace), "--no-pictures")
    assert shown.returncode == 0 and "job 3: " in shown.stdout and " on w1" in shown.stdout


def test_api_trace_sinks(tiny_gguf, tmp_path):
    with ps_local.load(tiny_gguf, threads=2) as model:
        path = tmp_path / "api.jsonl"
        (first,) = model.generate("hello", method="power", max_tokens=6, block_size=3, mcmc_steps=2, seed=4, trace=path)
        lines = [json.loads(line) for line in path.read_text().splitlines()]  # closed: every line is there
        assert lines[0]["event"] == "header" and lines[-1]["event"] == "sample"
        assert lines[-1]["token_ids"] == first.tokens
        events: list[dict] = []
        (again,) = model.generate("hello", method="power", max_tokens=6, block_size=3, mcmc_steps=2, seed=4,
                                  trace=events.append)
        assert events[0]["event"] == "header" and events[-1]["event"] == "sample"
        assert events[-1]["token_ids"] == again.tokens and sum(e["event"] == "mh" for e in events) == 4
        stream = io.StringIO()
        model.generate_many(["hello", "world"], method="power", max_tokens=4, block_size=4, mcmc_steps=1, seed=1,
                            trace=stream)
        headers = [json.loads(line) for line in stream.getvalue().splitlines() if '"header"' in line[:20]]
        assert [(h["job"], h["prompt_index"]) for h in headers] == [(0, 0), (1, 1)]


@pytest.mark.parametrize("content,fragment", [
    (None, "no such trace file"),
    ("", "is not a ps-local trace"),
    ("hello\n", "is not a ps-local trace"),
    ('{"event": "mh", "job": 0}\n', "is not a ps-local trace"),
    ("[1, 2]\n", "is not a ps-local trace"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not a ps-local trace"),
    ('{"event": "header", "job": 0, "settings": {}}\nnot json\n{"event": "sample", "job": 0}\n', "line 2 is not JSON"),
    ('{"event": "header", "job": 0, "settings": {}}\n{"event": "mh", "job": 5, "chain": 0}\n', "no header line"),
    ('{"event": "header", "job": 0, "settings": {}}\n{"event": "mh", "job": 0, "chain": 0}\n', "not a valid mh event"),
], ids=["missing", "empty", "text", "no-header", "json-list", "binary", "bad-line", "unknown-job", "bad-event"])
def test_bad_trace_files_get_one_line_and_status_2(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = ps_local_cli("trace", str(path))
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ps-local: error: "), result.stderr
    assert fragment in result.stderr, result.stderr


def test_a_cut_last_line_is_skipped_with_a_note(tmp_path):
    path = write_trace(tmp_path / "t.jsonl", POWER, 2)
    text = path.read_text()
    path.write_text(text[: len(text) - 20])  # an interrupted run
    result = ps_local_cli("trace", str(path), "--no-pictures")
    assert result.returncode == 0, result.stderr
    assert "cut short" in result.stdout and "chain 1:" in result.stdout


def test_smc_and_ppt_pictures(tmp_path):
    path = tmp_path / "mixed.jsonl"
    with TraceWriter(path) as writer:
        for settings in (SMC, PPT, replace(POWER, method="greedy")):
            sample(toy(), PROMPT, settings, num_samples=2, trace=writer)
    written, notes = trace_report.write_pictures(read_trace(path), tmp_path / "out")
    assert [p.name for p in written] == ["mixed-job0.png", "mixed-job1.png"]  # greedy has nothing to draw
    assert all(p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size < 100_000 for p in written)
    text = trace_report.format_summary(summarize(read_trace(path)))
    assert "resamplings" in text and "swap acceptance per pair" in text and "job 2: greedy" in text
