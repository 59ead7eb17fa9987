"""Learning-rate schedule across rounds (pure)."""

from __future__ import annotations

import math


def cosine_lr(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """OpenFedLLM's schedule: ``min + 0.5 (max - min)(1 + cos(pi r / R))``, r counted from 0.

    Round 1 trains at ``lr_max``; the rate is constant within a round.
    """
    r = server_round - 1
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * r / num_rounds))
