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
