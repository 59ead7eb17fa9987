"""A client round's randomness (LoRA dropout, batch order) follows the run's seed, round and partition."""

import random

import numpy as np
import torch

from fedllm_app.client.round import seed_round


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_a_round_draws_the_same_numbers_whatever_ran_before_in_the_process():
    seed_round(100_004, 1)
    first = draws()
    torch.rand(1000), np.random.rand(10), random.random()  # another history
    seed_round(100_004, 1)
    assert draws() == first
    seed_round(100_004, 2)
    assert draws() != first  # another partition
    seed_round(100_005, 1)
    assert draws() != first  # another round
