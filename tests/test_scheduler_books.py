"""The scheduler's books against a model of llama.cpp's unified KV cache (tests/kv_cache_model.py).

A seeded randomized property test mixes every method, shared prompt prefixes, arrivals in the
same step, cancellations, failing jobs and tight budgets, and checks after every step that no
slot is held twice, that the cells the cache physically holds never exceed what the ledger has
reserved, that nothing deadlocks, that every job ends within a bound of steps and that each
job's samples are the ones it draws alone. Then the review's two findings, as regressions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest

from kv_cache_model import KvModelEngine
from ps_local.errors import ModelError
from ps_local.scheduler import Job, JobCancelled, Scheduler, sample
from ps_local.scheduler.admission import Waiting, plan_admission
from ps_local.scheduler.ledger import KvLedger, LedgerError
from ps_local.scheduler.prompt_cache import PromptCache
from ps_local.settings import SamplingSettings
from ps_local.toy_engine import ToyEngine

VOCAB = ["</s>"] + [f"w{k}" for k in range(12)]
NAN_PREFIX = [12, 12]  # prompts that start so make the model return NaN logits mid-chain
TRIALS = 300


def toy() -> ToyEngine:
    return ToyEngine(VOCAB, eos=0, seed=3, scale=1.5)


def engine_with(capacity: int) -> KvModelEngine:
    return KvModelEngine(VOCAB, eos=0, capacity=capacity, seed=3, scale=1.5, nan_prefix=NAN_PREFIX)


def same(a, b) -> bool:
    return a.tokens == b.tokens and a.logprobs == b.logprobs and a.stats.accepted == b.stats.accepted \
        and a.stats.tokens_decoded == b.stats.tokens_decoded


def alone(job: Job) -> tuple[list, int]:
    """The job's samples run alone on a roomy toy, and the steps that took."""
    engine = toy()
    scheduler = Scheduler(engine, slots=1 + job.slots_per_chain * len(job.chain_indices),
                          max_chains=len(job.chain_indices))
    twin = scheduler.submit(Job(list(job.prompt), job.settings, list(job.chain_indices), job.round_width))
    steps = 0
    while not twin.done.is_set():
        scheduler.step()
        steps += 1
    return twin.result(), steps


@dataclass
class Arrival:
    step: int
    job: Job
    cancel_at: int | None  # the step at which the client goes away
    fails: bool  # its model output breaks (NaN logits) or its on_sample raises


def random_settings(rng: random.Random, seed: int) -> tuple[SamplingSettings, int, int]:
    """(settings, chains, round width) of one random request."""
    method = rng.choice(["power", "smc", "ppt", "low-temp", "standard", "greedy"])
    settings = SamplingSettings(method=method, alpha=rng.choice([2.0, 4.0]), max_tokens=rng.randint(2, 7),
                                block_size=rng.randint(1, 4), mcmc_steps=rng.randint(1, 3), seed=seed,
                                particles=rng.randint(2, 4), ladder=(1.0, 2.0) if method == "ppt" else None)
    if method == "ppt":
        settings = replace(settings, alpha=2.0, swap_every=rng.choice([1, 2]), ladder_warmup=rng.choice([0, 0, 2]))
    if method == "smc":  # resample-move: a spare slot per particle, swapped with it on every accepted move
        settings = replace(settings, smc_rejuvenate=rng.choice([0, 1, 2]))
    width = rng.randint(1, 2) if method in ("power", "ppt") else 0
    return settings, rng.randint(1, 3), width


def random_prompt(rng: random.Random, bases: list[list[int]]) -> list[int]:
    """Prompts that often share prefixes: a common base, cut or extended."""
    base = rng.choice(bases)
    cut = rng.randint(1, len(base))
    return base[:cut] + [rng.randint(1, 11) for _ in range(rng.choice([0, 0, 1, 3, 6]))]


def broken_callback(index, sample) -> None:
    raise RuntimeError("the client's callback broke")


def random_arrivals(rng: random.Random) -> list[Arrival]:
    bases = [[rng.randint(1, 11) for _ in range(rng.randint(2, 9))] for _ in range(3)]
    arrivals, step = [], 0
    for number in range(rng.randint(3, 8)):
        step += rng.choice([0, 0, 0, 1, 2, 5])  # often several arrive in one step
        settings, chains, width = random_settings(rng, seed=1000 + number)
        prompt = random_prompt(rng, bases)
        fails = rng.random() < 0.15
        on_sample = None
        if fails and rng.random() < 0.5:
            prompt = NAN_PREFIX + prompt
        elif fails:
            on_sample = broken_callback
        cancel_at = step + rng.randint(0, 12) if rng.random() < 0.2 else None
        arrivals.append(Arrival(step, Job(prompt, settings, list(range(chains)), width, on_sample=on_sample),
                                cancel_at, fails))
    return arrivals


def check_books(scheduler: Scheduler, engine: KvModelEngine) -> None:
    ledger = scheduler.ledger
    ledger.check()  # slots held once each, segment counts, nothing over-committed
    engine.check()  # every slot holds its positions in one cell each
    assert engine.kv.used() <= ledger.used_cells, "the cache holds cells no one reserved"
    for slot in range(scheduler.slots):
        if engine.length(slot):
            assert ledger.holder_of(slot) is not None, f"slot {slot} holds cells but no holder"


@pytest.mark.parametrize("trial", range(TRIALS))
def test_books_hold_at_every_step_under_random_load(trial):
    rng = random.Random(trial)
    arrivals = random_arrivals(rng)
    needs = [(1 + a.job.slots_per_chain, a.job.prompt_cells + a.job.chain_cells) for a in arrivals]
    # Tight budgets: from just enough for the largest job to a little more.
    slots = max(n for n, _ in needs) + rng.randint(0, 6)
    cells = max(c for _, c in needs) + rng.choice([0, 0, 3, 10, 40])
    engine = engine_with(cells)
    scheduler = Scheduler(engine, slots=slots, max_chains=rng.randint(1, 5), cells=cells)
    expected = {id(a.job): alone(a.job) for a in arrivals if not a.fails and a.cancel_at is None}
    bound = sum(steps * len(a.job.chain_indices) + 3 for a in arrivals if id(a.job) in expected for steps in
                [expected[id(a.job)][1]]) + sum(60 for a in arrivals if id(a.job) not in expected) \
        + arrivals[-1].step + 5
    step = 0
    while step <= arrivals[-1].step or scheduler.pending():
        for arrival in arrivals:
            if arrival.step == step:
                scheduler.submit(arrival.job)
            if arrival.cancel_at == step:
                arrival.job.cancel()
        worked = scheduler.step()
        assert worked or not scheduler.pending(), f"deadlock at step {step}: work waits and nothing runs"
        check_books(scheduler, engine)
        step += 1
        assert step <= bound, "a job did not end within its bound of steps"
    for arrival in arrivals:
        job = arrival.job
        assert job.done.is_set()
        if id(job) in expected:
            assert job.error is None, job.error
            assert all(same(a, b) for a, b in zip(job.result(), expected[id(job)][0]))
        elif arrival.fails:
            assert job.error is not None and not isinstance(job.error, JobCancelled) or arrival.cancel_at is not None
    scheduler.drop_prompt_cache()
    assert not scheduler.ledger.holders() and scheduler.ledger.free_cells == cells
    assert scheduler.ledger.free_slots == slots and engine.kv.used() == 0


# -- the review's findings, as regressions ----------------------------------------------------------


def deferred_prompt_jobs() -> list[Job]:
    """A (a short prompt) and B (A's prompt and 20 more tokens) arrive together, so B's prompt
    waits a step to copy A's; C's long prompt arrives in the same step. Room for B's prompt must
    be kept: had C's prompt taken it, B could never fit beside C, and C waits behind B."""
    settings = SamplingSettings(method="standard", max_tokens=2, seed=5)
    first = [1, 2, 3]
    return [Job(first, settings, [0]),
            Job(first + [4 + k % 8 for k in range(20)], replace(settings, seed=6), [0]),
            Job([9] * 10, replace(settings, seed=7), [0])]


def test_a_deferred_prompt_keeps_its_room_on_the_toy():
    """Finding 1 (deadlock): 30 cells fit C's prompt beside A's and every chain, but not
    B's prompt then."""
    engine = engine_with(30)
    scheduler = Scheduler(engine, slots=16, max_chains=8, cells=30)
    jobs = [scheduler.submit(job) for job in deferred_prompt_jobs()]
    for _ in range(200):
        if not scheduler.pending():
            break
        assert scheduler.step() or not scheduler.pending(), "deadlock: work waits and nothing runs"
        check_books(scheduler, engine)
    assert all(job.done.is_set() and job.error is None for job in jobs)
    for job in jobs:
        assert same(job.result()[0], alone(job)[0][0])


def long_prompt_then_newcomer(seed: int) -> tuple[Job, Job]:
    """A's long prompt joins the prompt cache once its chain starts, while the chain runs on
    holding those cells; B then needs room that only dropping A's entry seems to give."""
    settings = SamplingSettings(method="standard", max_tokens=8, seed=seed)
    return Job([1 + k % 11 for k in range(12)], settings, [0]), Job([5, 6, 7], replace(settings, seed=seed + 100), [0])


@pytest.mark.parametrize("seed", [4, 5, 6, 9])  # seeds whose chains run long: the old books overflowed the cache
def test_dropping_a_cached_prompt_frees_only_cells_no_one_holds(seed):
    """Finding 2: dropping A's cache entry gives back no cell while A's chain holds them, so B
    waits for A instead of overflowing the cache (which failed every job in flight)."""
    first, second = long_prompt_then_newcomer(seed)
    cells = first.prompt_cells + first.chain_cells + 4  # B fits beside A's chain only if A's prompt is gone
    engine = engine_with(cells)
    scheduler = Scheduler(engine, slots=16, max_chains=8, cells=cells)
    scheduler.submit(first)
    while not scheduler.running_chains:
        scheduler.step()
    scheduler.submit(second)
    while scheduler.pending():
        assert scheduler.step() or not scheduler.pending()
        check_books(scheduler, engine)
    assert first.error is None and second.error is None
    assert same(first.result()[0], alone(first)[0][0]) and same(second.result()[0], alone(second)[0][0])


# -- the pieces on their own ---------------------------------------------------------------------


def test_a_shared_prefix_outlives_the_prompt_it_was_copied_from():
    ledger = KvLedger(slots=8, cells=100)
    ledger.add_prompt("a", 10)
    ledger.add_prompt("b", 14, source="a", shared=6)  # splits a's segment at 6
    ledger.share_prompt("chain of b", "b")
    assert ledger.used_cells == 18
    ledger.release("a")
    assert ledger.used_cells == 14  # a's last 4 cells are gone; the 6 it shares with b stay
    ledger.release("b")
    assert ledger.used_cells == 14  # the chain still holds all of b's
    ledger.check()
    ledger.release("chain of b")
    assert ledger.used_cells == 0 and not ledger.holders()
    ledger.check()


def test_the_ledger_refuses_what_the_cache_could_not_do():
    ledger = KvLedger(slots=2, cells=10)
    ledger.take_slots("a", 2)
    with pytest.raises(LedgerError):
        ledger.take_slots("b", 1)
    with pytest.raises(LedgerError):
        ledger.add_prompt("b", 5, source="nobody", shared=3)
    ledger.add_prompt("c", 4)
    with pytest.raises(LedgerError):
        ledger.add_prompt("d", 8, source="c", shared=6)  # c holds only 4
    ledger.reserve("e", 7)
    with pytest.raises(LedgerError, match="over-committed"):
        ledger.check()


def test_admission_is_a_plan_that_leaves_its_inputs_alone():
    """The planner works on copies: the scheduler's books change only when it adopts a plan."""
    ledger, cache = KvLedger(slots=8, cells=40), PromptCache()
    waiting = [Waiting(0, (1, 2, 3), 2, 10, 2, 0, False), Waiting(1, (1, 2, 3, 4), 2, 10, 1, 0, False)]
    plan = plan_admission(waiting, ledger, cache, running=0, max_chains=4)
    assert not ledger.holders() and len(cache) == 0
    assert [type(action).__name__ for action in plan.actions] == ["DecodePrompt"]  # job 1 copies from 0 next step
    plan.ledger.check()
    assert plan.ledger.free_slots == 7 and plan.ledger.free_cells == 37


def test_a_job_that_fails_as_its_chain_starts_leaves_clean_books():
    engine = engine_with(200)
    scheduler = Scheduler(engine, slots=16, max_chains=4, cells=200)
    settings = SamplingSettings(method="standard", max_tokens=4, seed=1)
    broken = scheduler.submit(Job(NAN_PREFIX + [3], settings, [0, 1]))
    fine = scheduler.submit(Job([3, 4], replace(settings, seed=2), [0]))
    while scheduler.pending():
        scheduler.step()
        check_books(scheduler, engine)
    with pytest.raises(ModelError):
        broken.result()
    assert same(fine.result()[0], sample(toy(), [3, 4], replace(settings, seed=2))[0])


# -- the findings through llama.cpp, whose cache is as hard as the model's ------------------------

LLAMA_CELLS = 256  # llama.cpp allocates exactly this (a multiple of its padding): no slack


@pytest.fixture(scope="module")
def flat_gguf(tmp_path_factory):
    """Flat over 300 words: sequences rarely end early, so chains use their whole budget."""
    from conftest import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("flat") / "flat.gguf", "--extra-words", "300",
                            "--logit-scale", "0.05")


@pytest.fixture()
def llama_engine(flat_gguf):
    from ps_local.engine import LlamaEngine

    with LlamaEngine(flat_gguf, n_threads=2) as engine:
        engine.allocate(LLAMA_CELLS, 16)
        assert engine.n_ctx == LLAMA_CELLS
        yield engine


def words(engine, count: int, offset: int = 0) -> list[int]:
    """``count`` prompt tokens of the model's generated words."""
    first = engine.n_vocab - 300
    return [first + (offset + 7 * k) % 300 for k in range(count)]


def run_to_the_end(scheduler: Scheduler, jobs: list[Job], limit: int = 2000) -> None:
    for _ in range(limit):
        if not scheduler.pending():
            return
        assert scheduler.step() or not scheduler.pending(), "deadlock: work waits and nothing runs"
        scheduler.ledger.check()
    raise AssertionError("the jobs did not end")


def test_a_deferred_prompt_keeps_its_room_through_llama_cpp(llama_engine):
    settings = SamplingSettings(method="standard", max_tokens=2, seed=5)
    first = words(llama_engine, 10)
    jobs = [Job(first, settings, [0]), Job(first + words(llama_engine, 150, 3), replace(settings, seed=6), [0]),
            Job(words(llama_engine, 100, 5), replace(settings, seed=7), [0])]
    scheduler = Scheduler(llama_engine, slots=16, max_chains=8, cells=LLAMA_CELLS)
    for job in jobs:
        scheduler.submit(job)
    run_to_the_end(scheduler, jobs)
    assert all(job.error is None and len(job.result()) == 1 for job in jobs)


@pytest.mark.parametrize("seed", [2, 3, 4])  # both chains run long: the old books failed all three
def test_a_dropped_cached_prompt_does_not_overflow_llama_cpp(llama_engine, seed):
    """Finding 2 through llama.cpp: the old books let B in beside A's chain, and the decode
    that overflowed the cache failed both jobs."""
    settings = SamplingSettings(method="standard", max_tokens=120, seed=seed)
    first = Job(words(llama_engine, 100), settings, [0])
    second = Job(words(llama_engine, 10, 11), replace(settings, seed=seed + 100), [0])
    scheduler = Scheduler(llama_engine, slots=16, max_chains=8, cells=LLAMA_CELLS)
    scheduler.submit(first)
    while not scheduler.running_chains:
        scheduler.step()
    scheduler.submit(second)
    run_to_the_end(scheduler, [first, second])
    assert first.error is None and second.error is None
    assert len(first.result()[0].tokens) + len(second.result()[0].tokens) > LLAMA_CELLS - 110  # they ran long


def test_a_waiting_job_keeps_its_own_logits_row_not_the_whole_step():
    """Finding 3: a job whose prompt was decoded but whose chains wait keeps a copy of its row;
    a view would pin the step's whole logits array (26 MB on a 262k vocabulary) per job."""
    engine = engine_with(400)
    scheduler = Scheduler(engine, slots=32, max_chains=1, cells=400)
    settings = SamplingSettings(method="standard", max_tokens=6, seed=1)
    first = scheduler.submit(Job([1, 2], settings, [0]))
    second = scheduler.submit(Job([3, 4], replace(settings, seed=2), [0]))
    scheduler.step()
    scheduler.step()
    waiting = [admission for admission in scheduler._queue if admission.job is second]
    assert waiting and waiting[0].prompt_logits is not None and not first.done.is_set()
    assert waiting[0].prompt_logits.base is None and waiting[0].prompt_logits.shape == (engine.n_vocab,)
