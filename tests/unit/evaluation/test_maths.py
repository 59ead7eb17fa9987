import pytest

from evaluation.maths import (
    extract_math_answer,
    extract_number,
    gsm8k_gold,
    last_boxed,
    math_equal,
    normalize_math,
    parse_number,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234", 1234.0),
        ("-7", -7.0),
        ("−3.5", -3.5),
        ("$1,234.50", 1234.5),
        ("45%", 45.0),
        ("12 cm", 12.0),
        ("8 dollars.", 8.0),
        (".5", 0.5),
        ("abc", None),
        ("1,23", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3 * 4 = 12 pens.\n#### 12", 12.0),
        ("The total is 1,250 + 750 = 2,000 cups. The answer is 2,000.", 2000.0),
        ("She pays $5 then gets 3 back, so the answer is: -2 dollars", -2.0),
        ("First 10, then 20, finally 35 apples", 35.0),
        ("Answer: 0.75", 0.75),
        ("#### 7\nSome trailing 99 text", 7.0),
        ("no numbers here", None),
    ],
)
def test_extract_number_from_generated_solutions(text, value):
    assert extract_number(text) == value


def test_gsm8k_gold_with_separators():
    assert gsm8k_gold("so <<1250+750=2000>>2000\n#### 2,000") == 2000.0
    with pytest.raises(ValueError, match="no number after"):
        gsm8k_gold("#### many")


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
        ("1/2", "\\frac{1}{2}"),
        ("x = 2", "2"),
        ("90^\\circ", "90"),
        ("\\$5", "5"),
        ("10\\%", "10"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("3.0", "3"),
        ("5 \\text{ cm}", "5"),
        ("1,000", "1000"),
        ("\\sqrt2", "\\sqrt{2}"),
    ],
)
def test_math_answers_that_agree(pred, gold):
    assert math_equal(pred, gold), (normalize_math(pred), normalize_math(gold))


@pytest.mark.parametrize(
    ("pred", "gold"), [("\\frac{1}{3}", "\\frac{1}{2}"), ("2", "-2"), (None, "1"), ("(1,2)", "(2,1)")]
)
def test_math_answers_that_differ(pred, gold):
    assert not math_equal(pred, gold)


def test_extract_math_answer_prefers_the_last_box():
    assert extract_math_answer("try \\boxed{3}... no, \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_math_answer("So the answer is $\\frac{3}{4}$.") == "\\frac{3}{4}"
    assert extract_math_answer("I do not know") is None


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["gsm8k", "math"])
def test_each_math_benchmark_end_to_end(gen, rows, bench):
    from evaluation.maths import evaluate

    data = rows(bench)
    m = evaluate(gen, bench, data, max_new_tokens=32)
    assert m["n"] == len(data) and 0.0 <= m["accuracy"] <= 1.0 and 0 <= m["unparsed"] <= len(data)
