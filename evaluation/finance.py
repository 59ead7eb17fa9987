"""Financial sentiment: FPB, FiQA-SA, TFNS and NWGI, as in the FinGPT sentiment benchmarks.

Each headline/tweet becomes an instruction asking for one of ``negative``, ``neutral`` or ``positive`` (the
FinGPT label set and answer form; the instruction wording is ours). The headline ``accuracy``, ``f1_macro``
and ``f1_weighted`` map the generated answer to a label as FinGPT's benchmark does (:func:`fingpt_label`:
"positive" anywhere wins, then "negative", anything else is neutral); the ``*_strict`` scores keep our
stricter reading (:func:`extract_label`: the first label word, negations skipped, an answer naming none is
unparsed and wrong).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from evaluation.generation import Generator
from evaluation.sources import PARQUET_EXPORT, Source

LABELS = ("negative", "neutral", "positive")
PROTOCOL = {
    "reference": "FinGPT sentiment benchmarks (fingpt/FinGPT_Benchmark/benchmarks: fpb, fiqa, tfns, nwgi)",
    "version": "FinGPT splits, label maps and answer mapping (change_target); prompt wording ours",
    "headline": "accuracy, f1_macro, f1_weighted with FinGPT's answer mapping",
    "other_metrics": "*_strict: first label word, negations skipped, none named = unparsed",
}
NEWS = "What is the sentiment of this financial news? Answer with one word: negative, neutral or positive."
TWEET = "What is the sentiment of this financial tweet? Answer with one word: negative, neutral or positive."

# NWGI's seven grades collapse to three classes as in FinGPT's evaluation (mild grades count as neutral).
NWGI_LABELS = {
    "strong negative": "negative",
    "strongly negative": "negative",
    "moderately negative": "negative",
    "mildly negative": "neutral",
    "neutral": "neutral",
    "mildly positive": "neutral",
    "moderately positive": "positive",
    "strong positive": "positive",
    "strongly positive": "positive",
}
TFNS_LABELS = {0: "negative", 1: "positive", 2: "neutral"}  # Bearish, Bullish, Neutral
FPB_LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def fiqa_label(score: float) -> str:
    """FiQA-SA's continuous sentiment score in [-1, 1] as a class (FinGPT's thresholds of +-0.1)."""
    return "negative" if score < -0.1 else "positive" if score >= 0.1 else "neutral"


def _seeded_test(test_size: float) -> Callable[[Any], Any]:
    def select(ds: Any) -> Any:
        return ds.train_test_split(test_size=test_size, seed=42)["test"]

    return select


SOURCES = {
    # The dataset is a loading script; its Parquet export on the Hub holds the same rows.
    "fpb": Source(
        "fpb",
        "takala/financial_phrasebank",
        "sentences_50agree",
        "train",
        ("sentence", "label"),
        _seeded_test(0.25),
        revision=PARQUET_EXPORT,
    ),
    # FinGPT pools FiQA's three splits and draws a seeded 22.6% test split; so does this.
    "fiqa_sa": Source(
        "fiqa_sa",
        "pauri32/fiqa-2018",
        None,
        "train+validation+test",
        ("sentence", "sentiment_score", "format"),
        _seeded_test(0.226),
    ),
    "tfns": Source("tfns", "zeroshot/twitter-financial-news-sentiment", None, "validation", ("text", "label")),
    "nwgi": Source("nwgi", "oliverwang15/news_with_gpt_instructions", None, "test", ("news", "label")),
}


def example(bench: str, row: dict) -> tuple[str, str]:
    """(instruction, gold label) of one row of ``bench``."""
    if bench == "fpb":
        return f"{NEWS}\n{row['sentence']}", FPB_LABELS[int(row["label"])]
    if bench == "fiqa_sa":
        question = TWEET if str(row.get("format", "")).lower() == "post" else NEWS
        return f"{question}\n{row['sentence']}", fiqa_label(float(row["sentiment_score"]))
    if bench == "tfns":
        return f"{TWEET}\n{row['text']}", TFNS_LABELS[int(row["label"])]
    if bench == "nwgi":
        label = str(row["label"]).strip().lower()
        if label not in NWGI_LABELS:
            raise ValueError(f"NWGI label {row['label']!r} is not one of {sorted(NWGI_LABELS)}")
        return f"{NEWS}\n{row['news']}", NWGI_LABELS[label]
    raise KeyError(bench)


def fingpt_label(text: str) -> str:
    """FinGPT's reading of an answer: ``positive`` if it contains "positive" or "Positive", else
    ``negative`` if it contains "negative" or "Negative", else ``neutral``.
    """
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"


def extract_label(text: str) -> str | None:
    """The sentiment label an answer states: the first of the three words it uses, ignoring negated
    mentions ("not negative"); None if it names none.
    """
    words = re.findall(r"[a-z]+", text.lower())
    for i, w in enumerate(words):
        for label in LABELS:
            if w == label or (w.startswith(label) and w[len(label) :] in ("ly", "s")):
                if i > 0 and words[i - 1] in ("not", "no", "neither", "nor"):
                    break
                return label
        if w in ("bullish", "bearish"):
            return "positive" if w == "bullish" else "negative"
    return None


def f1_scores(gold: list[str], pred: list[str | None], labels: tuple[str, ...] = LABELS) -> tuple[float, float]:
    """Macro and support-weighted F1 over ``labels`` (an unparsed prediction is wrong for every class)."""
    support = Counter(gold)
    f1 = {}
    for c in labels:
        tp = sum(g == c and p == c for g, p in zip(gold, pred, strict=True))
        fp = sum(g != c and p == c for g, p in zip(gold, pred, strict=True))
        fn = sum(g == c and p != c for g, p in zip(gold, pred, strict=True))
        f1[c] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    present = [c for c in labels if support[c] or any(p == c for p in pred)]
    macro = sum(f1[c] for c in present) / max(len(present), 1)
    weighted = sum(f1[c] * support[c] for c in labels) / max(len(gold), 1)
    return macro, weighted


def scores(gold: list[str], answers: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1 and weighted F1 of ``answers`` under FinGPT's answer mapping (headline) and the
    strict one (``*_strict``), and the number of answers the strict mapping could not read.
    """
    metrics: dict[str, Any] = {}
    for suffix, mapping in (("", fingpt_label), ("_strict", extract_label)):
        pred = [mapping(a) for a in answers]
        macro, weighted = f1_scores(gold, pred)
        metrics[f"accuracy{suffix}"] = sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold)
        metrics[f"f1_macro{suffix}"] = macro
        metrics[f"f1_weighted{suffix}"] = weighted
    metrics["unparsed_strict"] = sum(extract_label(a) is None for a in answers)
    metrics["n"] = len(gold)
    return metrics


def evaluate(gen: Generator, bench: str, rows: list[dict]) -> dict[str, Any]:
    """:func:`scores` of the model's greedy answers on ``rows``."""
    pairs = [example(bench, r) for r in rows]
    answers = gen.generate([gen.prompt(q) for q, _ in pairs], max_new_tokens=16, desc=bench)
    return scores([g for _, g in pairs], answers)
