import pytest

from evaluation.finance import example, extract_label, f1_scores, fingpt_label, fiqa_label, scores


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("positive", "positive"),
        ("  Negative.", "negative"),
        ("The sentiment is NEUTRAL", "neutral"),
        ("It is not negative, it is positive", "positive"),
        ("Positively bullish", "positive"),
        ("bearish outlook", "negative"),
        ("Answer: neutral/positive", "neutral"),
        ("I cannot tell", None),
        ("", None),
        ("negatives outweigh", "negative"),
    ],
)
def test_extract_label_on_tricky_answers(text, label):
    assert extract_label(text) == label


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("positive", "positive"),
        ("It is not negative, it is positive", "positive"),  # positive wins when both appear
        ("Negative, though some say Positive", "positive"),
        ("  Negative.", "negative"),
        ("I cannot tell", "neutral"),  # neither word: neutral
        ("", "neutral"),
        ("bearish outlook", "neutral"),  # FinGPT reads only the two words
        ("POSITIVE", "neutral"),  # and only in lower case or capitalised
    ],
)
def test_fingpt_mapping_reads_answers_as_fingpt_does(text, label):
    assert fingpt_label(text) == label


def test_headline_scores_use_fingpt_mapping_and_strict_ones_keep_their_name():
    gold = ["neutral", "positive", "negative"]
    answers = ["I cannot tell", "not negative but positive", "Negative"]
    m = scores(gold, answers)
    assert m["accuracy"] == 1.0 and m["f1_macro"] == 1.0  # unreadable -> neutral; positive wins
    assert m["accuracy_strict"] == pytest.approx(2 / 3) and m["unparsed_strict"] == 1  # unreadable is wrong
    assert m["n"] == 3 and "unparsed" not in m


def test_f1_against_hand_computed_values():
    gold = ["positive", "positive", "negative", "neutral"]
    pred = ["positive", "negative", "negative", None]
    macro, weighted = f1_scores(gold, pred)
    # positive: tp1 fp0 fn1 -> 2/3; negative: tp1 fp1 fn0 -> 2/3; neutral: tp0 -> 0
    assert macro == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert weighted == pytest.approx((2 / 3 * 2 + 2 / 3 * 1 + 0) / 4)
    assert f1_scores(gold, list(gold)) == (1.0, 1.0)


def test_label_mappings_follow_each_dataset(rows):
    assert [example("fpb", r)[1] for r in rows("fpb")] == ["positive", "neutral", "negative"]
    assert [example("tfns", r)[1] for r in rows("tfns")] == ["negative", "positive", "neutral"]
    assert [example("nwgi", r)[1] for r in rows("nwgi")] == ["positive", "negative", "neutral", "neutral"]
    assert [example("fiqa_sa", r)[1] for r in rows("fiqa_sa")] == ["negative", "positive", "neutral"]
    assert "tweet" in example("fiqa_sa", rows("fiqa_sa")[1])[0]  # a 'post' is asked about as a tweet
    assert (fiqa_label(-0.1), fiqa_label(0.1), fiqa_label(0.0999)) == ("neutral", "positive", "neutral")
    with pytest.raises(ValueError, match="NWGI label 'great'"):
        example("nwgi", {"news": "x", "label": "great"})


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["fpb", "fiqa_sa", "tfns", "nwgi"])
def test_each_finance_benchmark_end_to_end(gen, rows, bench):
    from evaluation.finance import evaluate

    data = rows(bench)
    m = evaluate(gen, bench, data)
    assert m["n"] == len(data)
    assert all(0.0 <= m[k] <= 1.0 for k in ("accuracy", "f1_macro", "f1_weighted", "accuracy_strict"))
    assert 0 <= m["unparsed_strict"] <= len(data)
