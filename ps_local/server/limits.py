"""Per-request limits of the server, checked before anything is queued.

One request can ask for far more work than a shared server should take on: MH on p^alpha
regenerates up to the whole sequence so far at every step, so ``block_size`` 1 with 4096 tokens
and 10 steps per block decodes some 84 million tokens. Such a request would hold its chain
slots for hours while everyone else waits, so it is refused up front with 400 and the reason.
The defaults accept the paper's settings (alpha 4, block_size 192, mcmc_steps 10) over a whole
4096-token context for up to 8 samples; ``ps-local serve --max-...`` changes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..settings import SamplingSettings


@dataclass(frozen=True)
class RequestLimits:
    max_n: int = 64  # samples (chains) per request
    max_mcmc_steps: int = 100  # MH steps per block (power, ppt)
    max_particle_tokens: int = 262_144  # smc: particles x max_tokens, the KV cells of one chain (64 x 4096)
    max_work_tokens: int = 4_000_000  # worst-case decoded tokens of the whole request (work_tokens x n)


@dataclass(frozen=True)
class Refusal:
    """Why a request exceeds a limit: the field to change and a message in the API's words."""

    param: str | None  # None: no one field (the work of several together)
    message: str


def sample_work_tokens(settings: SamplingSettings, max_tokens: int) -> int:
    """Worst-case tokens decoded for one sample of ``max_tokens`` tokens.

    MH (power, and each replica of ppt): every step of block b may regenerate the whole
    sequence so far, b x B tokens, on top of the T tokens the blocks add. SMC decodes every
    particle to the end. The baselines decode T.
    """
    if settings.steps_per_block:
        block = settings.block_size
        blocks = math.ceil(max_tokens / block)
        ends = [min(b * block, max_tokens) for b in range(1, blocks + 1)]
        regenerated = sum(settings.block_steps(end) * end for end in ends)
        replicas = len(settings.power_ladder) if settings.method == "ppt" else 1
        pilot = settings.ladder_warmup * ends[0] if settings.method == "ppt" else 0  # the discarded pilot
        return replicas * (regenerated + pilot + max_tokens)
    if settings.method == "smc":
        # Rejuvenation: after any token t every particle may take K moves regenerating up to t tokens.
        moves = settings.smc_rejuvenate * max_tokens * (max_tokens + 1) // 2
        return settings.particle_count * (max_tokens + moves)
    return max_tokens


def most_particles(settings: SamplingSettings, tokens: int, limits: RequestLimits) -> int:
    """The most SMC particles a request of up to ``tokens`` tokens may have within
    max_particle_tokens (each takes two sequences with rejuvenate): a request that names no
    ``particles`` gets no more than this, rather than a refusal for a field it did not send."""
    return max(1, limits.max_particle_tokens // (settings.sequences_per_particle * max(1, tokens)))


def check_limits(settings: SamplingSettings, n: int, limits: RequestLimits, ctx: int) -> Refusal | None:
    """The first limit ``n`` samples of ``settings`` exceed, or None. ``ctx`` is the server's
    tokens per request: a request without ``max_tokens`` may generate up to that many, and one
    that asks for more is refused later for not fitting it (a clearer message than this)."""
    if n > limits.max_n:
        return Refusal("n", f"n must be at most {limits.max_n} on this server, got {n}")
    if settings.steps_per_block and settings.mcmc_steps > limits.max_mcmc_steps:
        return Refusal("mcmc_steps", f"mcmc_steps must be at most {limits.max_mcmc_steps} on this server, "
                                     f"got {settings.mcmc_steps}")
    tokens = min(settings.max_tokens or ctx, ctx)
    steps = settings.block_steps(min(settings.block_size, tokens))
    if settings.steps_per_block and settings.steps_per_token and steps > limits.max_mcmc_steps:
        return Refusal("steps_per_token", f"steps_per_token x block length ({settings.steps_per_token:g} x "
                                          f"{min(settings.block_size, tokens)}) must be at most "
                                          f"{limits.max_mcmc_steps} MH steps per block on this server")
    sequences = settings.particle_count * settings.sequences_per_particle
    if settings.method == "smc" and sequences * tokens > limits.max_particle_tokens:
        doubled = "; twice the particles with rejuvenate" if settings.smc_rejuvenate else ""
        return Refusal("particles", f"particles x max_tokens ({sequences} x {tokens}{doubled}) must be at most "
                                    f"{limits.max_particle_tokens:,} on this server")
    work = n * sample_work_tokens(settings, tokens)
    if work > limits.max_work_tokens:
        levers = "a larger block_size, fewer mcmc_steps, " if settings.steps_per_block else ""
        levers += "fewer particles, " if settings.method == "smc" else ""
        samples = f"{n} sample{'s' if n > 1 else ''}"
        return Refusal(None, f"this request may decode up to {work:,} tokens ({samples} of up to {tokens} tokens, "
                             f"{settings.method}), more than this server's limit of {limits.max_work_tokens:,}; "
                             f"ask for {levers}a smaller max_tokens or n")
    return None
