"""The ps-local command line: a thin click layer over Session and the sampler."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import click

from . import __version__
from .errors import UserError
from .output import ProgressLine, sample_json, summary_line
from .settings import METHODS, SamplingSettings


def sampling_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every sampling command shares (generate, and later eval)."""
    options = [
        click.option("--method", type=click.Choice(METHODS), default="power", show_default=True,
                     help="power: MH on p^alpha; baselines: low-temp (T=1/alpha), standard (T=1), greedy."),
        click.option("--alpha", type=float, default=4.0, show_default=True,
                     help="Sharpening exponent (>= 1; 'inf' for max-swap)."),
        click.option("--block-size", type=int, default=192, show_default=True, help="Tokens per block (B)."),
        click.option("--mcmc-steps", type=int, default=10, show_default=True, help="MH steps per block (N)."),
        click.option("--max-tokens", type=int, default=None,
                     help="Most new tokens [default: 3072, or what fits the context]."),
        click.option("--proposal-temp", type=float, default=None,
                     help="Proposal temperature [default: 1/alpha; 1 for alpha=inf]."),
        click.option("--seed", type=int, default=None, help="Random seed [default: random, reported]."),
        click.option("--stop", multiple=True, help="Stop string; ends a sequence inside the sampler (repeatable)."),
        click.option("--threads", type=int, default=None, help="CPU threads [default: all cores]."),
        click.option("--ctx", type=int, default=None, help="Context length [default: the model's trained context]."),
        click.option("--gpu-layers", type=int, default=-1, show_default=True,
                     help="Layers to offload (Metal/CUDA builds); -1: all."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def settings_from(options: dict[str, Any]) -> SamplingSettings:
    return SamplingSettings(
        method=options["method"],
        alpha=options["alpha"],
        block_size=options["block_size"],
        mcmc_steps=options["mcmc_steps"],
        max_tokens=options["max_tokens"],
        proposal_temp=options["proposal_temp"],
        seed=options["seed"],
        stop=tuple(options["stop"]),
    )


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin is None:
            raise UserError("no prompt given and no standard input to read it from")
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"standard input is not valid UTF-8 (byte {error.start})") from None
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
@sampling_options
@click.option("-n", "--num-samples", type=int, default=1, show_default=True, help="Independent samples (chains).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample, one per line.")
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")
def generate(model: str, prompt: str | None, num_samples: int, as_json: bool, quiet: bool, **options: Any) -> None:
    """Sample a continuation of PROMPT (or standard input when PROMPT is - or absent).

    MODEL is a path to a .gguf file, or "default" (Gemma 3 270M base, from ps-local[demo]).

    Only the generated text (or JSON) goes to stdout; progress and the summary go to stderr.
    """
    from .models import resolve_model
    from .session import RuntimeOptions, Session  # loads llama.cpp: keep --help fast

    settings = settings_from(options)
    try:
        settings.validate()
    except ValueError as error:
        raise UserError(str(error)) from None
    if num_samples < 1:
        raise UserError(f"--num-samples must be a positive integer, got {num_samples}")
    text = read_prompt(prompt)
    runtime = RuntimeOptions(threads=options["threads"], ctx=options["ctx"], gpu_layers=options["gpu_layers"])
    progress = ProgressLine(sys.stderr) if not quiet and sys.stderr.isatty() else None
    printed = 0

    def emit(index: int, result: Any) -> None:
        nonlocal printed
        if progress:
            progress.clear()
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

    with Session(resolve_model(model), runtime) as session:
        session.generate(session.tokenize(text), settings, num_samples, progress=progress, on_sample=emit)


def run_cli(main: click.Group, argv: list[str] | None = None) -> int:
    """Run a click group with ps-local's error contract: one line on stderr, no traceback."""
    try:
        result = main.main(args=argv, prog_name="ps-local", standalone_mode=False)
    except UserError as error:
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
    except BrokenPipeError:
        # A closed pipe (| head) is a normal way for a pipeline to end; stop writing to it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run_cli(cli))


if __name__ == "__main__":
    main()
