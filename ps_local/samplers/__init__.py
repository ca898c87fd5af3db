"""The samplers: pure logic over the engine protocol (``ps_local.protocol``).

Each sampler run is a generator that yields decode requests and receives logits rows (see
``base.ChainRun``), so the scheduler advances the runs of many requests in one batched decode.

    base.py      what every sampler shares: the run protocol, progress, how a sequence ends
    proposal.py  one token from raw logits: the draw, its log p and weight, the position's table
    streams.py   one random stream per (run, step): samples that do not depend on the batch
    stops.py     stop strings, absorbing ends like EOS
    mh.py        block-wise Metropolis-Hastings (Algorithm 1) and the plain-decoding baselines
    smc.py       Power-SMC: particles, weights, systematic resampling, MH rejuvenation (resample-move)
    ppt.py       parallel power tempering: MH replicas on a ladder of alphas, with swaps
"""

from __future__ import annotations

from ..settings import SamplingSettings
from .mh import Chain
from .ppt import PptRun
from .smc import SmcRun

RUNS = {"smc": SmcRun, "ppt": PptRun}  # every other method is a Chain (MH, or a plain decode for the baselines)


def run_class(settings: SamplingSettings) -> type:
    """The class whose ``run()`` draws one sample with these settings."""
    return RUNS.get(settings.method, Chain)


def slots_per_chain(settings: SamplingSettings, max_round_width: int) -> int:
    """Engine slots one run uses: a chain's sequence plus one per proposal in a round (for each
    PPT replica); one per SMC particle, two with rejuvenation (a spare for its MH moves)."""
    if settings.method == "smc":
        return settings.particle_count * settings.sequences_per_particle
    if settings.method == "ppt":
        return len(settings.power_ladder) * (1 + max_round_width)
    return 1 + max_round_width if settings.steps_per_block else 1
