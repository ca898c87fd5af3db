"""Sampling settings and the results a sampler returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .errors import UserError

METHODS = ("power", "smc", "ppt", "low-temp", "standard", "greedy")
# What ps-local samples with when no method is named (CLI, API, server, chat): Power-SMC, which
# scripts/convergence.py measured nearest p^alpha per token decoded (README: How far from p^alpha).
DEFAULT_METHOD = "smc"
# Particles when none are asked for: DEFAULT_PARTICLES, fewer where their KV cache (one sequence
# of max_tokens cells each) would pass SMC_KV_BUDGET bytes, but never fewer than MIN_DEFAULT_PARTICLES.
DEFAULT_PARTICLES = 128
MIN_DEFAULT_PARTICLES = 16
SMC_KV_BUDGET = 2 << 30
PPT_REPLICAS = 4  # rungs of the default ladder (gains saturate around 4-5 in the PPT paper)
DEFAULT_MAX_TOKENS = 3072
TABLE_SIZE = 256  # most tokens a proposal table keeps (samplers/proposal.py)
# The proposal tempers float32 logits: exp((logit - max) * float32(1 / tau)), tau = 1/alpha
# unless set. 1/tau past float32's 3.4e38 (tau < 2.9e-39, alpha > 3.4e38) is inf, and the
# top token's 0 * inf is NaN: every weight NaN (IndexError in power and ppt, ValueError in smc).
# 1/tau = 0 (tau > 1.4e45) makes a -inf logit's weight NaN. These bounds keep 1/tau a normal
# float32 with eight orders of magnitude to spare, so that (logit - max) / tau also stays
# finite for logit gaps up to 3e8 (alpha = 1e38 still samples, but numpy warns of overflow on
# stderr). At the bounds the draws are greedy's (tau = 1e-30) or uniform (tau = 1e30), as they
# should be (tests/test_settings.py).
MAX_ALPHA = 1e30
# With --rejuvenate each SMC particle takes two sequences (its own and one for its MH moves);
# llama.cpp holds 256 in one context, one of which keeps the prompt.
MAX_REJUVENATED_PARTICLES = 127
MIN_TEMP = 1e-30
MAX_TEMP = 1e30


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that decides how one sample is drawn.

    ``method`` picks the sampler: ``power`` is block-wise Metropolis-Hastings on p^alpha,
    ``smc`` Power-SMC and ``ppt`` parallel power tempering, all of the same target; the others
    are the baselines of the paper (plain decoding at temperature 1, 1/alpha, 0).
    """

    method: str = "power"
    alpha: float = 4.0
    block_size: int = 192
    mcmc_steps: int = 10
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, shrunk to what the context fits
    proposal_temp: float | None = None  # None: 1/alpha (1.0 when alpha is inf)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Power-SMC (method "smc"): particles, and resampling when ESS < ess_threshold * particles,
    # checked every smc_check_every tokens.
    particles: int | None = None  # None: default_particles() for the model and max_tokens
    ess_threshold: float = 0.5
    smc_check_every: int = 1
    # The SMC alpha-ramp: alpha rises from 1 to alpha over the first smc_ramp tokens (0: none).
    smc_ramp: int = 0
    # Resample-move SMC: after each resampling, every particle takes this many MH moves on the
    # intermediate target p^alpha over its first t tokens (0: none).
    smc_rejuvenate: int = 0
    # Parallel power tempering (method "ppt"): the replicas' alphas, rising to alpha; None: a
    # geometric ladder of PPT_REPLICAS rungs from 1.
    ladder: tuple[float, ...] | None = None
    # PPT: a swap sweep after every swap_every MH steps of the replicas (and after each block's last).
    swap_every: int = 1
    # PPT: MH steps of a discarded pilot run whose replicas' log p place the ladder for the
    # sequence length (0: the ladder as given, or geometric).
    ladder_warmup: int = 0
    # MH (power, ppt): each block takes max(mcmc_steps, ceil(steps_per_token * n)) MH steps, n the
    # sequence's length after the block's extension (0: mcmc_steps).
    steps_per_token: float = 0.0
    # Speed switches that leave the output distribution unchanged; the benchmark turns them
    # off to measure the plain sequential chain.
    early_rejection: bool = True
    reuse_tables: bool = True
    table_size: int = TABLE_SIZE  # most tokens a reused table keeps (tests shrink it to 1)
    # SMC particles that hold one same sequence share one batch entry per decoded token.
    smc_shared_decode: bool = True
    # SMC at tau = 1/alpha: a token's weight is known before it is drawn, so resample first
    # and let the copies draw their own next tokens.
    smc_resample_first: bool = True
    # Only the exactness tests switch this off, to show that dropping log n - log n'
    # (as the reference code does) biases the chain.
    length_term: bool = True
    # Only the SMC negative-control test switches this off: particles then go unweighted.
    smc_weights: bool = True
    # Only the PPT negative-control test switches this off: every swap is then accepted.
    swap_correction: bool = True

    def validate(self) -> None:
        """Raise ValueError with a one-line message for any setting that makes no sense."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (1 <= self.alpha <= MAX_ALPHA or self.alpha == math.inf):
            raise ValueError(f"--alpha must be a number >= 1 and <= {MAX_ALPHA:g}, or inf, got {self.alpha}")
        for name, value in (("--block-size", self.block_size), ("--max-tokens", self.max_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.mcmc_steps < 0:
            raise ValueError(f"--mcmc-steps must be >= 0, got {self.mcmc_steps}")
        if self.proposal_temp is not None and not MIN_TEMP <= self.proposal_temp <= MAX_TEMP:
            raise ValueError(f"--proposal-temp must be a number >= {MIN_TEMP:g} and <= {MAX_TEMP:g}, "
                             f"got {self.proposal_temp}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be an integer from 0 to 2^63 - 1, got {self.seed}")
        if self.table_size < 1:
            raise ValueError(f"table_size must be >= 1, got {self.table_size}")
        if self.method in ("smc", "ppt") and math.isinf(self.alpha):
            raise ValueError(f"--method {self.method} needs a finite --alpha (max-swap is --method power --alpha inf)")
        if self.smc_rejuvenate < 0:
            raise ValueError(f"--rejuvenate must be a number of MH moves >= 0, got {self.smc_rejuvenate}")
        if self.swap_every < 1:
            raise ValueError(f"--swap-every must be a positive integer, got {self.swap_every}")
        if self.ladder_warmup < 0:
            raise ValueError(f"--ladder-warmup must be a number of MH steps >= 0, got {self.ladder_warmup}")
        if not (0 <= self.steps_per_token <= 1000):
            raise ValueError(f"--steps-per-token must be a number from 0 to 1000, got {self.steps_per_token}")
        if self.smc_ramp < 0:
            raise ValueError(f"--alpha-ramp must be a number of tokens >= 0, got {self.smc_ramp}")
        if self.method == "ppt":
            self._validate_ladder()
        if self.particles is not None and not 1 <= self.particles <= 255:
            raise ValueError(f"--particles must be from 1 to 255, got {self.particles}")
        if self.method == "smc" and self.smc_rejuvenate > 0:
            self._validate_rejuvenation()
        if not 0 <= self.ess_threshold <= 1:
            raise ValueError(f"--ess-threshold must be from 0 to 1, got {self.ess_threshold}")
        if self.smc_check_every < 1:
            raise ValueError(f"--resample-every must be a positive integer, got {self.smc_check_every}")
        if any(s == "" for s in self.stop):
            raise ValueError("--stop strings must not be empty")

    def _validate_rejuvenation(self) -> None:
        if self.particle_count > MAX_REJUVENATED_PARTICLES:
            raise ValueError(f"--rejuvenate gives each particle a second sequence for its moves: --particles must be "
                             f"at most {MAX_REJUVENATED_PARTICLES} with it, got {self.particles}")
        if self.proposal_temp is not None:
            raise ValueError("--rejuvenate moves particles at the proposal temperature 1/alpha; drop --proposal-temp")
        if self.smc_ramp > 0:
            raise ValueError("--rejuvenate needs the target p^alpha at every token; drop --alpha-ramp")
        if not self.smc_resample_first:
            raise ValueError("smc_rejuvenate needs smc_resample_first (resampling before drawing)")

    def _validate_ladder(self) -> None:
        if self.proposal_temp is not None:
            raise ValueError("--method ppt gives each replica the proposal temperature 1/alpha of its rung; "
                             "drop --proposal-temp")
        if self.ladder is None and self.alpha <= 1:
            raise ValueError("--method ppt tempers between alpha 1 and --alpha: it needs --alpha > 1")
        ladder = self.power_ladder
        if not 2 <= len(ladder) <= 16:
            raise ValueError(f"--ladder needs 2 to 16 rungs, got {len(ladder)}")
        if not all(1 <= a <= MAX_ALPHA for a in ladder):
            raise ValueError(f"--ladder rungs must be numbers >= 1 and <= {MAX_ALPHA:g}, got {_rungs(ladder)}")
        if any(b <= a for a, b in zip(ladder, ladder[1:])):
            raise ValueError(f"--ladder must rise strictly, got {_rungs(ladder)}")
        if ladder[-1] != self.alpha:
            raise ValueError(f"--ladder must end at --alpha {self.alpha:g} (the replica whose samples are returned), "
                             f"got {_rungs(ladder)}")

    @property
    def sequences_per_particle(self) -> int:
        """KV sequences one SMC particle takes: its own, and with rejuvenation a spare for its MH moves."""
        return 2 if self.smc_rejuvenate else 1

    @property
    def particle_count(self) -> int:
        """SMC particles: ``particles``, or DEFAULT_PARTICLES where a session has not fitted them
        to the model's memory yet (``default_particles``)."""
        if self.particles is not None:
            return self.particles
        return min(DEFAULT_PARTICLES, MAX_REJUVENATED_PARTICLES) if self.smc_rejuvenate else DEFAULT_PARTICLES

    @property
    def power_ladder(self) -> tuple[float, ...]:
        """The alphas of the PPT replicas: ``ladder``, or a geometric one from 1 to alpha."""
        if self.ladder is not None:
            return tuple(self.ladder)
        if self.alpha <= 1:
            return (self.alpha,)  # nothing to temper: refused by validate()
        steps = PPT_REPLICAS - 1
        return tuple(self.alpha ** (k / steps) for k in range(steps)) + (self.alpha,)

    @property
    def temperature(self) -> float:
        """Temperature of the token-level proposal (0 means greedy)."""
        if self.method == "standard":
            # Plain sampling draws from its proposal: proposal_temp, when set, is its temperature
            # (what an OpenAI client's ``temperature`` sets).
            return 1.0 if self.proposal_temp is None else self.proposal_temp
        if self.method == "greedy":
            return 0.0
        if self.method == "low-temp":
            return 0.0 if math.isinf(self.alpha) else 1.0 / self.alpha
        if self.proposal_temp is not None:
            return self.proposal_temp
        # A zero-temperature proposal could never move a max-swap chain.
        return 1.0 if math.isinf(self.alpha) else 1.0 / self.alpha

    @property
    def steps_per_block(self) -> int:
        """MH steps per block, or at least 1 where they scale with the sequence's length (0: no
        MCMC at all; the length-dependent count is ``block_steps``)."""
        if self.method not in ("power", "ppt"):
            return 0
        return max(self.mcmc_steps, 1) if self.steps_per_token > 0 else self.mcmc_steps

    def block_steps(self, length: int) -> int:
        """MH steps of a block whose extended sequence has ``length`` tokens."""
        if self.method not in ("power", "ppt"):
            return 0
        return max(self.mcmc_steps, math.ceil(self.steps_per_token * length))

    @property
    def token_budget(self) -> int:
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def effective_block_size(self) -> int:
        return self.block_size if self.method in ("power", "ppt") else self.token_budget


def default_particles(settings: SamplingSettings, max_tokens: int, bytes_per_cell: int | None) -> SamplingSettings:
    """The settings with SMC's particle count fixed: as asked, or DEFAULT_PARTICLES, fewer where
    their KV cells (max_tokens each) would pass SMC_KV_BUDGET (never under MIN_DEFAULT_PARTICLES)."""
    if settings.particles is not None or settings.method != "smc":
        return settings
    count = settings.particle_count
    if bytes_per_cell:
        fit = SMC_KV_BUDGET // (max(1, max_tokens) * bytes_per_cell * settings.sequences_per_particle)
        count = max(MIN_DEFAULT_PARTICLES, min(count, fit))
    return replace(settings, particles=count)


def _rungs(ladder: tuple[float, ...]) -> str:
    return ",".join(f"{a:g}" for a in ladder)


def check_request(settings: SamplingSettings, num_samples: int) -> SamplingSettings:
    """The settings, or UserError with the one line a user needs."""
    try:
        settings.validate()
    except ValueError as error:
        raise UserError(str(error)) from None
    if num_samples < 1:
        raise UserError(f"--num-samples must be a positive integer, got {num_samples}")
    return settings


@dataclass
class SampleStats:
    method: str
    alpha: float
    block_size: int
    mcmc_steps: int
    seed: int
    chain: int = 0  # index among the -n independent chains; its RNG derives from (seed, chain)
    mh_steps: int = 0
    accepted: int = 0
    moved: int = 0  # accepted proposals that changed the sequence (the rest reproduced it)
    acceptance_rate: float | None = None
    tokens_decoded: int = 0
    tokens_reevaluated: int = 0
    prompt_tokens: int = 0
    proposal_tokens: int = 0  # tokens the MH proposals drew (early-rejected ones stop short)
    early_rejections: int = 0  # proposals abandoned once their rejection was certain
    discarded_tokens: int = 0  # tokens of batched proposals dropped after an earlier acceptance
    reused_tokens: int = 0  # proposal tokens drawn from stored distributions, not decoded
    widest_round: int = 0  # most proposals decoded together in one MH round
    # Power-SMC diagnostics (None for the other methods)
    particles: int | None = None
    resamples: int | None = None
    ess_min: float | None = None  # lowest effective sample size seen
    distinct_ancestors: int | None = None  # first-generation particles with descendants at the end
    log_normalizer: float | None = None  # estimate of log of the sum of p(x)^alpha over sequences x
    particle_tokens: int | None = None  # tokens appended to particles (shared entries: once in tokens_decoded)
    distinct_sequences: int | None = None  # distinct sequences among the final particles
    # Resample-move SMC (--rejuvenate) counts its particles' MH moves in mh_steps, accepted, moved
    # (and acceptance_rate), its proposals' decoding in tokens_decoded; and its sweeps here.
    rejuvenations: int | None = None
    # Parallel power tempering (None for the other methods): the replicas' alphas and, per
    # adjacent pair, the share of proposed swaps accepted.
    ladder: list[float] | None = None
    swap_acceptance: list[float] | None = None
    stop_reason: str = "length"  # length | eos | stop
    wall_s: float = 0.0


@dataclass
class Sample:
    """One finished sample: text, generated token ids and their base-model log p."""

    text: str
    tokens: list[int]
    logprobs: list[float]
    stats: SampleStats
    prompt_token_ids: list[int] = field(default_factory=list)
