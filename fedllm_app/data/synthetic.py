"""Deterministic multi-domain instruction data for the embedded default.

Four domains a ~1M-parameter byte-level model can learn with LoRA:

- ``reverse``: reverse the order of two words.
- ``sentiment``: label a templated headline by its keyword (positive/negative).
- ``arithmetic``: add or subtract 1 or 2, single-digit operands and answer.
- ``units``: convert kilo-units to base units (one factor of 1000).

Everything is a pure function of a seed, so the server and every client rebuild
exactly the same rows without exchanging them. The held-out evaluation asks prompts no
client trains on: :func:`heldout_prompts` sets aside a share of each domain's finite prompt
space (:func:`prompt_space`), and :func:`generate` draws training and held-out rows from the
two sides (the benchmark's
non-IID split is :func:`fedllm_app.data.partitions.split_by_dominance`). :func:`pretraining_corpus` gives the
generic text of the same surface form used to pre-train the tiny base model: it
never contains an answer of the four tasks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from itertools import permutations

DOMAINS: tuple[str, ...] = ("reverse", "sentiment", "arithmetic", "units")

WORDS = tuple(
    "red fox sun cat dog sky tree blue cold fast moon rain fish bird lamp "
    "door milk rock star wind gold salt ship road leaf wolf snow fire sand bell".split()
)
SUBJECTS = tuple(
    "Stocks,Shares,Markets,Profits,Sales,Exports,Banks,Bonds,Tech firms,Retailers,Airlines,Miners".split(",")
)
# Keywords whose first letter already tells the class (g/b): learnable byte by byte.
POSITIVE = ("gain", "grow", "glow", "gush")
NEGATIVE = ("bust", "bend", "balk", "blur")
TAILS = ("after the report", "this week", "on strong data", "in early trade", "as investors react", "today")
UNITS = (("km", "m"), ("kg", "g"), ("l", "ml"))
# Share of each domain's distinct prompts kept for the held-out evaluation (never trained on).
HELDOUT_SHARE = 0.25


@dataclass(frozen=True)
class Example:
    """One instruction/response pair with the domain it comes from."""

    instruction: str
    response: str
    domain: str

    def as_dict(self) -> dict[str, str]:
        return {"instruction": self.instruction, "response": self.response, "domain": self.domain}


def make_example(domain: str, rng: random.Random) -> Example:
    """Draw one example of ``domain``."""
    if domain == "reverse":
        words = rng.sample(WORDS, 2)
        return Example(f"Reverse the words: {' '.join(words)}", " ".join(reversed(words)), domain)
    if domain == "sentiment":
        positive = rng.random() < 0.5
        verb = rng.choice(POSITIVE if positive else NEGATIVE)
        headline = f"{rng.choice(SUBJECTS)} {verb} {rng.choice(TAILS)}"
        label = "positive" if positive else "negative"
        return Example(f"Sentiment of: {headline}", label, domain)
    if domain == "arithmetic":
        b = rng.randint(1, 2)
        if rng.random() < 0.5:
            a = rng.randint(0, 9 - b)
            return Example(f"What is {a} + {b}?", str(a + b), domain)
        a = rng.randint(b, 9)
        return Example(f"What is {a} - {b}?", str(a - b), domain)
    if domain == "units":
        big, small = rng.choice(UNITS)
        n = rng.randint(1, 9)
        return Example(f"Convert {n} {big} to {small}.", str(n * 1000), domain)
    raise ValueError(f"unknown synthetic domain {domain!r}; choose one of {', '.join(DOMAINS)}")


def prompt_space(domain: str) -> list[str]:
    """Every instruction :func:`make_example` can draw for ``domain``, in a fixed order."""
    if domain == "reverse":
        return [f"Reverse the words: {a} {b}" for a, b in permutations(WORDS, 2)]
    if domain == "sentiment":
        verbs = POSITIVE + NEGATIVE
        return [f"Sentiment of: {s} {v} {t}" for s in SUBJECTS for v in verbs for t in TAILS]
    if domain == "arithmetic":
        sums = [f"What is {a} + {b}?" for b in (1, 2) for a in range(10 - b)]
        return sums + [f"What is {a} - {b}?" for b in (1, 2) for a in range(b, 10)]
    if domain == "units":
        return [f"Convert {n} {big} to {small}." for big, small in UNITS for n in range(1, 10)]
    raise ValueError(f"unknown synthetic domain {domain!r}; choose one of {', '.join(DOMAINS)}")


def heldout_prompts(seed: int, share: float = HELDOUT_SHARE, domains: tuple[str, ...] = DOMAINS) -> frozenset[str]:
    """The instructions kept for evaluation: ``share`` of each domain's prompt space (at least one), by the seed."""
    if not 0 < share < 1:
        raise ValueError(f"held-out share {share} must lie strictly between 0 and 1")
    rng = random.Random(f"fedllm-heldout-prompts-{seed}")
    picked: set[str] = set()
    for domain in domains:
        space = prompt_space(domain)
        picked.update(rng.sample(space, max(1, math.ceil(share * len(space)))))
    return frozenset(picked)


def generate(
    n_per_domain: int, seed: int, domains: tuple[str, ...] = DOMAINS, keep: Callable[[str], bool] | None = None
) -> list[Example]:
    """``n_per_domain`` examples of every domain, interleaved, deterministic in ``seed``.

    With ``keep``, only examples whose instruction it accepts are drawn (e.g. the training or
    the held-out side of :func:`heldout_prompts`).
    """
    rng = random.Random(f"fedllm-synthetic-{seed}")
    rows = [_draw(d, rng, keep) for _ in range(n_per_domain) for d in domains]
    rng.shuffle(rows)
    return rows


def _draw(domain: str, rng: random.Random, keep: Callable[[str], bool] | None) -> Example:
    ex = make_example(domain, rng)
    while keep is not None and not keep(ex.instruction):
        ex = make_example(domain, rng)
    return ex


def train_test(n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """The benchmark's training and held-out rows: no held-out instruction appears in training."""
    held: Collection[str] = heldout_prompts(seed)
    train = generate(n_train, seed, keep=lambda p: p not in held)
    test = generate(n_test, seed + 10_000, keep=held.__contains__)
    return train, test


def pretraining_corpus(n: int, seed: int) -> list[Example]:
    """Generic instructions of the same surface form, none with a task answer.

    Copying words, digits, headlines and unit names teaches the base model the
    templates and to attend to the prompt; it never reverses, labels, adds or
    converts.
    """
    rng = random.Random(f"fedllm-pretrain-{seed}")
    out: list[Example] = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            words = rng.sample(WORDS, rng.randint(2, 4))
            out.append(Example(f"Repeat the words: {' '.join(words)}", " ".join(words), "generic"))
        elif kind == 1:
            verb = rng.choice(POSITIVE + NEGATIVE)
            headline = f"{rng.choice(SUBJECTS)} {verb} {rng.choice(TAILS)}"
            out.append(Example(f"Copy this headline: {headline}", headline, "generic"))
        elif kind == 2:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            out.append(Example(f"Write the numbers {a} and {b}.", f"{a} {b}", "generic"))
        elif kind == 3:
            big, small = rng.choice(UNITS)
            n_ = rng.randint(1, 9)
            out.append(Example(f"Write {n_} {big} in words.", f"{n_} {big}", "generic"))
        else:
            words = rng.sample(WORDS, rng.randint(1, 3))
            out.append(Example(f"Say the first word: {' '.join(words)}", words[0], "generic"))
    return out
