"""The ps-local command line: a thin click layer over Session and the sampler."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from . import __version__
from .errors import PsLocalError, UserError
from .live import LiveView
from .memory import CACHE_TYPES
from .output import sample_json, summary_line
from .prompts import TEMPLATES, PromptSettings, template_stops
from .server.limits import RequestLimits
from .settings import DEFAULT_METHOD, METHODS, SamplingSettings, check_request

if TYPE_CHECKING:
    from .session import RuntimeOptions

SERVE_LIMITS = RequestLimits()  # the defaults `ps-local serve --help` shows


def sampling_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every sampling command shares (generate, eval)."""
    options = [
        click.option("--alpha", type=float, default=4.0, show_default=True,
                     help="Sharpening exponent (>= 1; 'inf' for max-swap)."),
        click.option("--block-size", type=int, default=192, show_default=True, help="Tokens per block (B)."),
        click.option("--mcmc-steps", type=int, default=10, show_default=True, help="MH steps per block (N)."),
        click.option("--max-tokens", type=int, default=None,
                     help="Most new tokens [default: 3072, or what fits the context]."),
        click.option("--proposal-temp", type=float, default=None,
                     help="Proposal temperature [default: 1/alpha; 1 for alpha=inf]; with --method "
                          "standard, its sampling temperature [default: 1]."),
        click.option("--particles", type=int, default=None,
                     help="Particles of --method smc (one KV sequence each) [default: 128, fewer where their "
                          "KV cache would pass 2 GiB; at least 16]."),
        click.option("--ess-threshold", type=float, default=0.5, show_default=True,
                     help="smc: resample when the effective sample size falls below this share of the particles."),
        click.option("--resample-every", type=int, default=1, show_default=True,
                     help="smc: check the effective sample size every this many tokens."),
        click.option("--alpha-ramp", type=int, default=0, show_default=True,
                     help="smc: raise alpha from 1 to --alpha over this many first tokens (0: no ramp)."),
        click.option("--rejuvenate", type=int, default=0, show_default=True,
                     help="smc: MH moves per particle after each resampling, and where the particles' weights are "
                          "all equal (resample-move; 0: none)."),
        click.option("--steps-per-token", type=float, default=0.0, show_default=True,
                     help="power, ppt: MH steps per block of at least this many per token of the sequence "
                          "(0: --mcmc-steps only)."),
        click.option("--swap-every", type=int, default=1, show_default=True,
                     help="ppt: a swap sweep after every this many MH steps."),
        click.option("--ladder-warmup", type=int, default=0, show_default=True,
                     help="ppt: MH steps of a discarded pilot run that places the ladder for the length (0: none)."),
        click.option("--ladder", default=None,
                     help="ppt: the replicas' alphas, rising to --alpha, e.g. 1,2,4 "
                          "[default: 4 rungs, geometric from 1 to --alpha]."),
        click.option("--seed", type=int, default=None, help="Random seed [default: random, reported]."),
        click.option("--stop", multiple=True, help="Stop string; ends a sequence inside the sampler (repeatable)."),
        click.option("--threads", type=int, default=None, help="CPU threads [default: all cores]."),
        click.option("--ctx", type=int, default=None, help="Context length [default: the model's trained context]."),
        click.option("--gpu-layers", type=int, default=-1, show_default=True,
                     help="Layers to offload (Metal/CUDA builds); -1: all."),
        click.option("--chains-per-batch", type=int, default=8, show_default=True,
                     help="Most chains decoded together; each holds its own KV cells (memory)."),
        click.option("--round-width", type=int, default=None,
                     help="Most proposals per chain decoded together [default: 8 / chains]; "
                          "each holds KV cells. Never changes the samples."),
        click.option("--cache-type", type=click.Choice(list(CACHE_TYPES)), default="f16", show_default=True,
                     help="KV cache element type; q8_0 halves the cache (slightly different logits)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def chat_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--chat and --system, for every command that builds prompts."""
    command = click.option("--system", default=None, help="System message (with --chat).")(command)
    return click.option("--chat", is_flag=True, help="Apply the model's own chat template (instruct models).")(
        command
    )


def settings_from(options: dict[str, Any], method: str = DEFAULT_METHOD) -> SamplingSettings:
    stops = tuple(options["stop"]) or template_stops(options.get("template"))
    return SamplingSettings(
        method=method,
        alpha=options["alpha"],
        block_size=options["block_size"],
        mcmc_steps=options["mcmc_steps"],
        max_tokens=options["max_tokens"],
        proposal_temp=options["proposal_temp"],
        seed=options["seed"],
        stop=stops,
        particles=options["particles"],
        ess_threshold=options["ess_threshold"],
        smc_check_every=options["resample_every"],
        smc_ramp=options["alpha_ramp"],
        ladder=parse_ladder(options["ladder"]),
        smc_rejuvenate=options["rejuvenate"],
        steps_per_token=options["steps_per_token"],
        swap_every=options["swap_every"],
        ladder_warmup=options["ladder_warmup"],
    )


def parse_ladder(text: str | None) -> tuple[float, ...] | None:
    """``--ladder 1,2,4`` as a tuple of alphas (checked further by SamplingSettings.validate)."""
    if text is None:
        return None
    try:
        return tuple(float(rung) for rung in text.split(","))
    except ValueError:
        raise UserError(f"--ladder takes comma-separated numbers such as 1,2,4, got {text!r}") from None


def runtime_from(options: dict[str, Any]) -> "RuntimeOptions":
    from .session import RuntimeOptions

    return RuntimeOptions(
        threads=options["threads"],
        ctx=options["ctx"],
        gpu_layers=options["gpu_layers"],
        chains_per_batch=options["chains_per_batch"],
        round_width=options["round_width"],
        cache_type=options["cache_type"],
    )


# Options that only some methods read: given explicitly to a method that ignores them, they
# would silently do nothing, so they are refused.
METHOD_OPTIONS = {
    "alpha": ("power", "smc", "ppt", "low-temp"),
    "particles": ("smc",),
    "ess_threshold": ("smc",),
    "resample_every": ("smc",),
    "alpha_ramp": ("smc",),
    "ladder": ("ppt",),
    "rejuvenate": ("smc",),
    "steps_per_token": ("power", "ppt"),
    "swap_every": ("ppt",),
    "ladder_warmup": ("ppt",),
    "block_size": ("power", "ppt"),
    "mcmc_steps": ("power", "ppt"),
    "proposal_temp": ("power", "smc", "standard"),
    "round_width": ("power", "ppt"),
}


def check_explicit_options(context: click.Context, methods: tuple[str, ...]) -> None:
    """UserError for an option set on the command line that none of ``methods`` uses."""
    for name, users in METHOD_OPTIONS.items():
        if context.get_parameter_source(name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        if not any(method in users for method in methods):
            flag = "--" + name.replace("_", "-")
            chosen = ", ".join(methods)
            raise UserError(f"{flag} has no effect with --method{'s' if len(methods) > 1 else ''} {chosen} "
                            f"(it is used by {', '.join(users)}); drop it")


TRACE_HELP = ("Write every sampler event (MH steps, blocks, SMC resamplings, PPT swaps, final samples) to FILE, "
              "one JSON line each; `ps-local trace FILE` summarizes it.")


@contextlib.contextmanager
def open_trace_file(path: Path | None) -> Any:
    """A TraceWriter on ``path`` (None: no trace), closed (flushed) however the run ends."""
    if path is None:
        yield None
        return
    from .trace import TraceWriter

    with TraceWriter(path) as writer:
        yield writer


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin is None:
            raise UserError("no prompt given and no standard input to read it from")
        if sys.stdin.isatty():
            # Otherwise a forgotten PROMPT looks like a hang.
            click.echo("ps-local: reading the prompt from the terminal; end it with Ctrl-D "
                       "(or give PROMPT as an argument)", err=True)
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"standard input is not valid UTF-8 (byte {error.start})") from None
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # an argument's undecodable bytes arrive as surrogates
        raise UserError(f"the prompt is not valid UTF-8 (character {error.start})") from None
    if not prompt.strip():
        raise UserError("the prompt is empty")
    return prompt


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ps-local")
def cli() -> None:
    """Power sampling (p^alpha via block-wise Metropolis-Hastings) on local GGUF models."""


@cli.command()
@click.argument("model")
@click.argument("prompt", required=False)
@click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
              help="smc: Power-SMC (nearest p^alpha per token decoded); power: the paper's MH on p^alpha; "
                   "ppt: parallel power tempering; "
                   "baselines: low-temp (T=1/alpha), standard (T=1), greedy.")
@sampling_options
@chat_options
@click.option("--template", type=click.Choice(TEMPLATES), default=None,
              help="math: the paper's MATH prompt (answer in \\boxed{}); code: HumanEval-style completion.")
@click.option("-n", "--num-samples", type=int, default=1, show_default=True, help="Independent samples (chains).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample, one per line.")
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")
@click.option("--dry-run", is_flag=True, help="Show the KV cache the run would allocate, and stop.")
@click.option("--trace", "trace_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help=TRACE_HELP)
@click.pass_context
def generate(
    context: click.Context, model: str, prompt: str | None, method: str, num_samples: int, as_json: bool,
    quiet: bool, dry_run: bool, trace_file: Path | None, **options: Any
) -> None:
    """Sample a continuation of PROMPT (or standard input when PROMPT is - or absent).

    MODEL is a path to a .gguf file, hf:OWNER/REPO/FILE.gguf, a name from `ps-local models`,
    or "default" (Gemma 3 270M base, from ps-local[demo]).

    Only the generated text (or JSON) goes to stdout; progress and the summary go to stderr.
    """
    from .api import load  # loads llama.cpp: keep --help fast

    prompt_settings = PromptSettings(options["template"], options["chat"], options["system"])
    settings = check_request(settings_from(options, method), num_samples)
    check_explicit_options(context, (method,))
    text = read_prompt(prompt)
    runtime = runtime_from(options)
    live = not quiet and sys.stderr.isatty()
    progress: LiveView | None = None
    printed = 0

    def emit(index: int, result: Any) -> None:
        nonlocal printed
        if progress:
            progress.done(index)
        if as_json:
            click.echo(sample_json(result))
        else:
            if printed:
                click.echo("---")
            click.echo(result.text)
        sys.stdout.flush()
        printed += 1
        if not quiet:
            click.echo(summary_line(result), err=True)

    with load(model, options=runtime) as loaded:
        tokens = loaded.tokens(text, prompt_settings.chat, prompt_settings.system, prompt_settings.template)
        if dry_run:
            click.echo(loaded.session.plan(tokens, settings, num_samples).describe())
            return
        if live:
            engine = loaded.session.engine
            progress = LiveView(sys.stderr, engine.token_bytes, hidden=engine.is_end_of_generation)
            progress.start(settings.method)
        try:
            with open_trace_file(trace_file) as trace:
                loaded.generate(tokens, n=num_samples, settings=settings, progress=progress, on_sample=emit,
                                trace=trace, on_token=progress.token if progress else None)
        finally:
            if progress:
                progress.clear()


class DefaultCommandGroup(click.Group):
    """A group whose first argument, when it names no subcommand, goes to ``run``."""

    def parse_args(self, context: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(context, args)


@cli.group("eval", cls=DefaultCommandGroup)
def eval_group() -> None:
    """Compare methods on MATH500, HumanEval or a JSONL task (ps-local eval MODEL TASK ...)."""


@eval_group.command("run")
@click.argument("model")
@click.argument("task")
@click.option("--methods", default="power,low-temp,standard", show_default=True,
              help="Comma-separated methods to compare.")
@click.option("-n", "--num-samples", type=int, default=1, show_default=True, help="Samples per problem and method.")
@click.option("--limit", type=int, default=None, help="Only the first L problems.")
@click.option("--parallel", type=int, default=1, show_default=True,
              help="Problems sampled at once; their chains share batched decodes (up to --chains-per-batch).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Results directory [default: ps-local-eval/TASK]; rerunning with it resumes.")
@click.option("--shard", default=None, help="I/N: this machine's share of the problems.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="A local copy of the task data (MATH500 as JSON or JSONL) instead of the hub.")
@click.option("--grader", type=click.Choice(["exact", "regex"]), default="exact", show_default=True,
              help="For a JSONL task: exact match of the completion, or the answer as a regex.")
@sampling_options
@chat_options
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")
@click.option("--trace", "trace_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help=TRACE_HELP + " One job per (problem, method), its header naming the problem; FILE is "
                   "written anew by each run (a resumed run traces what it samples).")
@click.pass_context
def eval_run(context: click.Context, model: str, task: str, methods: str, num_samples: int, limit: int | None,
             parallel: int, out: Path | None, shard: str | None, data: Path | None, grader: str, chat: bool, system: str | None,
             quiet: bool, trace_file: Path | None, **options: Any) -> None:
    """Sample every problem with each method, grade, and summarize (resumable)."""
    from .eval.run import EvalPlan, parse_shard, run_eval
    from .eval.summary import summarize, summary_table, write_summary
    from .models import resolve_model
    from .session import Session
    from .eval.tasks import load_task

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METHODS]
    if not chosen or unknown:
        raise UserError(f"--methods takes a comma-separated list of {', '.join(METHODS)}, got {methods!r}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer, got {limit}")
    if parallel < 1:
        raise UserError(f"--parallel must be a positive integer, got {parallel}")
    base = check_request(settings_from(options), num_samples)
    for method in chosen:  # each method's own settings (a PPT ladder, SMC particles) before any sampling
        check_request(replace(base, method=method), num_samples)
    check_explicit_options(context, chosen)
    loaded = load_task(task, data, grader)
    plan = EvalPlan(chosen, num_samples, out or Path("ps-local-eval") / loaded.name, limit,
                    parse_shard(shard) if shard else None, chat, system, parallel=parallel)
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    with Session(resolve_model(model), runtime_from(options)) as session, open_trace_file(trace_file) as trace:
        records = run_eval(session, loaded, plan, base, log, trace)
    summary = summarize(records)
    written = write_summary(summary, plan.out)
    click.echo(summary_table(summary))
    log(f"results and summary in {plan.out}: {', '.join(p.name for p in written)}")


@eval_group.command("merge")
@click.argument("directories", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where the merged summary goes [default: the first DIRECTORY].")
def eval_merge(directories: tuple[Path, ...], out: Path | None) -> None:
    """Summarize the results of several runs or shards together."""
    from .eval.run import read_results
    from .eval.summary import check_mergeable, summarize, summary_table, write_summary

    missing = [str(d) for d in directories if not d.is_dir()]
    if missing:
        raise UserError(f"not a results directory: {', '.join(missing)}")
    check_mergeable(directories)
    records = read_results(directories)
    if not records:
        raise UserError(f"no results*.jsonl lines in {', '.join(map(str, directories))}")
    summary = summarize(records)
    write_summary(summary, out or directories[0])
    click.echo(summary_table(summary))


@eval_group.command("regrade")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--workers", type=int, default=2, show_default=True, help="Checks run at once (each in the sandbox).")
@click.option("--grader", type=click.Choice(["exact", "regex"]), default=None,
              help="For a JSONL task whose folder does not record its grader.")
def eval_regrade(directory: Path, workers: int, grader: str | None) -> None:
    """Grade DIRECTORY's results again with the current graders, without sampling.

    The new verdicts replace the old ones only once every line is graded: an interrupted
    regrade leaves the results as they were. The summary is then written again.
    """
    from .eval.regrade import regrade
    from .eval.run import read_results
    from .eval.summary import summarize, summary_table, write_summary

    if not directory.is_dir():
        raise UserError(f"not a results directory: {directory}")
    if workers < 1:
        raise UserError(f"--workers must be a positive integer, got {workers}")
    report = regrade(directory, workers, grader, log=lambda line: click.echo(line, err=True))
    summary = summarize(read_results([directory]))
    write_summary(summary, directory)
    click.echo(summary_table(summary))
    click.echo(f"regraded {report.lines} lines in {report.files} file{'s' if report.files > 1 else ''} in "
               f"{report.seconds:.1f} s: {report.changed} verdicts changed ({report.now_correct} now correct, "
               f"{report.now_wrong} now wrong)", err=True)


@cli.command("trace")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for the pictures [default: FILE's folder].")
@click.option("--job", "jobs", type=int, multiple=True, help="Only this job of the trace (repeatable).")
@click.option("--no-pictures", is_flag=True, help="The summary only.")
def trace_command(file: Path, as_json: bool, out: Path | None, jobs: tuple[int, ...], no_pictures: bool) -> None:
    """Summarize a trace written with --trace: per job (request) and chain, MH steps, acceptance,
    moves, log p and tokens decoded per block; SMC resamplings and ESS; PPT swap acceptance per
    pair of rungs. Pictures (PNG, one per job): log p over MH steps, one line per chain, and
    acceptance and moves so far; SMC's ESS over tokens.

    With several chains of one prompt (-n 4 or more), R-hat (rank-normalized split R-hat) and
    bulk ESS of log p, with ArviZ (pip install 'ps-local[diagnostics]'), per block: block k of
    the chain targets p^alpha over sequences of at most k*B tokens, so log p is that of a
    growing sequence and only the draws of one block share a target. The draws are the chain's
    log p after each of the block's MH steps, over the chains that ran the block (the alpha
    replica for ppt); a block needs 2 chains and 4 MH steps. R-hat above 1.01: the chains
    disagree, run more steps (--mcmc-steps).
    """
    from .trace_report import format_summary, read_trace, summarize, write_pictures

    trace = read_trace(file)
    chosen = list(jobs) or None
    summary = summarize(trace, chosen)
    if not no_pictures:
        written, notes = write_pictures(trace, out if out is not None else file.parent, chosen)
        summary["pictures"] = [str(path) for path in written]
        summary["notes"] += notes
    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False))
        return
    click.echo(format_summary(summary))
    if summary.get("pictures"):
        click.echo(f"pictures: {', '.join(summary['pictures'])}")
    for note in summary["notes"][len(trace.notes):]:
        click.echo(f"note: {note}")


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
@click.pass_context
def models(context: click.Context, as_json: bool) -> None:
    """The model catalog, and which models are already on disk."""
    if context.invoked_subcommand is not None:
        return
    from .models import catalog_rows

    rows = catalog_rows()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(format_table(rows, ("name", "size", "quantization", "license", "on_disk", "source")))


@models.command()
@click.argument("name")
def pull(name: str) -> None:
    """Download catalog model NAME (or hf:OWNER/REPO/FILE.gguf) and print its path."""
    from .models import resolve_model

    click.echo(str(resolve_model(name)))


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
def info(model: str, as_json: bool) -> None:
    """Architecture, size, quantization, context, vocabulary and special tokens of MODEL."""
    from .models import resolve_model
    from .session import Session

    with Session(resolve_model(model)) as session:
        details = session.engine.describe()
        details.update(session.memory_summary())
    if as_json:
        click.echo(json.dumps(details))
        return
    for key, value in details.items():
        if key == "kv_cache_bytes_per_token":
            continue  # for --json; the line before says it readably
        if isinstance(value, dict):
            value = f"{value['id']} {value['text']!r}"
        click.echo(f"{key.replace('_', ' ')}: {'none' if value is None else value}")


@cli.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", envvar="PS_LOCAL_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' [env PS_LOCAL_API_KEY].")
@click.option("--model-id", default=None, help="The name clients use for the model [default: MODEL as given].")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Unfinished requests beyond which new ones get 429.")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all cores].")
@click.option("--ctx", type=int, default=None, help="Tokens per request, prompt included [default: 4096 or the model's].")
@click.option("--gpu-layers", type=int, default=-1, show_default=True, help="Layers to offload; -1: all.")
@click.option("--chains-per-batch", type=int, default=8, show_default=True,
              help="Chains of all requests decoded together; with --ctx it sizes the KV cache.")
@click.option("--round-width", type=int, default=None, help="Proposals per chain decoded together [default: 8 / chains].")
@click.option("--cache-type", type=click.Choice(list(CACHE_TYPES)), default="f16", show_default=True)
@click.option("--max-n", type=int, default=SERVE_LIMITS.max_n, show_default=True, help="Most samples per request.")
@click.option("--max-mcmc-steps", type=int, default=SERVE_LIMITS.max_mcmc_steps, show_default=True,
              help="Most MH steps per block a request may ask for.")
@click.option("--max-particle-tokens", type=int, default=SERVE_LIMITS.max_particle_tokens, show_default=True,
              help="Most particles x max_tokens of an smc request (its KV cells per chain).")
@click.option("--max-work-tokens", type=int, default=SERVE_LIMITS.max_work_tokens, show_default=True,
              help="Most tokens one request may decode in the worst case (all its samples, every MH step).")
def serve(model: str, host: str, port: int, api_key: str | None, model_id: str | None, max_queue: int,
          max_n: int, max_mcmc_steps: int, max_particle_tokens: int, max_work_tokens: int, **runtime: Any) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).

    ps-local's settings (method, alpha, block_size, mcmc_steps, proposal_temp) travel as extra
    body fields; requests beyond the --max-* limits get 400. Needs the server extra: pip install
    'ps-local[server]'.
    """
    from .server.run import ServeOptions, serve as run_server

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {port}")
    for flag, value in (("--max-queue", max_queue), ("--max-n", max_n), ("--max-mcmc-steps", max_mcmc_steps),
                        ("--max-particle-tokens", max_particle_tokens), ("--max-work-tokens", max_work_tokens)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    limits = RequestLimits(max_n, max_mcmc_steps, max_particle_tokens, max_work_tokens)
    run_server(model, runtime, ServeOptions(host, port, api_key, max_queue, model_id, limits))


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.replace("_", " ").ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def run_cli(main: click.Group, argv: list[str] | None = None) -> int:
    """Run a click group with ps-local's error contract: one line on stderr, no traceback."""
    try:
        result = main.main(args=argv, prog_name="ps-local", standalone_mode=False)
    except PsLocalError as error:
        click.echo(f"ps-local: error: {error}", err=True)
        return error.exit_code
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        message = error.format_message().replace("\n", " ")
        click.echo(f"ps-local: error: {message} (see --help)", err=True)
        return error.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("\nps-local: interrupted", err=True)
        return 130
    except Terminated:
        click.echo("ps-local: terminated", err=True)
        return 143
    except BrokenPipeError:
        # A closed pipe (| head) is a normal way for a pipeline to end; stop writing to it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as error:
        # A read-only cache or output folder, a full disk, ...: what and where, in one line.
        where = f": {error.filename}" if error.filename else ""
        click.echo(f"ps-local: error: {error.strerror or error}{where}", err=True)
        return 1
    except Exception as error:  # a bug: still one line, with a way to see the traceback
        if os.environ.get("PS_LOCAL_DEBUG"):
            raise
        click.echo(f"ps-local: internal error: {type(error).__name__}: {error} "
                   "(please report it; PS_LOCAL_DEBUG=1 shows the traceback)", err=True)
        return 70
    return result if isinstance(result, int) else 0


class Terminated(BaseException):
    """SIGTERM (a batch scheduler, kill): raised like Ctrl-C, so that every ``finally`` runs:
    graded programs are killed, results already written stay whole."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(run_cli(cli))


from .chat import chat_command  # noqa: E402 (ps_local/chat/ builds on the option decorators above)

cli.add_command(chat_command())

if __name__ == "__main__":
    main()
