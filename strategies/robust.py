"""Byzantine-robust aggregation rules over named LoRA arrays (``strategy.aggregator``).

Each rule replaces the weighted mean of the clients' adapters; every algorithm's server step
(FedAvgM's momentum, FedAdam/FedYogi/FedAdagrad's adaptive step, SCAFFOLD's server learning
rate) then applies to the robust aggregate instead of the mean. The rules are Flower's
(``flwr.serverapp.strategy``), reused as functions where Flower exposes them:

- ``mean``: the weighted mean (no robustness; the default);
- ``median``: coordinate-wise median (Yin et al., 2018; Flower's FedMedian);
- ``trimmed_mean``: coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest
  values (Flower's ``trim_mean``, as FedTrimmedAvg);
- ``krum`` / ``multikrum``: the one (``krum``) or ``n - f`` (``multikrum``) updates with the
  smallest sum of squared distances to their ``n - f - 2`` nearest neighbours, then their weighted
  mean (Blanchard et al., 2017; Flower's ``select_multikrum``), ``f = num_malicious``;
- ``bulyan``: MultiKrum selects ``n - 2f`` updates, then each coordinate averages the ``n - 4f``
  values closest to their median (El Mhamdi et al., 2018; Flower's ``aggregate_n_closest_weights``);
  needs ``n >= 4f + 3`` replies, else the round falls back to ``median`` (logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from strategies.aggregation import Arrays, weighted_mean
from strategies.records import to_record

log = logging.getLogger("fedllm")

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan")
# The record name Flower's select_multikrum finds the update under (it reads a record's only ArrayRecord).
KRUM_RECORD = "arrays"


@dataclass(frozen=True)
class AggregatorParams:
    """The aggregation rule and its parameters (``strategy.aggregator`` and friends).

    Attributes
    ----------
    aggregator : str
        One of :data:`AGGREGATORS`.
    num_malicious : int
        ``f``, the number of attackers Krum, MultiKrum and Bulyan tolerate, >= 0.
    trim_fraction : float
        Fraction cut at each end by ``trimmed_mean``, in [0, 0.5).
    """

    aggregator: str = "mean"
    num_malicious: int = 0
    trim_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValueError(
                f"strategy.aggregator={self.aggregator!r} must be one of {', '.join(AGGREGATORS)}; "
                "e.g. strategy.aggregator=median"
            )
        if not isinstance(self.num_malicious, int) or self.num_malicious < 0:
            raise ValueError(f"strategy.num_malicious={self.num_malicious!r} must be an integer >= 0")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"strategy.trim_fraction={self.trim_fraction} must be in [0, 0.5); e.g. 0.2")


def trimming_shortfall(p: AggregatorParams, replies: int) -> str | None:
    """Why ``trimmed_mean`` over ``replies`` updates cuts fewer values per side than there are attackers (at
    least one), or None. Flower's ``trim_mean`` cuts ``int(trim_fraction * n)``: 0.2 of 4 replies cuts none.
    """
    cut, need = int(p.trim_fraction * replies), max(p.num_malicious, 1)
    if p.aggregator != "trimmed_mean" or cut >= need:
        return None
    return (
        f"strategy.aggregator=trimmed_mean with {replies} replies a round and strategy.trim_fraction="
        f"{p.trim_fraction} cuts {cut} value(s) per side, fewer than the {need} attacker(s) it should drop "
        f"(strategy.num_malicious={p.num_malicious}); set strategy.trim_fraction={need / replies:.3g} or more"
    )


def aggregate(updates: list[Arrays], weights: list[float], p: AggregatorParams) -> Arrays:
    """The aggregate of the clients' adapters under rule ``p.aggregator``."""
    if p.aggregator == "mean":
        return weighted_mean(updates, weights)
    if p.aggregator == "median":
        return coordinate_median(updates)
    if p.aggregator == "trimmed_mean":
        return {k: np.asarray(trim_mean(np.stack([u[k] for u in updates]), p.trim_fraction)) for k in updates[0]}
    if p.aggregator == "bulyan":
        return bulyan(updates, p.num_malicious)
    keep = 1 if p.aggregator == "krum" else max(1, len(updates) - p.num_malicious)
    chosen = krum_select(updates, p.num_malicious, keep)
    return weighted_mean([updates[i] for i in chosen], [weights[i] for i in chosen])


def coordinate_median(updates: list[Arrays]) -> Arrays:
    return {k: np.median(np.stack([u[k] for u in updates]), axis=0) for k in updates[0]}


def krum_select(updates: list[Arrays], num_malicious: int, keep: int) -> list[int]:
    """Indices of the ``keep`` updates Flower's ``select_multikrum`` chooses."""
    contents = [RecordDict({KRUM_RECORD: to_record(u)}) for u in updates]
    chosen = select_multikrum(contents, num_malicious_nodes=num_malicious, num_nodes_to_select=keep)
    return [next(i for i, c in enumerate(contents) if c is pick) for pick in chosen]


def bulyan(updates: list[Arrays], num_malicious: int) -> Arrays:
    n, f = len(updates), num_malicious
    if n < 4 * f + 3:
        log.warning("bulyan needs at least 4f + 3 = %d replies, got %d: this round takes the median", 4 * f + 3, n)
        return coordinate_median(updates)
    chosen = [updates[i] for i in krum_select(updates, f, n - 2 * f)]
    names = list(updates[0])
    median = [np.median(np.stack([u[k] for u in chosen]), axis=0) for k in names]
    closest = aggregate_n_closest_weights(median, [[u[k] for k in names] for u in chosen], n - 4 * f)
    return dict(zip(names, closest, strict=True))
