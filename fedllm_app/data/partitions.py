"""Non-IID client partitions, built on flwr-datasets' partitioners.

``conf/partition/<name>.yaml`` picks one (``partition=dirichlet partition.alpha=0.1
partition.by=domain``):

- ``iid``: :class:`flwr_datasets.partitioner.IidPartitioner` (equal shards of the seeded shuffle);
- ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` over the ``by`` column,
  every client at least ``training.batch_size`` rows. Where its draws cannot give every client a batch
  (few values of ``by`` over many clients at a low ``alpha``: 4 domains over 20 clients at 0.1 leave most
  clients empty), each client's mix of ``by`` values is drawn from Dirichlet(``alpha``) instead, with equal
  client sizes (:class:`~flwr_datasets.partitioner.InnerDirichletPartitioner`), and a warning says so;
  only fewer than ``num_clients * batch_size`` rows is an error;
- ``natural``: :class:`~flwr_datasets.partitioner.NaturalIdPartitioner`, one client per value of
  ``by`` (e.g. a user or source id): as many clients as values;
- ``pathological``: :class:`~flwr_datasets.partitioner.PathologicalPartitioner`, each client
  ``classes_per_client`` values of ``by``;
- ``dominance``: the built-in benchmark's split (:func:`split_by_dominance`),
  client ``i`` holding a ``dominance`` share of value ``i`` of ``by``, the rest spread evenly.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from fedllm_app.config import ConfigError
from fedllm_app.data import synthetic
from fedllm_app.data.rows import Row

PARTITIONERS = ("iid", "dirichlet", "natural", "pathological", "dominance")

log = logging.getLogger("fedllm")


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
    if p.name == "dirichlet":
        return [[shuffled[i] for i in part] for part in _dirichlet(table, p, num_clients, seed, batch_size)]
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
        raise ConfigError(f"partition={p.name}: {err}") from None


def _dirichlet(table: dict, p: DictConfig, num_clients: int, seed: int, batch_size: int) -> list[list[int]]:
    """Row indices per client: DirichletPartitioner's split, else equal sizes with Dirichlet(alpha) mixes."""
    from datasets import Dataset

    num_rows = len(table["row"])
    if num_rows < num_clients * batch_size:
        raise ConfigError(
            f"partition=dirichlet partition.alpha={p.alpha} could not give each of the {num_clients} clients "
            f"one batch (training.batch_size={batch_size} rows) from {num_rows} rows, whatever the split; "
            f"lower num_clients or training.batch_size, or use more data (at least {num_clients * batch_size} rows)"
        )
    partitioner = _flwr_partitioner(p, num_clients, seed, batch_size)
    partitioner.dataset = Dataset.from_dict(table)
    try:
        with warnings.catch_warnings():  # one warning per failed draw; ours below says what happens instead
            warnings.simplefilter("ignore", UserWarning)
            return [_indices(partitioner, pid) for pid in range(num_clients)]
    except ValueError:
        pass
    log.warning(
        "partition=dirichlet partition.alpha=%s: Dirichlet draws over the %d values of %r leave some of the %d "
        "clients without one batch (training.batch_size=%d rows); instead each client gets %d rows whose mix of "
        "%r values is drawn from Dirichlet(%s) (flwr-datasets' InnerDirichletPartitioner)",
        p.alpha, len(set(table[str(p.by)])), str(p.by), num_clients, batch_size, num_rows // num_clients,
        str(p.by), p.alpha,
    )  # fmt: skip
    return _equal_sized_dirichlet(table, p, num_clients, seed)


def _equal_sized_dirichlet(table: dict, p: DictConfig, num_clients: int, seed: int) -> list[list[int]]:
    from datasets import Dataset
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    by, num_rows = str(p.by), len(table["row"])
    values = sorted(set(table[by]))
    codes = {v: i for i, v in enumerate(values)}  # the partitioner wants labels 0..K-1
    sizes = [num_rows // num_clients + (pid < num_rows % num_clients) for pid in range(num_clients)]
    partitioner = InnerDirichletPartitioner(sizes, partition_by=by, alpha=float(p.alpha), seed=seed)
    partitioner.dataset = Dataset.from_dict({"row": table["row"], by: [codes[v] for v in table[by]]})
    return [_indices(partitioner, pid) for pid in range(num_clients)]


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
        return split_by_dominance(rows, num_clients, float(p.dominance), seed, order, key=lambda r: str(r[by]))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def mix(rows: list[Row], by: str) -> dict[str, int]:
    """How many rows of each value of ``by`` (the label/domain mix logged per client)."""
    out: dict[str, int] = {}
    for r in rows:
        k = str(r.get(by, "all"))
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def split_by_dominance(
    rows: list[Row],
    num_clients: int,
    dominance: float,
    seed: int,
    domains: tuple[str, ...] = synthetic.DOMAINS,
    key: Callable[[Row], str] = lambda r: str(r["domain"]),
) -> list[list[Row]]:
    """Partition rows so client ``i`` holds mostly domain ``i % len(domains)``.

    Each client gets the same number of rows: a ``dominance`` share from its own
    domain, the rest spread evenly over the other domains. Raises if ``rows`` is
    too small for that. ``key`` gives a row's domain (its ``domain`` column by default).
    """
    if not 0.0 < dominance <= 1.0:
        raise ValueError(f"partition.dominance={dominance} must be in (0, 1]; e.g. partition.dominance=0.9")
    by_domain: dict[str, list[Row]] = {d: [r for r in rows if key(r) == d] for d in domains}
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
    clients: list[list[Row]] = []
    for i in range(num_clients):
        home = domains[i % len(domains)]
        part: list[Row] = []
        for d in domains:
            k = own if d == home else rest_each
            part.extend(by_domain[d][cursor[d] : cursor[d] + k])
            cursor[d] += k
        rng.shuffle(part)
        clients.append(part)
    return clients
