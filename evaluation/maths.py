r"""Math word problems and competition math: GSM8K (final number) and MATH (boxed answer), accuracy.

GSM8K follows lm-evaluation-harness's ``gsm8k`` scoring (:data:`GSM8K_PROTOCOL`): the headline ``accuracy`` is
its ``strict-match`` (the *first* ``#### <number>`` of the answer, so a model that goes on to invent and
answer a new question is scored on its own first answer) and ``accuracy_flexible`` its ``flexible-extract``
(the last number); both compared with the gold after ``####`` as the harness's ``exact_match`` does (commas,
dollar signs and a final period removed, case ignored). MATH is scored with Hugging Face's ``math-verify``
(:data:`MATH_PROTOCOL`): the gold answer and the generated solution are parsed (boxed answers, LaTeX and
plain expressions) and compared symbolically.
"""

from __future__ import annotations

import re
from typing import Any

from evaluation.generation import Generator
from evaluation.sources import Source

SOURCES = {
    "gsm8k": Source("gsm8k", "openai/gsm8k", "main", "test", ("question", "answer")),
    "math": Source("math", "HuggingFaceH4/MATH-500", None, "test", ("problem", "solution", "answer")),
}
GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final number on its own line as '#### <number>'."
MATH_INSTRUCTION = "Solve the problem, then write the final answer inside \\boxed{}."

GSM8K_PROTOCOL = {
    "reference": "EleutherAI lm-evaluation-harness, task gsm8k (filters strict-match, flexible-extract)",
    "version": "lm-eval 0.4.13, gsm8k task version 3.0; prompt wording ours, zero-shot",
    "headline": "accuracy: strict-match (first '#### <number>'), exact_match after the harness's regexes",
    "other_metrics": "accuracy_flexible: flexible-extract (last number)",
}
MATH_PROTOCOL = {
    "reference": "Hugging Face math-verify (parse + verify) on MATH-500",
    "version": "math-verify 0.9",
    "headline": "accuracy: math_verify.verify(parse(gold), parse(generated solution))",
}
PROTOCOLS = {"gsm8k": GSM8K_PROTOCOL, "math": MATH_PROTOCOL}
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")


def harness_normalise(text: str) -> str:
    """A GSM8K answer as the harness's ``exact_match`` compares it (its ``regexes_to_ignore`` removed,
    lower case).
    """
    for pattern in _IGNORED:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_gold(answer: str) -> str:
    """The normalised number after ``####`` in a GSM8K answer."""
    if "#### " not in answer:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer[-60:]!r}")
    return harness_normalise(answer)


def strict_match(text: str) -> str | None:
    """The harness's ``strict-match``: the number of the first ``#### <number>``, or None."""
    found = _STRICT.search(text)
    return found.group(1) if found else None


def flexible_extract(text: str) -> str | None:
    """The harness's ``flexible-extract``: the last number-like run of the text, or None."""
    found = _FLEXIBLE.findall(text)
    return next((g for g in found[-1] if g), None) if found else None


def gsm8k_hit(pred: str | None, gold: str) -> bool:
    """Whether an extracted answer equals the gold under the harness's ``exact_match``."""
    return pred is not None and harness_normalise(pred) == gold


def math_verified(solution: str, gold: str) -> tuple[bool, bool]:
    """(whether math-verify finds ``solution``'s answer equal to ``gold``, whether it found an answer)."""
    from math_verify import parse, verify

    answer = parse(solution)
    return bool(answer) and verify(parse(f"${gold}$"), answer), bool(answer)


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


def evaluate(gen: Generator, bench: str, rows: list[dict], max_new_tokens: int = 256) -> dict[str, Any]:
    """Accuracy (GSM8K: also the flexible one) and the number of answers no final answer was read from."""
    if bench == "gsm8k":
        prompts = [gen.prompt(f"{r['question']}\n{GSM8K_INSTRUCTION}") for r in rows]
        answers = gen.generate(prompts, max_new_tokens=max_new_tokens, desc=bench)
        golds = [gsm8k_gold(r["answer"]) for r in rows]
        strict = [strict_match(a) for a in answers]
        flexible = [gsm8k_hit(flexible_extract(a), g) for a, g in zip(answers, golds, strict=True)]
        hits = [gsm8k_hit(p, g) for p, g in zip(strict, golds, strict=True)]
        extra = {"accuracy_flexible": sum(flexible) / len(rows)}
        unparsed = sum(p is None for p in strict)
    elif bench == "math":
        prompts = [gen.prompt(f"{r['problem']}\n{MATH_INSTRUCTION}") for r in rows]
        answers = gen.generate(prompts, max_new_tokens=max_new_tokens, desc=bench)
        golds = [r.get("answer") or last_boxed(r["solution"]) or "" for r in rows]
        verdicts = [math_verified(a, g) for a, g in zip(answers, golds, strict=True)]
        hits, extra = [hit for hit, _ in verdicts], {}
        unparsed = sum(not found for _, found in verdicts)
    else:
        raise KeyError(bench)
    return {"accuracy": sum(hits) / len(rows), **extra, "unparsed": unparsed, "n": len(rows)}
