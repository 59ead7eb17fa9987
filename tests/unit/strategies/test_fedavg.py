"""FedAvgLoRA through Flower's own Message objects: weighting, per-round config, local baseline."""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from strategies.fedavg import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_CLIENTS_KEY,
    NUM_EXAMPLES_KEY,
    WEIGHT_KEY,
    FedAvgLoRA,
)
from strategies.local import LocalOnly
from strategies.records import from_record, to_record
from tests.fakes import FakeGrid


def create_mock_reply(arrays: dict, num_examples: int, loss: float, pid: int = 0) -> Message:
    content = RecordDict(
        {
            ARRAYS_KEY: to_record(arrays),
            METRICS_KEY: MetricRecord(
                {NUM_EXAMPLES_KEY: num_examples, WEIGHT_KEY: num_examples, "train_loss": loss, "partition-id": pid}
            ),
        }
    )
    return Message(content, dst_node_id=pid + 1, message_type="train")


KW = {"num_clients": 4, "sample_clients": 2, "num_rounds": 10, "lr_max": 1e-2, "lr_min": 1e-3}


def test_fedavg_is_the_example_weighted_mean():
    a = {"x.lora_A.weight": np.array([[1.0, 2.0]], dtype=np.float32)}
    b = {"x.lora_A.weight": np.array([[3.0, 6.0]], dtype=np.float32)}
    strategy = FedAvgLoRA(**KW)
    arrays, metrics = strategy.aggregate_train(1, [create_mock_reply(a, 10, 1.0), create_mock_reply(b, 30, 2.0)])
    np.testing.assert_allclose(from_record(arrays)["x.lora_A.weight"], [[2.5, 5.0]])
    assert metrics["train_loss"] == pytest.approx(1.75)


def test_fedavg_unweighted_when_counts_are_equal():
    a = {"w": np.array([0.0, 4.0], dtype=np.float32)}
    b = {"w": np.array([2.0, 0.0], dtype=np.float32)}
    arrays, _ = FedAvgLoRA(**KW).aggregate_train(1, [create_mock_reply(a, 5, 1.0), create_mock_reply(b, 5, 1.0)])
    np.testing.assert_allclose(from_record(arrays)["w"], [1.0, 2.0])


def test_a_saved_state_for_fedavg_is_refused_naming_the_class_and_the_keys():
    with pytest.raises(ValueError, match=r"^FedAvgLoRA keeps no state, got keys \['c'\]$"):
        FedAvgLoRA(**KW).load_state_dict({"c": {}})
    FedAvgLoRA(**KW).load_state_dict({})  # nothing saved: nothing to restore


def test_configure_train_samples_clients_and_sends_round_lr_and_num_clients():
    strategy = FedAvgLoRA(**KW)
    arrays = to_record({"w": np.zeros(2, dtype=np.float32)})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(4)))
    assert len(msgs) == 2 and len({m.metadata.dst_node_id for m in msgs}) == 2
    conf = msgs[0].content[CONFIG_KEY]
    assert conf["lr"] == pytest.approx(1e-2) and conf["server-round"] == 1 and conf["mode"] == "federated"
    assert conf[NUM_CLIENTS_KEY] == KW["num_clients"]
    later = list(strategy.configure_train(10, arrays, ConfigRecord(), FakeGrid(4)))[0].content[CONFIG_KEY]
    assert later["lr"] == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + math.cos(math.pi * 9 / 10)))  # r - 1 = 9


def test_local_only_keeps_each_clients_adapter_and_leaves_global_alone():
    strategy = LocalOnly(**KW)
    a = {"w": np.array([1.0], dtype=np.float32)}
    b = {"w": np.array([5.0], dtype=np.float32)}
    arrays, metrics = strategy.aggregate_train(1, [create_mock_reply(a, 10, 1.0, 0), create_mock_reply(b, 10, 3.0, 2)])
    assert arrays is None
    assert metrics["train_loss"] == pytest.approx(2.0)
    assert sorted(strategy.client_arrays) == [0, 2]
    np.testing.assert_allclose(from_record(strategy.client_arrays[2])["w"], [5.0])


def test_central_trains_on_one_node_as_many_steps_as_a_federated_round():
    from strategies.central import STEPS_MULTIPLIER_KEY, Central

    strategy = Central(**{**KW, "sample_clients": 3})
    msgs = list(strategy.configure_train(1, to_record({"w": np.zeros(2)}), ConfigRecord(), FakeGrid(4)))
    assert len(msgs) == 1
    conf = msgs[0].content[CONFIG_KEY]
    assert conf[STEPS_MULTIPLIER_KEY] == 3 and conf["mode"] == "central" and conf["server-round"] == 1


def test_the_partition_of_a_reply_is_the_one_the_server_sent_and_a_stranger_is_named():
    strategy = FedAvgLoRA(**KW)
    list(strategy.configure_train(1, to_record({"w": np.zeros(1, np.float32)}), ConfigRecord(), FakeGrid(4)))
    sent = Message(RecordDict(), dst_node_id=3, message_type="train")
    assert strategy.sent_partition(Message(RecordDict(), reply_to=sent)) == 2  # FakeGrid: node k holds k - 1
    stranger = Message(RecordDict(), reply_to=Message(RecordDict(), dst_node_id=99, message_type="train"))
    with pytest.raises(ValueError) as err:
        strategy.sent_partition(stranger)
    assert str(err.value) == "a reply from node 99, which was sent no round"
