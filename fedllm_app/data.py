"""Datasets, non-IID partitions and OpenFedLLM's per-round sampling.

The embedded default is the synthetic multi-domain set; every process rebuilds it
from the seed, so the server's held-out split and each client's partition never
travel. Rows are ``{"instruction", "response", "domain"}`` dicts.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

from omegaconf import DictConfig

from fedllm_app import synthetic
from fedllm_app.config import ConfigError
from fedllm_app.templates import to_prompt_completion

Row = dict[str, str]


@lru_cache(maxsize=4)
def _synthetic(
    train_per_domain: int, test_per_domain: int, dominance: float, num_clients: int, seed: int
) -> tuple[tuple[tuple[Row, ...], ...], tuple[Row, ...]]:
    train = synthetic.generate(train_per_domain, seed)
    test = synthetic.generate(test_per_domain, seed + 10_000)
    try:
        parts = synthetic.split_non_iid(train, num_clients, dominance, seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return tuple(tuple(r.as_dict() for r in p) for p in parts), tuple(r.as_dict() for r in test)


def _load(cfg: DictConfig) -> tuple[tuple[tuple[Row, ...], ...], tuple[Row, ...]]:
    d = cfg.dataset
    if d.name != "synthetic":
        raise ConfigError(f"dataset.name={d.name!r} is not available yet; use dataset=synthetic")
    return _synthetic(d.train_per_domain, d.test_per_domain, float(d.dominance), cfg.num_clients, cfg.seed)


def partition(cfg: DictConfig, partition_id: int) -> list[Row]:
    """The rows held by client ``partition_id``."""
    parts, _ = _load(cfg)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(
            f"partition-id={partition_id} is outside 0..{len(parts) - 1}: the run config has num_clients={len(parts)}; "
            f"start as many SuperNodes (num-supernodes) as num_clients"
        )
    rows = list(parts[partition_id])
    if not rows:
        raise ConfigError(f"client {partition_id} has no rows; lower num_clients or use more data")
    return rows


def all_partitions(cfg: DictConfig) -> list[list[Row]]:
    parts, _ = _load(cfg)
    return [list(p) for p in parts]


def pooled(cfg: DictConfig) -> list[Row]:
    """Every client's rows together (the centralised baseline's data; simulation only)."""
    return [r for p in all_partitions(cfg) for r in p]


def heldout(cfg: DictConfig) -> list[Row]:
    """The server's held-out split."""
    return list(_load(cfg)[1])


def examples_per_round(cfg: DictConfig) -> int:
    t = cfg.training
    return t.batch_size * t.grad_accum * t.max_steps


def round_indices(
    num_rows: int, cfg: DictConfig, server_round: int, partition_id: int, multiplier: int = 1
) -> list[int]:
    """OpenFedLLM's scheme: ``batch_size x grad_accum x max_steps`` row indices drawn without
    replacement, seeded by (seed, round, client); all rows, shuffled, if fewer.
    """
    n = examples_per_round(cfg) * multiplier
    rng = random.Random(f"{cfg.seed}-{server_round}-{partition_id}")
    if num_rows <= n:
        picked = list(range(num_rows))
        rng.shuffle(picked)
        return picked
    return rng.sample(range(num_rows), n)


def to_trl(rows: list[Row], template: str) -> Any:
    """A ``datasets.Dataset`` in TRL's prompt/completion form."""
    from datasets import Dataset

    return Dataset.from_list([to_prompt_completion(r["instruction"], r["response"], template) for r in rows])


def domain_mix(rows: list[Row]) -> dict[str, int]:
    mix: dict[str, int] = {}
    for r in rows:
        mix[r.get("domain", "all")] = mix.get(r.get("domain", "all"), 0) + 1
    return dict(sorted(mix.items()))
