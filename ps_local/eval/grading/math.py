"""MATH-style answer grading: the last \\boxed{}, string normalization, then math-verify's
equivalence check in the sandbox. No model text is ever evaluated inside ps-local."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace

from ...errors import UserError
from .sandbox import Limits, run_python


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), nested braces included."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        # "\boxed 5": the answer runs to the next space or dollar sign.
        match = re.match(r"\\boxed ([^\s$]+)", text[start:])
        return match.group(1) if match else None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index]
    return None  # unbalanced: the sample was cut off inside the box


def _fix_fracs(text: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}
    parts = text.split("\\frac")
    fixed = parts[0]
    for part in parts[1:]:
        fixed += "\\frac"
        if part.startswith("{") or len(part) < 2:
            fixed += part
            continue
        numerator, rest = part[0], part[1:]
        if rest.startswith("{"):
            fixed += "{" + numerator + "}" + rest
        else:
            fixed += "{" + numerator + "}{" + rest[0] + "}" + rest[1:]
    return fixed


def _fix_a_slash_b(text: str) -> str:
    match = re.fullmatch(r"(-?\d+)/(\d+)", text)
    return f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}" if match else text


def _fix_sqrt(text: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)


def normalize(answer: str) -> str:
    """MATH's string normalization (Hendrycks et al.), with a few more spellings."""
    text = answer.strip().replace("\n", "").replace("\\!", "")
    text = text.replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    text = text.replace("\\$", "").replace("$", "")
    text = re.sub(r"\\(?:text|mbox)\{\s+[^{}]*\}$", "", text)  # trailing units: "5\text{ cm}"
    text = re.sub(r"\\(?:text|mbox|mathrm|textbf)\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\%", "").replace("%", "")
    text = text.replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if text.startswith("."):
        text = "0" + text
    if "=" in text and len(text.split("=")[0].strip()) <= 2:
        text = text.split("=", 1)[1]  # "x = 5" -> "5"
    text = _fix_sqrt(text).replace(" ", "")
    text = _fix_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    text = _fix_a_slash_b(text)
    return text.rstrip(".")


# Runs in the sandbox, never in ps-local: math-verify parses LaTeX with its own grammar (no
# eval), and the sandbox's time and memory limits bound what sympy does with the result (a
# power tower such as 9^{9^{9^9}} cannot hang or exhaust ps-local).
VERIFIER = """
import json, sys
from math_verify import parse, verify
results = []
for candidate, reference in json.load(sys.stdin):
    try:
        results.append(bool(verify(parse("$" + reference + "$"), parse("$" + candidate + "$"))))
    except Exception:
        results.append(False)
json.dump(results, sys.stdout)
"""
VERIFY_LIMITS = Limits(wall_s=30.0, cpu_s=30, memory_bytes=2 << 30)


def verify_pairs(pairs: list[tuple[str, str]]) -> list[bool]:
    """math-verify's verdict on each (candidate, reference) pair, in one sandboxed run; a run
    that fails or runs out of time shows nothing to be equal."""
    if not pairs:
        return []
    extra = 2 * len(pairs)
    limits = replace(VERIFY_LIMITS, wall_s=VERIFY_LIMITS.wall_s + extra, cpu_s=VERIFY_LIMITS.cpu_s + extra)
    result = run_python(VERIFIER, limits, stdin=json.dumps(pairs).encode())
    try:
        verdicts = json.loads(result.stdout) if result.returncode == 0 else None
    except ValueError:
        verdicts = None
    if not isinstance(verdicts, list) or len(verdicts) != len(pairs):
        return [False] * len(pairs)
    return [verdict is True for verdict in verdicts]


def require_verifier() -> None:
    """UserError at start when math-verify is missing: never silently wrong grades."""
    if importlib.util.find_spec("math_verify") is None:
        raise UserError("MATH grading needs math-verify: pip install 'ps-local[eval]'")


def are_equivalent(pairs: list[tuple[str | None, str]]) -> list[bool]:
    """Whether each model answer means its reference: MATH normalization first, then
    math-verify (numbers, fractions, roots, tuples, intervals, symbolic expressions)."""
    verdicts: list[bool | None] = []
    to_verify: list[tuple[str, str]] = []
    for candidate, reference in pairs:
        if candidate is None:
            verdicts.append(False)
        elif normalize(candidate) == normalize(reference):
            verdicts.append(True)
        else:
            verdicts.append(None)
            to_verify.append((normalize(candidate), normalize(reference)))
    verified = iter(verify_pairs(to_verify))
    return [next(verified) if verdict is None else verdict for verdict in verdicts]


def is_equivalent(candidate: str | None, reference: str) -> bool:
    """Whether a model's answer means the reference answer."""
    return are_equivalent([(candidate, reference)])[0]


def grade(completion: str, reference: str) -> tuple[str | None, bool]:
    answer = last_boxed(completion)
    return answer, is_equivalent(answer, reference)
