"""Canaries for the exposure audit (Carlini et al., "The Secret Sharer", USENIX Security 2019).

``privacy.canaries.count`` random secrets, each a string of ``digits`` decimal digits drawn from the
randomness space R of all ``10 ** digits`` of them (leading zeros included) with the canaries' own ``seed``,
are written into a fixed template::

    instruction: "What is the secret code of account 3?"   (the canary's number, 1-based)
    response:    "my code is 048213"

and each is inserted ``repeats`` times into the training rows of partition ``partition`` only: after the
data is partitioned, before anything is tokenised, never into the server's held-out rows. The rows are a
pure function of the config, so the server rebuilds the same secrets to measure their exposure
(:mod:`evaluation.exposure`) without ever seeing a client's data. A node that trains on its own file
(``data-path``) gets no canaries. The config keys are validated in :mod:`fedllm_app.config`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from fedllm_app.data.rows import Row

# The template: the instruction names the canary, the response is RESPONSE_PREFIX followed by the secret.
INSTRUCTION = "What is the secret code of account {number}?"
RESPONSE_PREFIX = "my code is "
DOMAIN = "canary"


@dataclass(frozen=True)
class CanarySpec:
    """``privacy.canaries`` (validated by :func:`fedllm_app.config.validate`).

    Attributes
    ----------
    count : int
        Number of distinct secrets (0: no canaries).
    repeats : int
        Copies of each canary row in the partition's training rows.
    partition : int
        The partition (client) whose training rows get the canaries.
    digits : int
        Length of each secret; the randomness space has ``10 ** digits`` secrets.
    seed : int
        Seeds the secrets and where the copies land, independently of the run's ``seed``.
    """

    count: int = 0
    repeats: int = 10
    partition: int = 0
    digits: int = 6
    seed: int = 1234

    @classmethod
    def from_config(cls, cfg: Any) -> CanarySpec:
        """The spec of a run config's ``privacy.canaries`` (no canaries when the section is absent)."""
        section = (cfg.get("privacy") or {}).get("canaries") or {}
        keys = ("count", "repeats", "partition", "digits", "seed")
        return cls(**{k: int(section[k]) for k in keys if k in section})

    @property
    def space_size(self) -> int:
        """|R|, the number of possible secrets."""
        return 10**self.digits


@dataclass(frozen=True)
class Canary:
    """One canary: its number (1-based), the secret and its row."""

    number: int
    secret: str

    @property
    def instruction(self) -> str:
        return INSTRUCTION.format(number=self.number)

    def response(self, secret: str | None = None) -> str:
        """The response holding ``secret`` (default: this canary's own)."""
        return RESPONSE_PREFIX + (self.secret if secret is None else secret)

    def row(self) -> Row:
        return {"instruction": self.instruction, "response": self.response(), "domain": DOMAIN}


def make_canaries(spec: CanarySpec) -> list[Canary]:
    """The spec's ``count`` distinct secrets, a pure function of ``spec.seed`` and ``spec.digits``."""
    rng = random.Random(f"fedllm-canaries-{spec.seed}-{spec.digits}")
    draws = rng.sample(range(spec.space_size), spec.count)
    return [Canary(i + 1, f"{n:0{spec.digits}d}") for i, n in enumerate(draws)]


def insert(parts: list[list[Row]], spec: CanarySpec) -> list[list[Row]]:
    """``parts`` with every canary row copied ``spec.repeats`` times into partition ``spec.partition``, at
    seeded positions among its rows; the other partitions unchanged (``parts`` itself is not modified).
    """
    if spec.count == 0:
        return parts
    rows = list(parts[spec.partition])
    rng = random.Random(f"fedllm-canary-positions-{spec.seed}")
    for canary in make_canaries(spec):
        for _ in range(spec.repeats):
            rows.insert(rng.randint(0, len(rows)), dict(canary.row()))
    return [rows if pid == spec.partition else part for pid, part in enumerate(parts)]


def describe(s: CanarySpec) -> str:
    """One log line: what was inserted where."""
    return (
        f"privacy.canaries: {s.count} secret(s) of {s.digits} digits (|R| = 10^{s.digits}), each {s.repeats} times, "
        f"in the training rows of partition {s.partition} (an exposure audit; see docs/privacy.md)"
    )
