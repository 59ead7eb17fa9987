"""Which clients train in a round: drawn from ``(seed, round)`` over partition ids (pure).

Flower's strategies sample node ids with the process's ``random`` module. Node ids differ
between runs (a simulation draws them at start; a resumed run is a new Flower run), so the same
seed trained other clients in another run. fedllm draws partition ids instead and maps them to
the nodes that hold them: round ``r`` trains the same partitions in every run with the same seed,
uninterrupted or resumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping


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


def poisson_partitions(
    seed: int, server_round: int, num_clients: int, rate: float, available: Iterable[int]
) -> list[int]:
    """Poisson sampling: each partition trains round ``server_round`` with probability ``rate``, independently.

    Used under differential privacy (``privacy.dp``), whose accountant credits the amplification of exactly
    this sampling: the number of clients varies from round to round (it may be 0) around ``rate * num_clients``.
    The draw depends on ``(seed, server_round)`` only; a drawn partition that is not ``available`` sits the
    round out (its update counts as absent, which DP's fixed denominator allows).
    """
    rng = random.Random(f"poisson-{seed}-{server_round}")
    drawn = [p for p in range(num_clients) if rng.random() < rate]
    present = set(available)
    return [p for p in drawn if p in present]
