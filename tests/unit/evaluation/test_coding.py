from math import comb

import pytest

from evaluation.coding import extract_code, pass_at_k, program_for
from evaluation.sandbox import run_program


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
        assert run_program(program_for("humaneval", row, row["canonical_solution"])).passed
        full = f"```python\n{row['prompt']}{row['canonical_solution']}```"  # a whole-function answer
        assert run_program(program_for("humaneval", row, full)).passed
        assert not run_program(program_for("humaneval", row, "    return None\n")).passed
    for row in rows("mbpp"):
        assert run_program(program_for("mbpp", row, row["code"])).passed
        assert not run_program(program_for("mbpp", row, "def nothing():\n    pass\n")).passed


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["humaneval", "mbpp"])
def test_each_code_benchmark_end_to_end(gen, rows, bench):
    from evaluation.coding import evaluate

    data = rows(bench)
    m = evaluate(gen, bench, data, samples=2, timeout=5, max_new_tokens=32)
    assert m["n"] == len(data) and m["samples"] == 2
    assert 0.0 <= m["pass@1"] <= 1.0 and "pass@5" not in m
