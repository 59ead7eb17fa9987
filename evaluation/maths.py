r"""Math word problems and competition math: GSM8K (final number) and MATH (boxed answer), accuracy.

GSM8K's gold answer follows ``####``; a prediction's answer is the number after ``####`` / "the answer is",
else its last number, compared numerically after removing thousands separators, currency, percent signs and
units. MATH's gold answer is the dataset's ``answer`` field (or the last ``\boxed{}`` of the solution); a
prediction's is its last ``\boxed{}``, else "the answer is ...", both normalised (``\dfrac``-> ``\frac``,
``\frac12`` -> ``\frac{1}{2}``, no ``\left``/``\right``, units, degrees, dollars, spaces) and also compared
as numbers when both sides evaluate to one (``\frac{1}{2}`` equals ``0.5``).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from evaluation.generation import Generator
from evaluation.sources import Source

SOURCES = {
    "gsm8k": Source("gsm8k", "openai/gsm8k", "main", "test", ("question", "answer")),
    "math": Source("math", "HuggingFaceH4/MATH-500", None, "test", ("problem", "solution", "answer")),
}
GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final number on its own line as '#### <number>'."
MATH_INSTRUCTION = "Solve the problem, then write the final answer inside \\boxed{}."

_NUMBER = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-−]?\.\d+"


def parse_number(text: str) -> float | None:
    """A number written with separators, sign, currency, percent or trailing units; None if not one."""
    t = text.strip().replace("−", "-").replace("$", "").replace("\\$", "").replace("%", "").replace("\\%", "")
    t = re.sub(r"\\!|\\,|\s", "", t).rstrip(".")
    match = re.fullmatch(r"(-?)(\d{1,3}(?:,\d{3})+|\d*)(\.\d+)?(?:[a-zA-Z]+\.?)?", t)
    if not match or not (match.group(2) or match.group(3)):
        return None
    return float(match.group(1) + match.group(2).replace(",", "") + (match.group(3) or ""))


def gsm8k_gold(answer: str) -> float:
    """The number after ``####`` in a GSM8K answer."""
    value = parse_number(answer.split("####")[-1])
    if value is None:
        raise ValueError(f"GSM8K answer has no number after '####': {answer[-60:]!r}")
    return value


def extract_number(text: str) -> float | None:
    """The final number of a generated solution (after ``####`` or "answer is", else the last one)."""
    for marker in (r"####\s*", r"answer is[:\s]*", r"[Aa]nswer:\s*"):
        found = re.findall(marker + rf"({_NUMBER})", text)
        if found:
            return parse_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return parse_number(numbers[-1]) if numbers else None


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``, ``\boxed 5``), braces balanced."""
    start, tag = max((text.rfind(tag), tag) for tag in ("\\boxed", "\\fbox"))
    if start < 0:
        return None
    rest = text[start + len(tag) :]
    if not rest.startswith("{"):
        word = re.match(r"\s+([^\s$]+)", rest)
        return word.group(1) if word else None
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i]
    return None


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    return re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)


def normalize_math(answer: str) -> str:
    """A canonical string for a MATH answer (see the module docstring)."""
    s = answer.strip().replace("\n", "").replace("\\!", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\^\{?\\circ\}?", "", s).replace("\\%", "").replace("%", "")
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{[^{}]*\}", "", s)
    s = re.sub(r"(\d)\s*(?:units?|cm|m|km|inches|inch|feet|ft|degrees|dollars|cents)\b.*$", r"\1", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s) if len(s.split("=")[0]) <= 2 else s
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "").replace("\\,", "").replace("\\;", "")
    s = _fix_fracs(s)
    s = re.sub(r"^(-?\d+)/(\d+)$", r"\\frac{\1}{\2}", s)
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s) if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def _as_fraction(s: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    try:
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        return Fraction(s) if re.fullmatch(r"-?\d*\.?\d+", s) else None
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(pred: str | None, gold: str) -> bool:
    """Whether two MATH answers agree after normalisation (or as numbers)."""
    if pred is None:
        return False
    a, b = normalize_math(pred), normalize_math(gold)
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    return fa is not None and fa == fb


def extract_math_answer(text: str) -> str | None:
    """The last boxed answer of a generated solution, else what follows "the answer is"."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    m = re.findall(r"answer is:?\s*\$?([^\n$]+?)\$?\s*\.?\s*$", text.strip(), flags=re.IGNORECASE | re.MULTILINE)
    return m[-1].strip() if m else None


def evaluate(gen: Generator, bench: str, rows: list[dict], max_new_tokens: int = 256) -> dict[str, Any]:
    """Accuracy and the number of answers no final answer could be read from."""
    if bench == "gsm8k":
        prompts = [gen.prompt(f"{r['question']}\n{GSM8K_INSTRUCTION}") for r in rows]
        answers = gen.generate(prompts, max_new_tokens=max_new_tokens, desc=bench)
        preds = [extract_number(a) for a in answers]
        golds = [gsm8k_gold(r["answer"]) for r in rows]
        hits = [p is not None and abs(p - g) < 1e-6 for p, g in zip(preds, golds, strict=True)]
    elif bench == "math":
        prompts = [gen.prompt(f"{r['problem']}\n{MATH_INSTRUCTION}") for r in rows]
        answers = gen.generate(prompts, max_new_tokens=max_new_tokens, desc=bench)
        preds = [extract_math_answer(a) for a in answers]
        golds = [r.get("answer") or last_boxed(r["solution"]) or "" for r in rows]
        hits = [math_equal(p, g) for p, g in zip(preds, golds, strict=True)]
    else:
        raise KeyError(bench)
    return {"accuracy": sum(hits) / len(rows), "unparsed": sum(p is None for p in preds), "n": len(rows)}
