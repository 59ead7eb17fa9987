"""Deterministic multi-domain instruction data for the embedded default.

Four domains a ~1M-parameter byte-level model can learn with LoRA:

- ``reverse``: reverse the order of two words.
- ``sentiment``: label a templated headline by its keyword (positive/negative).
- ``arithmetic``: add or subtract 1 or 2, single-digit operands and answer.
- ``units``: convert kilo-units to base units (one factor of 1000).

Everything is a pure function of a seed, so the server and every client rebuild
exactly the same rows without exchanging them. :func:`pretraining_corpus` gives the
generic text of the same surface form used to pre-train the tiny base model: it
never contains an answer of the four tasks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

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


def generate(n_per_domain: int, seed: int, domains: tuple[str, ...] = DOMAINS) -> list[Example]:
    """``n_per_domain`` examples of every domain, interleaved, deterministic in ``seed``."""
    rng = random.Random(f"fedllm-synthetic-{seed}")
    rows = [make_example(d, rng) for _ in range(n_per_domain) for d in domains]
    rng.shuffle(rows)
    return rows


def _domain(row: Any) -> str:
    return row.domain


def split_non_iid(
    rows: list[T],
    num_clients: int,
    dominance: float,
    seed: int,
    domains: tuple[str, ...] = DOMAINS,
    key: Callable[[T], str] = _domain,
) -> list[list[T]]:
    """Partition rows so client ``i`` holds mostly domain ``i % len(domains)``.

    Each client gets the same number of rows: a ``dominance`` share from its own
    domain, the rest spread evenly over the other domains. Raises if ``rows`` is
    too small for that. ``key`` gives a row's domain (``Example.domain`` by default).
    """
    if not 0.0 < dominance <= 1.0:
        raise ValueError(f"partition.dominance={dominance} must be in (0, 1]; e.g. partition.dominance=0.9")
    by_domain: dict[str, list[T]] = {d: [r for r in rows if key(r) == d] for d in domains}
    others = len(domains) - 1
    homes = {d: sum(domains[i % len(domains)] == d for i in range(num_clients)) for d in domains}

    def shares(n: int) -> tuple[int, int]:
        own = round(n * dominance)
        return own, (n - own) // others if others else 0

    def fits(n: int) -> bool:
        own, rest = shares(n)
        return all(homes[d] * own + (num_clients - homes[d]) * rest <= len(by_domain[d]) for d in domains)

    # The largest equal client size whose domain mix the rows can supply.
    per_client = len(rows) // num_clients
    while per_client > 0 and not fits(per_client):
        per_client -= 1
    if per_client < 2:
        raise ValueError(
            f"the dataset ({len(rows)} rows) is too small for {num_clients} clients with "
            f"dominance {dominance}; raise dataset.train_per_domain (synthetic), use more data or lower num_clients"
        )
    own, rest_each = shares(per_client)
    rng = random.Random(f"fedllm-split-{seed}")
    cursor = {d: 0 for d in domains}
    clients: list[list[T]] = []
    for i in range(num_clients):
        home = domains[i % len(domains)]
        part: list[T] = []
        for d in domains:
            k = own if d == home else rest_each
            part.extend(by_domain[d][cursor[d] : cursor[d] + k])
            cursor[d] += k
        rng.shuffle(part)
        clients.append(part)
    return clients


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
