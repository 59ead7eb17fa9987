"""Secure-aggregation settings that cannot hold fail at start with one sentence naming them and the fix."""

import pytest

from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.secure_round import secagg_params

ON = "privacy.secagg=true num_clients=4"


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("privacy.secagg_threshold=5", r"privacy.secagg_threshold=5 shares must be .* at most the 4 clients"),
        ("privacy.secagg_threshold=1", r"privacy.secagg_threshold=1 shares must be more than half .* set it in 3..4"),
        ("privacy.secagg_threshold=2", r"privacy.secagg_threshold=2 shares must be more than half"),
        ("privacy.secagg_threshold=0.4", r"privacy.secagg_threshold=0.4 must be a fraction in \(0.5, 1\]"),
        ("strategy=central", r"privacy.secagg=true with strategy=central: there is no sum .* privacy.secagg=false"),
        ("strategy=local", r"privacy.secagg=true with strategy=local"),
        ("strategy.aggregator=median", r"strategy.aggregator=median: a robust aggregator needs each client's update"),
        ("lora_aggregation=hetlora model.lora.client_ranks=[4,8]", r"lora_aggregation=hetlora: clients of different"),
        ("comm.codec=int8", r"comm.codec=int8: .* set comm.codec=none"),
        ("comm.downlink=fp16", r"comm.downlink=fp16: .* set comm.downlink=null"),
        ("comm.downlink_delta=true", r"comm.downlink_delta=true: .* set comm.downlink_delta=false"),
        ("privacy.secagg_clip_range=0", r"privacy.secagg_clip_range=0 must be positive"),
        ("privacy.secagg_bits=8", r"privacy.secagg_bits=8 must be in 16..53"),
        ("privacy.secagg_bits=64", r"privacy.secagg_bits=64 must be in 16..53 .* e.g. privacy.secagg_bits=32"),
        ("privacy.secagg_neighbours=1", r"privacy.secagg_neighbours=1 must be an integer >= 2 or null"),
        ("sample_clients=1", r"privacy.secagg=true needs sample_clients >= 2"),
    ],
)
def test_impossible_secure_aggregation_settings_name_the_setting_and_the_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"overrides": f"{ON} {override}"})


def test_secure_aggregation_is_off_by_default_and_its_settings_reach_the_server():
    assert secagg_params(load_config({})) is None
    params = secagg_params(load_config({"overrides": f"{ON} privacy.secagg_threshold=3 privacy.secagg_bits=40"}))
    assert (params.threshold, params.bits, params.neighbours, params.clip_range) == (3, 40, None, 1.0)
    assert params.share_threshold(4) == 3


def test_a_threshold_count_above_the_neighbourhood_size_fails_at_start_not_every_round():
    """100 sampled clients: neighbourhoods of 2 ceil(log2 100) + 1 = 15, so 20 shares can never be found."""
    over = "privacy.secagg=true num_clients=100 sample_clients=100"
    with pytest.raises(ConfigError, match=r"secagg_threshold=20 .* at most the 15 clients .* set it in 8..15"):
        load_config({"overrides": f"{over} privacy.secagg_threshold=20"})
    with pytest.raises(ConfigError, match=r"secagg_threshold=7 shares must be more than half"):
        load_config({"overrides": f"{over} privacy.secagg_threshold=7"})
    params = secagg_params(load_config({"overrides": f"{over} privacy.secagg_threshold=8"}))
    assert params.share_threshold(100) == 8


@pytest.mark.parametrize("neighbours", [None, 2, 3, 7, 40])
@pytest.mark.parametrize("n", [2, 3, 5, 16, 100, 1000])
def test_the_config_check_uses_the_same_neighbourhood_degree_as_the_protocol(n, neighbours):
    from fedllm_app.config import secagg_degree
    from fedllm_app.secure.secagg import SecAggParams

    assert secagg_degree(n, neighbours) == SecAggParams(neighbours=neighbours).degree(n)


DISTRIBUTED = f"{ON} baseline=none privacy.dp=true privacy.noise=distributed"


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("privacy.noise=everyone", r"privacy.noise='everyone' must be one of server, distributed"),
        ("privacy.adaptive_clip=true", r"privacy.noise=distributed with privacy.adaptive_clip=true: .* set privacy"),
        ("privacy.noise_colluders=-1", r"privacy.noise_colluders=-1 must be an integer >= 0"),
        ("privacy.noise_colluders=2", r"noise_colluders=2 leaves no honest noise share .* t=2 .* below 2"),
        ("privacy.secagg_threshold=3 privacy.noise_colluders=3", r"noise_colluders=3 leaves no honest .* t=3"),
    ],
)
def test_distributed_noise_settings_that_cannot_hold_fail_at_start_naming_the_setting_and_the_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"overrides": f"{DISTRIBUTED} {override}"})


def test_distributed_noise_without_secure_aggregation_is_refused():
    with pytest.raises(ConfigError, match=r"privacy.noise=distributed needs privacy.secagg=true: .* privacy.noise="):
        load_config({"overrides": "num_clients=4 baseline=none privacy.dp=true privacy.noise=distributed"})


def test_a_quantiser_range_that_would_clip_the_noise_shares_fails_when_the_server_builds_the_strategy():
    """z = C = 1, smallest threshold 2 (a fraction, a round of 2 clients): shares of std 1/sqrt(2) need a range
    of 1 + 8 / sqrt(2) = 6.657."""
    from fedllm_app.server.run import dp_settings

    with pytest.raises(ConfigError, match=r"secagg_clip_range=1 would clip .* set privacy.secagg_clip_range=6.66 "):
        dp_settings(load_config({"overrides": DISTRIBUTED}))
    private = dp_settings(load_config({"overrides": f"{DISTRIBUTED} privacy.secagg_clip_range=6.66"}))
    assert private["dp"].distributed and private["dp"].noise_colluders == 0
    counted = load_config({"overrides": f"{DISTRIBUTED} privacy.secagg_threshold=4 privacy.noise_colluders=1"})
    with pytest.raises(ConfigError, match=r"at t=4; .* reaches 5.619"):  # 1 + 8 / sqrt(3)
        dp_settings(counted)


def test_the_server_adds_the_noise_by_default():
    from fedllm_app.server.run import dp_settings

    assert not dp_settings(load_config({"overrides": f"{ON} baseline=none privacy.dp=true"}))["dp"].distributed


def test_config_and_the_strategy_agree_on_the_noise_placements():
    from fedllm_app.config import DP_NOISE_PLACEMENTS
    from strategies.privacy import NOISE_PLACEMENTS

    assert DP_NOISE_PLACEMENTS == NOISE_PLACEMENTS
