"""The server's exact-match cadence: every ``eval.exact_match_every`` rounds and always at the last round."""

import pytest

from evaluation.heldout import exact_match_due
from fedllm_app.config import ConfigError, load_config


def test_exact_match_runs_every_n_rounds_and_always_at_the_last():
    assert [r for r in range(1, 21) if exact_match_due(5, r, 20)] == [5, 10, 15, 20]
    assert [r for r in range(1, 8) if exact_match_due(5, r, 7)] == [5, 7]
    assert [r for r in range(1, 3) if exact_match_due(5, r, 2)] == [2]
    assert all(exact_match_due(1, r, 4) for r in range(1, 5))


def test_the_default_cadence_skips_generation_in_most_rounds():
    every = load_config({}).eval.exact_match_every
    assert every > 1 and exact_match_due(every, 1, 20) is False


@pytest.mark.parametrize("bad", [0, -2])
def test_a_cadence_below_one_names_the_key_and_a_fix(bad):
    with pytest.raises(ConfigError, match=r"eval.exact_match_every=.*must be >= 1.*e.g. eval.exact_match_every=5"):
        exact_match_due(bad, 1, 10)
