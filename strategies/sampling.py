"""Which clients train in a round: drawn from ``(seed, round)`` over partition ids (pure).

Flower's strategies sample node ids with the process's ``random`` module. Node ids differ
between runs (a simulation draws them at start; a resumed run is a new Flower run), so the same
seed trained other clients in another run. fedllm draws partition ids instead and maps them to
the nodes that hold them: round ``r`` trains the same partitions in every run with the same seed,
uninterrupted or resumed.

Under differential privacy the draw must stay secret (the accountant credits the amplification of a sample
nobody else knows): :func:`secret_poisson_partitions` keys it with a secret the server creates at run start
and keeps in its resume state, never with the public seed.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections.abc import Iterable, Mapping

SAMPLING_KEY_BYTES = 32


def draw_order(seed: int, server_round: int, num_clients: int) -> list[int]:
    """All partition ids ``0..num_clients-1`` in the order round ``server_round`` draws them."""
    order = list(range(num_clients))
    random.Random(f"partitions-{seed}-{server_round}").shuffle(order)
    return order


def sample_partitions(seed: int, server_round: int, num_clients: int, size: int, available: Iterable[int]) -> list[int]:
    """The first ``size`` partitions of the round's draw order among ``available`` ones, sorted.

    With every partition available this is a uniform sample of ``size`` of ``num_clients``
    that depends on ``(seed, server_round)`` only; a missing partition's place goes to the next
    one drawn.
    """
    present = set(available)
    return sorted([p for p in draw_order(seed, server_round, num_clients) if p in present][:size])


def nodes_for(partitions: Iterable[int], node_of: Mapping[int, int]) -> list[int]:
    """The node ids holding ``partitions`` (``node_of``: partition id -> node id)."""
    return [node_of[p] for p in partitions]


def keyed_uniform(key: bytes, server_round: int, partition: int) -> float:
    """A uniform draw in [0, 1) for ``(server_round, partition)``: HMAC-SHA256 under ``key`` (a pseudorandom
    function: without the key, the draws of one round say nothing about another's or about the key).
    """
    digest = hmac.new(key, f"poisson-{server_round}-{partition}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def secret_poisson_partitions(
    key: bytes, server_round: int, num_clients: int, rate: float, available: Iterable[int]
) -> list[int]:
    """Poisson sampling: each partition trains round ``server_round`` with probability ``rate``, independently.

    Used under differential privacy (``privacy.dp``), whose accountant credits the amplification of exactly
    this sampling: the number of clients varies from round to round (it may be 0) around ``rate * num_clients``.
    The draw depends on ``(key, server_round)`` only, so a resumed run with the same key trains the same
    partitions, and nobody without the key can recompute it. A drawn partition that is not ``available`` sits
    the round out (its update counts as absent, which DP's fixed denominator allows).
    """
    if len(key) < 16:
        raise ValueError(
            f"a sampling key of {len(key)} bytes is too short to keep the sample secret; use 32 random bytes"
        )
    present = set(available)
    return [p for p in range(num_clients) if keyed_uniform(key, server_round, p) < rate and p in present]
