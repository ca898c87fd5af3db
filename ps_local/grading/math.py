"""MATH-style answer grading: the last \\boxed{}, string normalization, then sympy equivalence."""

from __future__ import annotations

import re
import signal
from contextlib import contextmanager
from typing import Iterator

SYMPY_SECONDS = 5  # an equivalence check that takes longer counts as "not equivalent"


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


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _tuple(text: str) -> tuple[str, list[str]] | None:
    """(brackets, elements) of "(1,2)", "[0,1)" or "1,2"; None for a single value."""
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]":
        parts = _split_top_level(text[1:-1])
        if len(parts) > 1:
            return text[0] + text[-1], parts
    parts = _split_top_level(text)
    return ("", parts) if len(parts) > 1 else None


def _to_sympy_source(text: str) -> str:
    """A small LaTeX -> sympy-syntax translation, enough for MATH answers."""
    while True:
        # Innermost \frac and \sqrt first; bare braces only when none is left to rewrite.
        rewritten = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", text)
        rewritten = re.sub(r"\\sqrt\[([^{}]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", rewritten)
        rewritten = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", rewritten)
        if rewritten == text:
            rewritten = re.sub(r"(?<!\\frac)(?<!\\sqrt)(?<!\})(?<!\])\{([^{}]*)\}", r"(\1)", text)
            if rewritten == text:
                break
        text = rewritten
    text = text.replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    text = text.replace("\\pi", "pi").replace("\\infty", "oo").replace("\\", "")
    return text


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError

    try:
        previous = signal.signal(signal.SIGALRM, expire)
    except ValueError:  # not the main thread: no alarm available, run unguarded
        yield
        return
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _sympy_equal(left: str, right: str) -> bool:
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )
    except ImportError:
        return False
    transformations = standard_transformations + (implicit_multiplication_application,)
    try:
        with _time_limit(SYMPY_SECONDS):
            a = parse_expr(_to_sympy_source(left), transformations=transformations, evaluate=True)
            b = parse_expr(_to_sympy_source(right), transformations=transformations, evaluate=True)
            difference = a - b
            if not difference.free_symbols:
                # Numbers: a numeric comparison is fast and enough.
                return abs(complex(sympy.N(difference))) < 1e-6 * max(1.0, abs(complex(sympy.N(b))))
            return sympy.simplify(difference) == 0
    except (TimeoutError, Exception):  # unparseable or too slow: not shown to be equal
        return False


def is_equivalent(candidate: str | None, reference: str) -> bool:
    """Whether a model's answer means the reference answer."""
    if candidate is None:
        return False
    left, right = normalize(candidate), normalize(reference)
    if left == right:
        return True
    left_tuple, right_tuple = _tuple(left), _tuple(right)
    if left_tuple or right_tuple:
        # Tuples and intervals: the same brackets, element by element.
        if not (left_tuple and right_tuple) or left_tuple[0] != right_tuple[0]:
            return False
        return len(left_tuple[1]) == len(right_tuple[1]) and all(
            is_equivalent(a, b) for a, b in zip(left_tuple[1], right_tuple[1])
        )
    return _sympy_equal(left, right)


def grade(completion: str, reference: str) -> tuple[str | None, bool]:
    answer = last_boxed(completion)
    return answer, is_equivalent(answer, reference)
