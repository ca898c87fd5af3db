"""The command line contract, through a subprocess: stdout, stderr, exit codes."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_tiny_model

FAST = ["--max-tokens", "8", "--block-size", "4", "--mcmc-steps", "3", "--threads", "2"]
# FAST sets MH options (block size, MH steps), which only power and ppt read; the default method
# (smc) refuses them, so the tests of MH runs name their method.
POWER = ["--method", "power", *FAST]


def ps_local(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ps_local.cli", *args],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], fragment: str) -> None:
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert result.stdout == b""
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1 and stderr.startswith("ps-local: error: "), stderr
    assert fragment in stderr, stderr


def test_stdout_has_only_the_text(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes no", *POWER, "--seed", "1")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode().removesuffix("\n")
    assert re.fullmatch(r"(?: yes| no| maybe|!){1,8}", text), text
    assert "power" in result.stderr.decode()  # the summary goes to stderr


def test_quiet_silences_stderr(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes no", *POWER, "--quiet")
    assert result.returncode == 0 and result.stderr == b"" and result.stdout.strip()


@pytest.mark.parametrize("prompt_args", [["-"], []])
def test_prompt_from_stdin(tiny_gguf, prompt_args):
    by_stdin = ps_local("generate", str(tiny_gguf), *prompt_args, *POWER, "--seed", "3", "--json", input=b"maybe yes")
    by_arg = ps_local("generate", str(tiny_gguf), "maybe yes", *POWER, "--seed", "3", "--json")
    assert by_stdin.returncode == 0, by_stdin.stderr
    assert json.loads(by_stdin.stdout)["prompt_token_ids"] == [1, 261, 259]
    assert json.loads(by_stdin.stdout)["tokens"] == json.loads(by_arg.stdout)["tokens"]


def test_json_lines_carry_the_fields(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes", *POWER, "--json", "-n", "3", "--seed", "5")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(records) == 3
    assert sorted(r["stats"]["chain"] for r in records) == [0, 1, 2]
    for record in records:
        assert {"text", "tokens", "logprobs", "stats"} <= set(record)
        assert len(record["tokens"]) == len(record["logprobs"]) <= 8
        assert all(lp <= 1e-6 for lp in record["logprobs"])
        stats = record["stats"]
        for key in ("method", "alpha", "block_size", "mcmc_steps", "seed", "mh_steps", "accepted",
                    "acceptance_rate", "tokens_decoded", "tokens_reevaluated", "wall_s"):
            assert key in stats
        assert stats["method"] == "power" and stats["seed"] == 5
        assert stats["mh_steps"] in (3, 6)  # N per block that ran
        # A token is decoded again only when a proposal's draw falls outside a stored table.
        assert stats["tokens_reevaluated"] <= stats["mh_steps"] + stats["discarded_tokens"]
        assert stats["tokens_decoded"] >= len(record["tokens"]) - 1


def test_seed_reproduces_tokens(tiny_gguf):
    runs = [ps_local("generate", str(tiny_gguf), "no", *POWER, "--json", "-n", "4", "--seed", seed)
            for seed in ("7", "7", "8")]
    tokens = [sorted(json.dumps(json.loads(line)["tokens"]) for line in r.stdout.decode().splitlines())
              for r in runs]
    assert tokens[0] == tokens[1]
    assert tokens[0] != tokens[2]  # four 8-token samples: equal by chance with negligible probability


@pytest.mark.parametrize("method", ["low-temp", "standard", "greedy"])
def test_baselines(tiny_gguf, method):
    result = ps_local("generate", str(tiny_gguf), "yes", "--max-tokens", "8", "--method", method, "--json")
    stats = json.loads(result.stdout)["stats"]
    assert stats["method"] == method and stats["mh_steps"] == 0 and stats["tokens_reevaluated"] == 0


def test_max_swap_and_block_larger_than_max_tokens(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes", "--method", "power", "--alpha", "inf", "--max-tokens", "6",
                      "--block-size", "100", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["alpha"] == "inf"


def test_stop_string_ends_the_sample(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes", "--max-tokens", "40", "--stop", " no",
                      "--method", "standard", "-n", "6", "--json", "--seed", "2")
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    stopped = [r for r in records if r["stats"]["stop_reason"] == "stop"]
    assert stopped, "with 'no' likely at every step, some sample must hit the stop string"
    for record in stopped:
        assert " no" not in record["text"] and record["tokens"][-1] == 260


def test_gets_to_stdout_when_piped_to_head(tiny_gguf):
    # A reader that goes away early must not cause a traceback.
    shell = f"{sys.executable} -m ps_local.cli generate {tiny_gguf} yes {' '.join(POWER)} -n 20 | head -c 1"
    result = subprocess.run(shell, shell=True, capture_output=True, timeout=120)
    assert b"Traceback" not in result.stderr


# -- bad input -----------------------------------------------------------------------------


def test_missing_model_file(tmp_path):
    assert_one_line_error(ps_local("generate", str(tmp_path / "nope.gguf"), "yes"), "not found")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("just text\n")
    assert_one_line_error(ps_local("generate", str(path), "yes"), "not a GGUF")


@pytest.mark.parametrize("keep_bytes", [40, 20000])
def test_truncated_gguf(tmp_path, tiny_gguf, keep_bytes):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:keep_bytes])
    assert_one_line_error(ps_local("generate", str(path), "yes"), str(path))


@pytest.mark.parametrize(
    "option, fragment",
    [
        (["--alpha", "0.5"], "--alpha"),
        (["--alpha", "nan"], "--alpha"),
        (["--block-size", "0"], "--block-size"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--mcmc-steps", "-1"], "--mcmc-steps"),
        (["--proposal-temp", "0"], "--proposal-temp"),
        (["--alpha", "1e39"], "--alpha must be a number >= 1 and <= 1e+30, or inf"),
        (["--proposal-temp", "2.9e-39"], "--proposal-temp must be a number >= 1e-30 and <= 1e+30"),
        (["--proposal-temp", "1e31"], "--proposal-temp must be a number >= 1e-30 and <= 1e+30"),
        (["--method", "ppt", "--alpha", "4", "--ladder", "1,1e31,4"], "--ladder rungs must be"),
        (["-n", "0"], "--num-samples"),
        (["--threads", "0"], "--threads"),
        (["--ctx", "-5"], "--ctx"),
        (["--method", "magic"], "--method"),
        (["--no-such-option"], "no-such-option"),
    ],
)
def test_bad_options(tiny_gguf, option, fragment):
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes", *option), fragment)


@pytest.mark.parametrize("option", [["--alpha", repr(math.nextafter(1e30, math.inf))],
                                    ["--proposal-temp", repr(math.nextafter(1e-30, 0))],
                                    ["--method", "smc", "--alpha", "1e300"]])
def test_numbers_past_the_bounds_are_usage_errors(tiny_gguf, option):
    """Values just past the bounds that keep the proposal's float32 arithmetic finite: one line,
    exit status 2."""
    result = ps_local("generate", str(tiny_gguf), "yes", *option)
    assert_one_line_error(result, option[-2])
    assert result.returncode == 2


def test_the_bounds_themselves_sample(tiny_gguf):
    """At alpha 1e30 (proposal temperature 1e-30) and at temperature 1e-30 the draws are
    greedy's; at temperature 1e30 they are merely finite. No numpy warning on stderr."""
    def tokens(*options: str) -> list[int]:
        result = ps_local("generate", str(tiny_gguf), "yes", "--max-tokens", "8", "--seed", "0", "--json", *options)
        assert result.returncode == 0 and b"Warning" not in result.stderr, result.stderr
        return json.loads(result.stdout)["tokens"]

    greedy = tokens("--method", "greedy")
    assert tokens("--method", "power", *FAST[2:], "--alpha", "1e30") == greedy  # FAST without its --max-tokens
    assert tokens("--method", "standard", "--proposal-temp", "1e-30") == greedy
    assert len(tokens("--method", "standard", "--proposal-temp", "1e30")) >= 1


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(tiny_gguf, prompt):
    assert_one_line_error(ps_local("generate", str(tiny_gguf), prompt), "empty")
    assert_one_line_error(ps_local("generate", str(tiny_gguf), input=prompt.encode()), "empty")


def test_invalid_utf8_on_stdin(tiny_gguf):
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "-", input=b"yes \xff\xfe"), "UTF-8")


def test_prompt_longer_than_context(tiny_gguf):
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes " * 10, "--ctx", "8"), "does not fit")


def test_max_tokens_beyond_explicit_context(tiny_gguf):
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes", "--ctx", "16", "--max-tokens", "15"), "--ctx")


def test_max_tokens_beyond_trained_context(tiny_gguf):
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes", "--max-tokens", "5000"), "trained context")


def test_default_max_tokens_shrinks_to_fit(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes no", "--ctx", "12", "--method", "greedy", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert len(record["prompt_token_ids"]) + len(record["tokens"]) <= 12


def test_ctrl_c_exits_130_without_traceback(tiny_gguf):
    process = subprocess.Popen(
        [sys.executable, "-m", "ps_local.cli", "generate", str(tiny_gguf), "yes", "--method", "power",
         "--max-tokens", "3000", "--mcmc-steps", "100000000", "--quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    time.sleep(3)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert b"Traceback" not in stderr and b"interrupted" in stderr


@pytest.mark.parametrize(
    "option, fragment",
    [
        (["--seed", "-1"], "--seed"),
        (["--gpu-layers", "-2"], "--gpu-layers"),
        (["--ctx", "100000"], "trained context"),
        (["--chains-per-batch", "0"], "--chains-per-batch"),
        (["--method", "power", "--round-width", "0"], "--round-width must be"),  # smc refuses it outright
        (["--cache-type", "q4_7"], "--cache-type"),
        (["--cache-type", "q8_0"], "multiple of 32"),  # the tiny model's heads are 8 long
    ],
)
def test_more_bad_options(tiny_gguf, option, fragment):
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes", *option), fragment)


@pytest.mark.parametrize(
    "method, option",
    [
        ("standard", ["--alpha", "2"]),
        ("greedy", ["--alpha", "2"]),
        ("low-temp", ["--block-size", "8"]),
        ("low-temp", ["--mcmc-steps", "3"]),
        ("low-temp", ["--proposal-temp", "1"]),
        ("greedy", ["--round-width", "2"]),
    ],
)
def test_an_option_the_method_ignores_is_refused(tiny_gguf, method, option):
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes", "--method", method, *option), "no effect")


def test_alpha_is_used_by_low_temp(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes", "--method", "low-temp", "--alpha", "2", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr


def test_summary_line_says_how_often_the_chain_moved(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes no", *POWER, "--seed", "1")
    summary = result.stderr.decode()
    assert re.search(r"moved \d+/\d+ \(\d+%\), accepted \d+/\d+", summary), summary
    record = json.loads(ps_local("generate", str(tiny_gguf), "yes no", *POWER, "--seed", "1", "--json").stdout)
    assert 0 <= record["stats"]["moved"] <= record["stats"]["accepted"] <= record["stats"]["mh_steps"]


def test_dry_run_shows_the_cache(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes", "--method", "power", "--max-tokens", "100",
                      "--round-width", "3", "--dry-run")
    assert result.returncode == 0, result.stderr
    # prompt (2 tokens) + (1 + 3) * 100 + 8 spare cells.
    assert "410 cells" in result.stdout.decode()
    smaller = ps_local("generate", str(tiny_gguf), "yes", "--method", "power", "--max-tokens", "100",
                       "--round-width", "1", "--dry-run")
    assert "210 cells" in smaller.stdout.decode()


def test_a_recurrent_model_is_refused_up_front(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "mamba.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(ps_local("generate", str(path), "yes"), "recurrent")


def test_text_the_vocabulary_cannot_encode_is_refused_not_aborted(tmp_path):
    model = write_tiny_model(tmp_path / "nobytes.gguf", "--no-byte-tokens")
    ok = ps_local("generate", str(model), "yes no", "--max-tokens", "2", "--method", "greedy")
    assert ok.returncode == 0, ok.stderr
    assert_one_line_error(ps_local("generate", str(model), "yes é no"), "cannot encode")


def test_non_finite_logits_are_one_line(tmp_path):
    model = write_tiny_model(tmp_path / "nan.gguf", "--nan-logits")
    result = ps_local("generate", str(model), "yes", "--max-tokens", "4")
    assert_one_line_error(result, "non-finite logits")
    assert result.returncode == 1


def test_an_unwritable_cache_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", "ps_local.cli", "generate", "default", "yes"],
                            capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PS_LOCAL_CACHE": str(blocker / "cache")})
    assert_one_line_error(result, str(blocker))


def test_an_engine_failure_while_sampling_is_one_line(tiny_gguf, monkeypatch, capsys):
    from ps_local import cli
    from ps_local.engine import EngineError, LlamaEngine

    calls = {"count": 0}
    original = LlamaEngine.decode

    def failing(self, requests):
        calls["count"] += 1
        if calls["count"] > 3:
            raise EngineError("llama_decode failed: the KV cache is full")
        return original(self, requests)

    monkeypatch.setattr(LlamaEngine, "decode", failing)
    status = cli.run_cli(cli.cli, ["generate", str(tiny_gguf), "yes", *POWER])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.err.strip() == "ps-local: error: llama_decode failed: the KV cache is full"


def test_a_prompt_from_a_terminal_gets_a_hint(tiny_gguf):
    import pty

    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "ps_local.cli", "generate", str(tiny_gguf), *POWER],
                               stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(slave)
    time.sleep(2)
    os.write(master, b"yes no\n\x04")
    stdout, stderr = process.communicate(timeout=120)
    os.close(master)
    assert process.returncode == 0, stderr
    assert b"reading the prompt from the terminal" in stderr and b"Ctrl-D" in stderr
    assert b"[sample 0] power" in stderr  # it sampled a continuation of what was typed


def test_info_shows_the_kv_cache(tiny_gguf):
    result = ps_local("info", str(tiny_gguf), "--json")
    assert result.returncode == 0, result.stderr
    details = json.loads(result.stdout)
    # 2 layers x 4 KV heads x (8 + 8) elements x 2 bytes = 256 B per token in f16.
    assert details["kv_cache_bytes_per_token"] == {"f16": 256, "q8_0": 136}
    assert details["kv_cache_per_token"] == "256 B (f16), 136 B (q8_0)"
    assert "T_max" in details["kv_cache_one_power_sample"]


def test_an_unwritable_eval_folder_is_one_line(tiny_gguf, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"id": "a", "prompt": "yes", "answer": "yes"}) + "\n")
    result = ps_local("eval", str(tiny_gguf), str(task), "--out", str(blocker / "out"), "--max-tokens", "2")
    assert_one_line_error(result, str(blocker))


def test_an_invalid_utf8_prompt_argument_is_one_line(tiny_gguf):
    result = subprocess.run([sys.executable.encode(), b"-m", b"ps_local.cli", b"generate", str(tiny_gguf).encode(),
                             b"yes \xff no"], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert_one_line_error(result, "not valid UTF-8")


def test_proposal_temp_is_the_temperature_of_standard_sampling(tiny_gguf):
    """--method standard --proposal-temp T samples at temperature T: near 0 it is greedy."""
    cold = [ps_local("generate", str(tiny_gguf), "yes", "--method", "standard", "--proposal-temp", "0.01",
                     "--max-tokens", "8", "--seed", str(seed), "-q").stdout for seed in range(3)]
    greedy = ps_local("generate", str(tiny_gguf), "yes", "--method", "greedy", "--max-tokens", "8", "-q").stdout
    assert cold == [greedy] * 3
    warm = {ps_local("generate", str(tiny_gguf), "yes", "--method", "standard", "--max-tokens", "8",
                     "--seed", str(seed), "-q").stdout for seed in range(6)}
    assert len(warm) > 1  # the negative control: at temperature 1 the seeds differ


def test_smc_from_the_cli_reports_its_diagnostics(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes no", "--method", "smc", "--particles", "6",
                      "--max-tokens", "12", "--seed", "4", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["method"] == "smc" and stats["particles"] == 6 and stats["mcmc_steps"] == 0
    assert 1 <= stats["distinct_ancestors"] <= 6 and 1 <= stats["ess_min"] <= 6
    again = ps_local("generate", str(tiny_gguf), "yes no", "--method", "smc", "--particles", "6",
                     "--max-tokens", "12", "--seed", "4", "--json")
    assert json.loads(again.stdout)["tokens"] == json.loads(result.stdout)["tokens"]
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes", "--method", "smc", "--alpha", "inf"),
                          "finite --alpha")
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes", "--method", "power", "--particles", "4"),
                          "no effect")
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes", "--method", "smc", "--alpha-ramp", "-1"),
                          "--alpha-ramp must be")


def test_ppt_from_the_cli_reports_its_swaps(tiny_gguf):
    result = ps_local("generate", str(tiny_gguf), "yes no", "--method", "ppt", "--ladder", "1,2,4", *FAST,
                      "--seed", "4", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["method"] == "ppt" and stats["ladder"] == [1, 2, 4] and stats["block_size"] == 4
    assert len(stats["swap_acceptance"]) == 2
    summary = ps_local("generate", str(tiny_gguf), "yes no", "--method", "ppt", *FAST, "--seed", "4")
    assert "ppt, ladder=1,1.59,2.52,4 B=4 N=3, swaps accepted" in summary.stderr.decode()
    for options, fragment in [(["--ladder", "1,2"], "must end at --alpha 4"),
                              (["--ladder", "1,x,4"], "comma-separated numbers"),
                              (["--ladder", "2,1,4"], "must rise strictly"),
                              (["--proposal-temp", "0.5"], "drop --proposal-temp"),
                              (["--alpha", "1"], "alpha > 1")]:
        assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes", "--method", "ppt", *options), fragment)
    assert_one_line_error(ps_local("generate", str(tiny_gguf), "yes", "--ladder", "1,4"), "no effect")


# -- the default method: Power-SMC ---------------------------------------------------------


def test_the_default_method_is_smc(tiny_gguf):
    assert "[default: smc]" in ps_local("generate", "--help").stdout.decode()
    result = ps_local("generate", str(tiny_gguf), "yes no", "--max-tokens", "8", "--seed", "1", "--threads", "2")
    assert result.returncode == 0, result.stderr
    # The tiny model's KV cells are 256 B: 128 particles of 8 cells are far within the 2 GiB budget.
    assert re.fullmatch(r"\[sample 0\] smc, alpha=4 particles=128, ESS min \d+\.\d, \d+ resamplings?, "
                        r"\d+ distinct ancestors?, \d+ tokens \((eos|length)\), \d+ decoded for \d+ particle tokens, "
                        r"\d+\.\d s, seed 1\n", result.stderr.decode()), result.stderr
    record = json.loads(ps_local("generate", str(tiny_gguf), "yes no", "--max-tokens", "8", "--seed", "1",
                                 "--threads", "2", "--json").stdout)
    stats = record["stats"]
    assert stats["method"] == "smc" and stats["particles"] == 128 and stats["mh_steps"] == 0
    assert 1 <= stats["ess_min"] <= 128 and 1 <= stats["distinct_ancestors"] <= 128
    assert record["text"] == result.stdout.decode().removesuffix("\n")  # the same seed, the same sample


def test_a_default_dry_run_shows_the_particles_fitted(tiny_gguf, monkeypatch, capsys):
    """--dry-run of a default (smc) run: one KV sequence per particle (after the prompt's),
    128 particles, fewer where particles x max_tokens cells would pass the budget, never under
    16; --particles as given."""
    from ps_local import cli, settings

    # The tiny model's cells are 256 B (test_info_shows_the_kv_cache): this budget holds
    # 128 particles of 256 tokens.
    monkeypatch.setattr(settings, "SMC_KV_BUDGET", 128 * 256 * 256)

    def sequences(*options: str) -> int:
        status = cli.run_cli(cli.cli, ["generate", str(tiny_gguf), "yes", "--dry-run", *options])
        out = capsys.readouterr().out
        assert status == 0, out
        return int(re.fullmatch(r"KV cache: .* (\d+) sequences\n", out).group(1)) - 1  # less the prompt's

    assert sequences("--max-tokens", "100") == 128
    assert sequences("--max-tokens", "256") == 128
    assert sequences("--max-tokens", "1024") == 32
    assert sequences("--max-tokens", "4000") == 16  # 8 would fit: never under 16
    assert sequences() == 16  # the default 3072 tokens
    assert sequences("--max-tokens", "4000", "--particles", "100") == 100
    assert sequences("--max-tokens", "100", "--particles", "20") == 20
    assert sequences("--max-tokens", "1024", "--rejuvenate", "2") == 2 * 16  # two sequences per particle
    assert sequences("--max-tokens", "100", "--rejuvenate", "2") == 2 * 127  # at most 127 with --rejuvenate
    assert sequences("--method", "power", "--max-tokens", "4000", "--round-width", "1") == 2  # MH: no particles
