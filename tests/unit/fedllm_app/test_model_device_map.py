"""model.device_map: accelerate's spread over a client's devices trains and aggregates like one device.

Without a GPU ``auto`` places every layer on the CPU, so the two clients' rounds must give the very same
adapters, and their FedAvg the same global adapter, as the default one-device placement.
"""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedllm_app.client.round import train_one_round
from fedllm_app.config import ConfigError, load_config
from fedllm_app.model import get_adapter, get_model, placement
from strategies.aggregation import weighted_mean
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from strategies.records import from_record, to_record

SMALL = "training.max_steps=2 training.batch_size=4 num_clients=2 sample_clients=2"


def test_the_default_is_the_clients_one_device_and_a_spread_goes_to_accelerate():
    one = load_config({}).model
    assert placement(one) == ({"": 0} if torch.cuda.is_available() else {"": "cpu"})
    assert placement(load_config({"overrides": "model.device_map=auto"}).model) == "auto"


def test_an_unknown_device_map_names_the_choices():
    with pytest.raises(ConfigError, match=r"model.device_map='gpu0' must be null .* auto, balanced"):
        load_config({"overrides": "model.device_map=gpu0"})


def one_round_fedavg(overrides: str, start: dict) -> tuple[list[dict], dict]:
    """Both clients' round-1 adapters from the global adapter ``start``, and their FedAvg."""
    cfg = load_config({}, overrides.split())
    replies = []
    for pid in (0, 1):
        config = ConfigRecord({"server-round": 1, "lr": 5e-3})
        msg = Message(
            RecordDict({ARRAYS_KEY: to_record(start), CONFIG_KEY: config}), dst_node_id=1, message_type="train"
        )
        replies.append(train_one_round(cfg, pid, msg, RecordDict()))
    arrays = [from_record(r[ARRAYS_KEY]) for r in replies]
    weights = [float(r[METRICS_KEY][NUM_EXAMPLES_KEY]) for r in replies]
    return arrays, weighted_mean(arrays, weights)


@pytest.mark.slow
def test_a_device_map_auto_client_trains_and_aggregates_like_a_one_device_client():
    model, _ = get_model(load_config({"overrides": "model.device_map=auto"}).model)
    assert {p.device.type for p in model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    start = get_adapter(model)
    one_device, mean_one = one_round_fedavg(SMALL, start)
    spread, mean_spread = one_round_fedavg(f"{SMALL} model.device_map=auto", start)
    for a, b in zip(one_device, spread, strict=True):
        assert any(not np.allclose(a[k], start[k]) for k in a), "the round did not train"
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
    for k in mean_one:
        np.testing.assert_allclose(mean_one[k], mean_spread[k], rtol=1e-5, atol=1e-7)
