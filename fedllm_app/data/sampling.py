"""OpenFedLLM's per-round sample: which of a client's rows one round trains on."""

from __future__ import annotations

import random

from omegaconf import DictConfig


def examples_per_round(cfg: DictConfig) -> int:
    """Rows one client round consumes: ``batch_size x grad_accum x max_steps``."""
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
