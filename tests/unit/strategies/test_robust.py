"""Robust aggregation rules on hand-computed arrays, and their composition with the algorithms' server steps."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.run import build_strategy
from strategies.records import from_record, to_record
from strategies.robust import AggregatorParams, aggregate, trimming_shortfall
from tests.fakes import FakeGrid
from tests.unit.strategies.test_strategies import reply


def scalars(*values):
    return [{"w": np.array([v], dtype=np.float64)} for v in values]


def agg(values, rule, weights=None, **kw):
    weights = weights or [1.0] * len(values)
    return float(aggregate(scalars(*values), weights, AggregatorParams(rule, **kw))["w"][0])


def test_median_and_trimmed_mean_ignore_one_outlier():
    assert agg([1, 2, 100], "median") == 2
    assert agg([1, 2, 3, 4, 100], "trimmed_mean", trim_fraction=0.2) == 3  # drops 1 and 100: mean(2, 3, 4)


def test_krum_and_multikrum_pick_the_updates_closest_to_their_neighbours():
    # f = 1, n = 5: each score sums the squared distances to the n - f - 2 = 2 nearest others:
    # 0 -> 1 + 9 = 10, 1 -> 1 + 4 = 5, 3 -> 4 + 9 = 13, 6 -> 9 + 25 = 34, 100 -> far more.
    assert agg([0, 1, 3, 6, 100], "krum", num_malicious=1) == 1
    assert agg([0, 1, 3, 6, 100], "multikrum", num_malicious=1) == pytest.approx((0 + 1 + 3 + 6) / 4)
    weighted = agg([0, 1, 3, 6, 100], "multikrum", weights=[3, 1, 1, 1, 1], num_malicious=1)
    assert weighted == pytest.approx((0 * 3 + 1 + 3 + 6) / 6)  # the survivors keep their weights


def test_bulyan_averages_the_values_closest_to_the_median_of_the_krum_selection():
    # n = 7, f = 1: MultiKrum keeps n - 2f = 5 (scores over 4 neighbours: 2 -> 10, 1 and 3 -> 15, 4 -> 18,
    # 0 -> 30, 6 -> 54, 100 -> more), their median is 2, and the n - 4f = 3 values closest to it are 1, 2, 3.
    assert agg([0, 1, 2, 3, 4, 6, 100], "bulyan", num_malicious=1) == 2
    assert agg([1, 2, 100], "bulyan", num_malicious=1) == 2  # fewer than 4f + 3 replies: the median


def test_bulyan_takes_each_coordinates_own_median_over_every_array():
    # Each update is x (1, 10) and [[-x]]: every squared distance is 102 times the scalars', so MultiKrum keeps what
    # it keeps for 0, 1, 2, 5, 6, 10, 100 (f = 1, n - 2f = 5; scores over the 4 nearest: 2 -> 30, 1 -> 43, 5 -> 51,
    # 6 -> 58, 0 -> 66, 10 -> 186): 0, 1, 2, 5, 6. Their median is 2; the n - 4f = 3 values closest to it: 0, 1, 2.
    updates = [{"a": np.array([x, 10.0 * x]), "b": np.array([[-x]])} for x in (0.0, 1.0, 2.0, 5.0, 6.0, 10.0, 100.0)]
    got = aggregate(updates, [1.0] * 7, AggregatorParams("bulyan", num_malicious=1))
    np.testing.assert_allclose(got["a"], [1.0, 10.0])
    np.testing.assert_allclose(got["b"], [[-1.0]])


def test_bulyan_with_fewer_than_4f_plus_3_replies_takes_the_median_and_says_so(caplog):
    # f = 2 needs 11 replies: 10 are too few (a bound of 4 / f + 3 = 5 would run Bulyan on them)
    assert agg([0, 1, 2, 3, 4, 5, 6, 7, 8, 100], "bulyan", num_malicious=2) == 4.5
    assert "bulyan needs at least 4f + 3 = 11 replies, got 10: this round takes the median" in caplog.messages


def test_the_mean_stays_the_weighted_mean():
    assert agg([1, 3], "mean", weights=[3, 1]) == pytest.approx(1.5)
    assert agg([0, 1, 101], "mean", num_malicious=1) == pytest.approx(34.0)  # the mean drops no one


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multikrum", "bulyan"])
def test_every_rule_over_one_update_returns_it(rule):
    assert agg([7], rule) == 7


def test_a_robust_rule_feeds_the_algorithms_server_step():
    s = build_strategy(
        load_config({"overrides": "strategy=fedavgm strategy.aggregator=median num_clients=3 sample_clients=3"})
    )
    list(s.configure_train(1, to_record({"w": np.zeros(1, np.float32)}), ConfigRecord(), FakeGrid(3)))
    replies = [reply({"w": np.array([v], np.float32)}, 1) for v in (0.1, 0.2, 10.0)]
    new, _ = s.aggregate_train(1, replies)
    # FedAvgM's first step from a zero first moment: server_lr x (1 - momentum) x the median delta 0.2
    np.testing.assert_allclose(from_record(new)["w"], [1.0 * 0.1 * 0.2], rtol=1e-6)
    assert "median" in s.describe()


def test_an_unknown_rule_fails_at_start_with_the_choices():
    with pytest.raises(ConfigError, match=r"strategy.aggregator='mode' must be one of mean, median"):
        build_strategy(load_config({"overrides": "strategy.aggregator=mode"}))


def test_a_trim_fraction_that_cuts_fewer_values_than_attackers_is_named_with_the_fraction_that_would(caplog):
    """Flower's trim_mean cuts int(fraction x n) per side: the default 0.2 of 4 replies cuts none (a plain mean)."""
    assert "set strategy.trim_fraction=0.25 or more" in trimming_shortfall(AggregatorParams("trimmed_mean", 1), 4)
    assert trimming_shortfall(AggregatorParams("trimmed_mean", 1, 0.25), 4) is None
    assert trimming_shortfall(AggregatorParams("trimmed_mean", 2), 10) is None  # cuts 2 per side
    assert "cuts 2 value(s) per side, fewer than the 3" in trimming_shortfall(AggregatorParams("trimmed_mean", 3), 10)
    assert trimming_shortfall(AggregatorParams("median", 1), 4) is None
    build_strategy(load_config({"overrides": "strategy.aggregator=trimmed_mean strategy.num_malicious=1"}))
    assert "with 4 replies a round and strategy.trim_fraction=0.2 cuts 0 value(s) per side" in caplog.text


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            lambda: AggregatorParams("mode"),
            "strategy.aggregator='mode' must be one of mean, median, trimmed_mean, krum, multikrum, bulyan; "
            "e.g. strategy.aggregator=median",
        ),
        (lambda: AggregatorParams("krum", -1), "strategy.num_malicious=-1 must be an integer >= 0"),
        (lambda: AggregatorParams("krum", 1.5), "strategy.num_malicious=1.5 must be an integer >= 0"),
        (lambda: AggregatorParams("krum", "1"), "strategy.num_malicious='1' must be an integer >= 0"),
        (
            lambda: AggregatorParams("trimmed_mean", 0, 0.5),
            "strategy.trim_fraction=0.5 must be in [0, 0.5); e.g. 0.2",
        ),
        (
            lambda: AggregatorParams("trimmed_mean", 0, -0.1),
            "strategy.trim_fraction=-0.1 must be in [0, 0.5); e.g. 0.2",
        ),
    ],
)
def test_each_bad_aggregation_parameter_is_refused_with_its_whole_message(params, message):
    with pytest.raises(ValueError) as err:
        params()
    assert str(err.value) == message


def test_the_aggregation_bounds_themselves_are_accepted():
    assert AggregatorParams("trimmed_mean", 0, 0.0).trim_fraction == 0.0  # trims nothing: the mean
    assert AggregatorParams("trimmed_mean", 0, 0.49).trim_fraction == 0.49
    assert AggregatorParams("krum", 0).num_malicious == 0
