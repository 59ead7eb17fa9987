"""Non-IID client partitions, built on flwr-datasets' partitioners.

``conf/partition/<name>.yaml`` picks one (``partition=dirichlet partition.alpha=0.1
partition.by=domain``):

- ``iid``: :class:`flwr_datasets.partitioner.IidPartitioner` (equal shards of the seeded shuffle);
- ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` over the ``by`` column,
  every client at least ``training.batch_size`` rows;
- ``natural``: :class:`~flwr_datasets.partitioner.NaturalIdPartitioner`, one client per value of
  ``by`` (e.g. a user or source id): as many clients as values;
- ``pathological``: :class:`~flwr_datasets.partitioner.PathologicalPartitioner`, each client
  ``classes_per_client`` values of ``by``;
- ``dominance``: the built-in benchmark's split (:func:`fedllm_app.synthetic.split_non_iid`),
  client ``i`` holding a ``dominance`` share of value ``i`` of ``by``, the rest spread evenly.
"""

from __future__ import annotations

import random
from typing import Any

from omegaconf import DictConfig

from fedllm_app import synthetic
from fedllm_app.config import ConfigError

Row = dict[str, Any]
PARTITIONERS = ("iid", "dirichlet", "natural", "pathological", "dominance")


def _column(rows: list[Row], by: str, kind: str) -> None:
    if not rows or by not in rows[0]:
        have = ", ".join(sorted(rows[0])) if rows else "none"
        raise ConfigError(
            f"partition={kind} partition.by={by!r}: the rows have no column {by!r} (columns: {have}); "
            f"set partition.by to one of them"
        )


def _flwr_partitioner(p: DictConfig, num_clients: int, seed: int, batch_size: int) -> Any:
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    if p.name == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if p.name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=str(p.by),
            alpha=float(p.alpha),
            min_partition_size=batch_size,
            self_balancing=bool(p.self_balancing),
            seed=seed,
        )
    if p.name == "natural":
        return NaturalIdPartitioner(partition_by=str(p.by))
    return PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by=str(p.by),
        num_classes_per_partition=int(p.classes_per_client),
        class_assignment_mode=str(p.class_assignment),
        seed=seed,
    )


def split(rows: list[Row], p: DictConfig, num_clients: int, seed: int, batch_size: int) -> list[list[Row]]:
    """``num_clients`` partitions of ``rows``; every one non-empty, or a ConfigError naming the client."""
    if p.name not in PARTITIONERS:
        raise ConfigError(f"partition={p.name!r} is not one of {', '.join(PARTITIONERS)}")
    if p.name != "iid":
        _column(rows, str(p.by), str(p.name))
    if p.name == "dominance":
        parts = _dominance(rows, p, num_clients, seed)
    else:
        parts = _with_flwr(rows, p, num_clients, seed, batch_size)
    for pid, part in enumerate(parts):
        if not part:
            raise ConfigError(
                f"partition={p.name} gave client {pid} no rows ({len(rows)} rows over {num_clients} clients); "
                f"lower num_clients, use more data (dataset.sample) or a milder split"
            )
    return parts


def _with_flwr(rows: list[Row], p: DictConfig, num_clients: int, seed: int, batch_size: int) -> list[list[Row]]:
    from datasets import Dataset

    shuffled = list(rows)
    random.Random(f"fedllm-partition-{seed}").shuffle(shuffled)
    # Partitioners look at one column; the rows themselves are picked by index (nested values stay as they are).
    table = {"row": list(range(len(shuffled)))}
    if p.name != "iid":
        table[str(p.by)] = [str(r[p.by]) for r in shuffled]
    partitioner = _flwr_partitioner(p, num_clients, seed, batch_size)
    partitioner.dataset = Dataset.from_dict(table)
    if p.name == "natural" and (n := partitioner.num_partitions) != num_clients:
        raise ConfigError(
            f"partition=natural partition.by={p.by!r} has {n} distinct values, so {n} clients, but "
            f"num_clients={num_clients}; set num_clients={n} (and as many SuperNodes)"
        )
    try:
        return [[shuffled[i] for i in _indices(partitioner, pid)] for pid in range(num_clients)]
    except ValueError as err:
        if p.name == "dirichlet":
            raise ConfigError(
                f"partition=dirichlet partition.alpha={p.alpha} could not give each of the {num_clients} clients "
                f"one batch (training.batch_size={batch_size} rows) from {len(rows)} rows: {err}. Raise "
                f"partition.alpha, lower num_clients or training.batch_size, or use more data"
            ) from None
        raise ConfigError(f"partition={p.name}: {err}") from None


def _indices(partitioner: Any, pid: int) -> list[int]:
    try:
        return list(partitioner.load_partition(pid)["row"])
    except IndexError:  # datasets' shard() when there are fewer rows than clients
        return []


def _dominance(rows: list[Row], p: DictConfig, num_clients: int, seed: int) -> list[list[Row]]:
    by = str(p.by)
    values = tuple(dict.fromkeys(str(r[by]) for r in rows))
    order = tuple(d for d in synthetic.DOMAINS if d in values) + tuple(sorted(set(values) - set(synthetic.DOMAINS)))
    try:
        return synthetic.split_non_iid(rows, num_clients, float(p.dominance), seed, order, key=lambda r: str(r[by]))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def mix(rows: list[Row], by: str) -> dict[str, int]:
    """How many rows of each value of ``by`` (the label/domain mix logged per client)."""
    out: dict[str, int] = {}
    for r in rows:
        k = str(r.get(by, "all"))
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))
