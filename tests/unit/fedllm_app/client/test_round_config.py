"""A client composes the run's config with the server's num_clients, so it computes the server's partitions."""

from flwr.app import ConfigRecord, Message, RecordDict

from fedllm_app.client.round import round_config
from strategies.fedavg import CONFIG_KEY, NUM_CLIENTS_KEY


def message(config: dict) -> Message:
    return Message(RecordDict({CONFIG_KEY: ConfigRecord(config)}), dst_node_id=1, message_type="train")


def test_the_train_messages_num_clients_sets_the_clients_config():
    cfg = round_config({"overrides": "seed=3"}, message({"server-round": 1, "lr": 0.1, NUM_CLIENTS_KEY: 2}))
    assert (cfg.num_clients, cfg.sample_clients, cfg.seed) == (2, 2, 3)


def test_without_num_clients_in_the_message_the_run_config_applies():
    cfg = round_config({"num-clients": 6}, message({"server-round": 1, "lr": 0.1}))
    assert cfg.num_clients == 6
