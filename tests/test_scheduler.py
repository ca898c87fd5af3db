"""Continuous batching across prompts and requests, on the numpy toy (bit-for-bit claims)."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from ps_local.errors import ModelError, UserError
from ps_local.scheduler import Job, JobCancelled, Scheduler, sample
from ps_local.settings import SamplingSettings
from ps_local.toy_engine import ToyEngine

VOCAB = ["</s>"] + [f"w{k}" for k in range(12)]


def toy() -> ToyEngine:
    return ToyEngine(VOCAB, eos=0, seed=3, scale=1.5)


class RecordingEngine(ToyEngine):
    """The toy, noting which slots every decode carried."""

    def __init__(self) -> None:
        super().__init__(VOCAB, eos=0, seed=3, scale=1.5)
        self.batches: list[list[int]] = []

    def decode(self, requests):
        self.batches.append([slot for slot, _ in requests])
        return super().decode(requests)


POWER = SamplingSettings(method="power", alpha=4.0, max_tokens=12, block_size=4, mcmc_steps=3, seed=11)
WORK = [  # (prompt, settings, chains, round width)
    ([1, 2, 3], POWER, 3, 2),
    ([4, 5], replace(POWER, seed=12, alpha=2.0), 2, 1),
    ([6], replace(POWER, method="low-temp", seed=13), 2, 0),
    ([7, 8, 9, 10], replace(POWER, method="standard", seed=14, max_tokens=9), 1, 0),
]


def alone(prompt, settings, chains, width):
    return sample(toy(), prompt, settings, num_samples=chains, chains_per_batch=chains, max_round_width=max(1, width))


def same(a, b) -> bool:
    return a.tokens == b.tokens and a.logprobs == b.logprobs and a.stats.accepted == b.stats.accepted \
        and a.stats.tokens_decoded == b.stats.tokens_decoded and a.stats.moved == b.stats.moved


def jobs() -> list[Job]:
    return [Job(list(p), s, list(range(n)), w) for p, s, n, w in WORK]


@pytest.mark.parametrize("max_chains,slots,cells", [(8, 64, None), (3, 12, None), (2, 40, 60), (8, 64, 40)])
def test_mixed_batches_give_each_job_its_own_samples(max_chains, slots, cells):
    """Jobs of different prompts, methods and settings run together, within tight budgets,
    and each gets exactly the samples it gets alone; the budgets hold at every decode."""
    engine = RecordingEngine()
    scheduler = Scheduler(engine, slots=slots, max_chains=max_chains, cells=cells)
    submitted = [scheduler.submit(job) for job in jobs()]
    most_chains = most_jobs = 0
    while scheduler.pending():
        scheduler.step()
        most_chains = max(most_chains, scheduler.running_chains)
        most_jobs = max(most_jobs, len(scheduler.running_jobs()))
        scheduler.ledger.check()
    assert most_chains <= max_chains
    for job, work in zip(submitted, WORK):
        assert all(same(a, b) for a, b in zip(job.result(), alone(*work)))
    # Everything is given back once the cached prompts go: slots emptied, cells unreserved.
    scheduler.drop_prompt_cache()
    assert scheduler.ledger.free_slots == slots and scheduler.ledger.free_cells == cells
    assert not scheduler.ledger.holders()
    assert all(engine.length(slot) == 0 for slot in range(slots))
    assert most_jobs >= 2  # chains of different jobs shared decodes


def test_finished_chains_make_room_for_waiting_ones():
    """With room for two chains, five chains of one job run two at a time and a new one starts
    as soon as one ends (not when the pair has ended)."""
    engine = RecordingEngine()
    scheduler = Scheduler(engine, slots=16, max_chains=2)
    settings = replace(POWER, method="standard", max_tokens=30)
    job = scheduler.submit(Job([1], settings, list(range(5)), 0))
    together = []  # the chains each decode carried
    plain_decode = engine.decode
    engine.decode = lambda requests: together.append({r.index for r in scheduler._running}) or plain_decode(requests)
    while scheduler.pending():
        scheduler.step()
    assert max(len(running) for running in together) == 2
    # Batches of two in turn would only ever run {0, 1}, {2, 3}, {4} together.
    assert any(not (running <= {0, 1} or running <= {2, 3} or running <= {4}) for running in together)
    assert all(same(a, b) for a, b in zip(job.result(), sample(toy(), [1], settings, 5, chains_per_batch=5)))


def test_a_cancelled_job_frees_its_slots_and_the_rest_go_on():
    engine = toy()
    scheduler = Scheduler(engine, slots=40, max_chains=8)
    first, second = scheduler.submit(jobs()[0]), scheduler.submit(jobs()[1])
    for _ in range(3):
        scheduler.step()
    first.cancel()
    while scheduler.pending():
        scheduler.step()
    with pytest.raises(JobCancelled):
        first.result()
    assert all(same(a, b) for a, b in zip(second.result(), alone(*WORK[1])))
    scheduler.drop_prompt_cache()
    assert scheduler.ledger.free_slots == 40 and not scheduler.ledger.holders()


def test_a_failing_job_does_not_take_the_others_down():
    class NanForPrompt(ToyEngine):
        def logits(self, prefix):
            row = super().logits(prefix)
            return np.full_like(row, np.nan) if prefix[:1] == [6] and len(prefix) > 3 else row

    engine = NanForPrompt(VOCAB, eos=0, seed=3, scale=1.5)
    scheduler = Scheduler(engine, slots=64, max_chains=8)
    submitted = [scheduler.submit(job) for job in jobs()]
    while scheduler.pending():
        scheduler.step()
    with pytest.raises(ModelError):
        submitted[2].result()
    for index in (0, 1, 3):
        assert all(same(a, b) for a, b in zip(submitted[index].result(), alone(*WORK[index])))


def test_a_job_that_can_never_fit_is_refused_at_submit():
    scheduler = Scheduler(toy(), slots=64, max_chains=8, cells=20)
    with pytest.raises(UserError, match="KV cells"):
        scheduler.submit(Job([1, 2], replace(POWER, max_tokens=30), [0], 1))
    scheduler = Scheduler(toy(), slots=3, max_chains=8)
    with pytest.raises(UserError, match="sequences"):
        scheduler.submit(Job([1, 2], POWER, [0], 4))


def test_jobs_submitted_from_other_threads_while_it_runs():
    """A serving thread steps; eight client threads submit as they like: each gets its samples."""
    scheduler = Scheduler(toy(), slots=64, max_chains=6, cells=400)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not scheduler.step():
                scheduler.wait_for_work(0.01)

    server = threading.Thread(target=serve)
    server.start()
    results: dict[int, list] = {}

    def client(number: int) -> None:
        prompt, settings, chains, width = WORK[number % len(WORK)]
        settings = replace(settings, seed=100 + number)
        job = scheduler.submit(Job(list(prompt), settings, list(range(chains)), width))
        results[number] = [job.result(timeout=60), alone(prompt, settings, chains, width)]

    clients = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    stop.set()
    scheduler.wake()
    server.join()
    assert sorted(results) == list(range(8))
    for got, expected in results.values():
        assert all(same(a, b) for a, b in zip(got, expected))


def test_an_interrupted_run_leaves_the_scheduler_empty_and_usable():
    engine = toy()
    scheduler = Scheduler(engine, slots=40, max_chains=8)

    def interrupt(index, sample):
        raise KeyboardInterrupt

    job = scheduler.submit(Job([1, 2, 3], POWER, [0, 1], 1, on_sample=interrupt))
    with pytest.raises(KeyboardInterrupt):
        scheduler.run_until_done([job])
    assert job.done.is_set() and isinstance(job.error, KeyboardInterrupt)
    again = scheduler.submit(jobs()[0])
    scheduler.run_until_done([again])
    assert all(same(a, b) for a, b in zip(again.result(), alone(*WORK[0])))


def test_a_chain_that_needs_no_decode_still_returns_to_the_scheduler(monkeypatch):
    """One-token blocks with many MH steps draw their proposals from stored tables, without a
    decode: the chain still pauses now and then, so a cancellation takes effect at once, and the
    pauses change nothing in its samples."""
    settings = replace(POWER, block_size=1, mcmc_steps=4000, max_tokens=3)
    engine = toy()
    scheduler = Scheduler(engine, slots=8, max_chains=1)
    job = scheduler.submit(Job([1], settings, [0], 1))
    steps = 0
    while not job.done.is_set():
        scheduler.step()
        steps += 1
        if steps == 5:
            job.cancel()
        assert steps < 20
    with pytest.raises(JobCancelled):
        job.result()
    quick = replace(settings, mcmc_steps=200)
    (paused,) = sample(toy(), [1], quick)
    monkeypatch.setattr("ps_local.samplers.mh.PAUSE_EVERY", 10**9)
    (unpaused,) = sample(toy(), [1], quick)
    assert same(paused, unpaused) and paused.logprobs == unpaused.logprobs


def test_requests_that_share_a_prompt_prefix_decode_it_once():
    """The same prompt again, and a prompt that extends it (a shared system prompt), copy the
    cached cells: only what differs is decoded, and the samples are the ones drawn alone."""
    engine = RecordingEngine()
    decoded_prompts = []
    plain = engine.decode

    def decode(requests):
        decoded_prompts.extend(len(tokens) for slot, tokens in requests if slot in prompt_slots())
        return plain(requests)

    scheduler = Scheduler(engine, slots=64, max_chains=8, cells=400)
    prompt_slots = lambda: {a.prompt_slot for a in scheduler._queue}  # noqa: E731
    engine.decode = decode
    base = [1, 2, 3, 4, 5, 6]
    first = scheduler.submit(Job(base, POWER, [0, 1], 1))
    scheduler.run_until_done([first])
    again = scheduler.submit(Job(list(base), replace(POWER, seed=21), [0], 1))
    longer = scheduler.submit(Job(base + [7, 8], replace(POWER, seed=22), [0], 1))
    scheduler.run_until_done([again, longer])
    assert decoded_prompts == [6, 1, 2]  # in full once; then only the last token, and the new two
    assert all(same(a, b) for a, b in zip(again.result(), alone(base, replace(POWER, seed=21), 1, 1)))
    assert all(same(a, b) for a, b in zip(longer.result(), alone(base + [7, 8], replace(POWER, seed=22), 1, 1)))


def test_cached_prompts_give_way_to_new_work():
    """A cell budget that fits one job: cached prompts are dropped to admit the next, nothing
    waits forever, and the budget holds at every step."""
    settings = replace(POWER, max_tokens=6)
    scheduler = Scheduler(toy(), slots=64, max_chains=8, cells=40)
    jobs = [scheduler.submit(Job([1 + k, 2, 3], replace(settings, seed=k), [0], 1)) for k in range(6)]
    while scheduler.pending():
        scheduler.step()
        scheduler.ledger.check()
        assert len(scheduler.cache) <= 4
    for k, job in enumerate(jobs):
        assert all(same(a, b) for a, b in zip(job.result(), alone([1 + k, 2, 3], replace(settings, seed=k), 1, 1)))


def test_requests_arriving_together_with_one_prompt_decode_it_once():
    engine = RecordingEngine()
    scheduler = Scheduler(engine, slots=64, max_chains=8)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    jobs = [scheduler.submit(Job(list(prompt), replace(POWER, seed=30 + k), [0], 1)) for k in range(3)]
    scheduler.run_until_done(jobs)
    assert engine.tokens_decoded - sum(j.result()[0].stats.tokens_decoded for j in jobs) == len(prompt) + 2
    for k, job in enumerate(jobs):
        assert same(job.result()[0], alone(prompt, replace(POWER, seed=30 + k), 1, 1)[0])
