import math

import pytest

from strategies.schedule import cosine_lr


def test_cosine_schedule_matches_openfedllm_formula():
    assert cosine_lr(1, 10, 5e-5, 1e-6) == pytest.approx(5e-5)
    assert cosine_lr(6, 10, 5e-5, 1e-6) == pytest.approx(1e-6 + 0.5 * (5e-5 - 1e-6))
    r = 7
    assert cosine_lr(r + 1, 10, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * r / 10)))


def test_cosine_schedule_decreases_monotonically():
    lrs = [cosine_lr(r, 20, 1e-3, 1e-5) for r in range(1, 21)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] > 1e-5
