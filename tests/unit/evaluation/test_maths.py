import pytest

from evaluation.maths import (
    flexible_extract,
    gsm8k_gold,
    gsm8k_hit,
    last_boxed,
    math_verified,
    strict_match,
)


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("3 * 4 = 12 pens.\n#### 12", "12", "12"),
        # a model that answers, then invents and answers a new question, is scored on its first answer
        ("#### 7\nQuestion: what is 90 + 9?\nAnswer: #### 99", "7", "99"),
        ("The total is 2,000 cups.\n#### 2,000.", "2,000.", "2,000."),
        ("First 10, then 20, finally 35 apples", None, "35"),
        ("####12 (no space: not the harness's form)", None, "12"),
        ("no numbers here", None, None),
    ],
)
def test_gsm8k_extraction_follows_the_harness_filters(text, strict, flexible):
    assert strict_match(text) == strict and flexible_extract(text) == flexible


def test_gsm8k_exact_match_ignores_commas_dollars_and_a_final_period():
    gold = gsm8k_gold("so <<1250+750=2000>>2000\n#### 2,000")
    assert gold == "2000"
    assert gsm8k_hit("2,000.", gold) and gsm8k_hit("$2000", gold)
    assert not gsm8k_hit("2000.0", gold) and not gsm8k_hit(None, gold)
    with pytest.raises(ValueError, match="no '#### <number>' line"):
        gsm8k_gold("the answer is 5")


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5 apples", "5"),
        ("no box", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_last_boxed_balances_braces(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("x = 2", "2"),
        ("90^\\circ", "90"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("3.0", "3"),
        ("5 \\text{ cm}", "5"),
        ("1,000", "1000"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),  # equal as expressions, which no string normaliser sees
    ],
)
def test_math_verify_accepts_equal_answers(pred, gold):
    assert math_verified(f"So the answer is $\\boxed{{{pred}}}$.", gold) == (True, True)


@pytest.mark.parametrize(("pred", "gold"), [("\\frac{1}{3}", "\\frac{1}{2}"), ("2", "-2"), ("(1,2)", "(2,1)")])
def test_math_verify_rejects_different_answers(pred, gold):
    assert math_verified(f"$\\boxed{{{pred}}}$", gold) == (False, True)


def test_a_solution_without_an_answer_is_unparsed():
    assert math_verified("I do not know", "1") == (False, False)


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["gsm8k", "math"])
def test_each_math_benchmark_end_to_end(gen, rows, bench):
    from evaluation.maths import evaluate

    data = rows(bench)
    m = evaluate(gen, bench, data, max_new_tokens=32)
    assert m["n"] == len(data) and 0.0 <= m["accuracy"] <= 1.0 and 0 <= m["unparsed"] <= len(data)
    if bench == "gsm8k":
        assert 0.0 <= m["accuracy_flexible"] <= 1.0
