"""Preference pairs for federated DPO from the built-in synthetic rows.

:func:`make_pairs` turns synthetic instruction rows into an offline preference set:
chosen = the correct answer, rejected = a plausible wrong one of the same domain
(the words not reversed, the opposite label, a digit off by one, the wrong factor).
The DPO metrics that score an adapter on such pairs are in :mod:`evaluation.preferences`.
"""

from __future__ import annotations

import random

from fedllm_app.data.rows import Row


def wrong_answer(row: Row, rng: random.Random) -> str:
    """A plausible wrong answer to a synthetic row."""
    domain, right = row["domain"], row["response"]
    if domain == "reverse":
        return row["instruction"].split(": ", 1)[1]  # the words as given, not reversed
    if domain == "sentiment":
        return "negative" if right == "positive" else "positive"
    if domain == "arithmetic":
        n = int(right)
        return str(n + 1 if n < 9 and (n == 0 or rng.random() < 0.5) else n - 1)
    if domain == "units":
        return str(int(right) // 10)  # a factor of 100 instead of 1000
    raise ValueError(f"no wrong answer for domain {domain!r}")


def make_pairs(rows: list[Row], seed: int) -> list[Row]:
    """Preference pairs from synthetic instruction rows (deterministic in ``seed``)."""
    rng = random.Random(f"fedllm-pairs-{seed}")
    return [
        {
            "prompt": [{"role": "user", "content": r["instruction"]}],
            "chosen": r["response"],
            "rejected": wrong_answer(r, rng),
            "domain": r["domain"],
        }
        for r in rows
    ]
