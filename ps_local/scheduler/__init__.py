"""Continuous batching: many requests' chains in one decode (see scheduler.py).

    ledger.py        who holds every KV slot and cell (a cell is free when its last holder lets go)
    prompt_cache.py  recent prompts kept in their slots for later requests to copy
    admission.py     the pure planning step: which prompts decode and which chains start now
    scheduler.py     jobs, and the stepping loop that carries out each plan around one decode
"""

from .scheduler import Job, JobCancelled, SampleCallback, Scheduler, random_seed, sample

__all__ = ["Job", "JobCancelled", "SampleCallback", "Scheduler", "random_seed", "sample"]
