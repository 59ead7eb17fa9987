"""FedAvgLoRA through Flower's own Message objects: weighting, per-round config, local baseline."""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

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
from strategies.robust import AggregatorParams
from tests.fakes import FakeGrid, logged


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


class TimedGrid(FakeGrid):
    """A FakeGrid that keeps the timeout of each blocking query."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeouts = []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        return super().send_and_receive(messages, timeout=timeout)


def test_the_partition_query_waits_600_s_by_default_or_the_query_timeout_given():
    default, given = TimedGrid(4), TimedGrid(4)
    assert FedAvgLoRA(**KW).query_partitions(default, [1, 2]) == {1: 0, 2: 1}
    assert FedAvgLoRA(**KW, query_timeout=30.0).query_partitions(given, [3]) == {3: 2}
    assert default.timeouts == [600.0] and given.timeouts == [30.0]


class AnswerlessGrid(FakeGrid):
    """Node 2 replies to the partition query with an error, node 3 with metrics but no partition-id, node 4 with
    no metrics record; node 1 answers."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = {
            2: lambda m: Message(Error(code=0, reason="node failed"), reply_to=m),
            3: lambda m: Message(RecordDict({METRICS_KEY: MetricRecord({"other": 1})}), reply_to=m),
            4: lambda m: Message(RecordDict(), reply_to=m),
        }
        out = super().send_and_receive([m for m in messages if m.metadata.dst_node_id not in replies], timeout=timeout)
        return out + [replies[m.metadata.dst_node_id](m) for m in messages if m.metadata.dst_node_id in replies]


def test_an_error_or_an_answer_without_a_partition_id_counts_as_no_answer_and_is_asked_again(caplog):
    strategy = FedAvgLoRA(**KW)
    grid = AnswerlessGrid(4)
    assert strategy.query_partitions(grid, [1, 2, 3, 4]) == {1: 0, 2: None, 3: None, 4: None}
    assert sorted(strategy._asked) == [2, 3, 4]
    assert logged(caplog) == [
        "nodes [2, 3, 4] did not tell their partition within 600.0 s; they are not sampled until they answer "
        "(asked again; each round reads the answer without waiting)"
    ]


def test_sampling_waits_each_second_for_every_client_to_connect_and_logs_each_wait(caplog, monkeypatch):
    grid, slept = FakeGrid(2), []

    def sleep(seconds):  # a node connects while the server sleeps
        slept.append(seconds)
        grid.node_ids.append(grid.n + 1)

    monkeypatch.setattr("strategies.fedavg.time.sleep", sleep)
    nodes = FedAvgLoRA(**KW).sample_nodes(1, grid)  # 4 clients, 2 a round: all 4 must connect first
    assert slept == [1.0, 1.0]
    assert logged(caplog) == [
        "waiting for nodes: 2 connected, 4 needed",
        "waiting for nodes: 3 connected, 4 needed",
    ]
    assert nodes == [1, 3]  # partitions [0, 2], round 1 of seed 0


def test_the_default_seed_is_0_and_each_round_draws_its_own_partitions():
    strategy = FedAvgLoRA(**KW)
    assert [strategy.round_partitions(r) for r in range(1, 6)] == [[0, 2], [2, 3], [1, 3], [1, 2], [2, 3]]
    assert [FedAvgLoRA(**KW, seed=1).round_partitions(r) for r in range(1, 6)] == [
        [2, 3],
        [2, 3],
        [0, 2],
        [2, 3],
        [0, 3],
    ]


def test_flowers_summary_shows_the_sampled_fraction_no_evaluation_and_the_records_keys(caplog):
    FedAvgLoRA(**KW).summary()
    assert logged(caplog, "flwr") == [
        "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.",
        "\t├──> Sampling:",
        "\t│\t├──Fraction: train (0.50) | evaluate ( 0.00)",
        "\t│\t├──Minimum nodes: train (2) | evaluate (0)",
        "\t│\t└──Minimum available nodes: 4",
        "\t└──> Keys in records:",
        "\t\t├── Weighted by: 'server-weight'",
        "\t\t├── ArrayRecord key: 'arrays'",
        "\t\t└── ConfigRecord key: 'config'",
    ]


def test_the_server_never_asks_clients_to_evaluate():
    arrays = to_record({"w": np.zeros(2, dtype=np.float32)})
    assert list(FedAvgLoRA(**KW).configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(4))) == []


def test_the_robust_rule_and_its_parameters_are_the_ones_given():
    assert FedAvgLoRA(**KW).aggregation == AggregatorParams("mean", 0, 0.2)
    given = FedAvgLoRA(**KW, aggregator="trimmed_mean", trim_fraction=0.3).aggregation
    assert given == AggregatorParams("trimmed_mean", 0, 0.3)


def test_the_mean_is_bit_for_bit_flowers_fedavg():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    b = {"w": np.array([2.0, 7.0], dtype=np.float32)}
    replies = [create_mock_reply(a, 1, 1.0), create_mock_reply(b, 2, 2.0)]
    ours, metrics = FedAvgLoRA(**KW).aggregate_train(1, replies)
    flower, _ = FedAvg(weighted_by_key=WEIGHT_KEY).aggregate_train(1, replies)
    np.testing.assert_array_equal(from_record(ours)["w"], from_record(flower)["w"])
    assert from_record(ours)["w"].tolist() == [np.float32(1.6666667461395264), np.float32(5.333333492279053)]
    assert dict(metrics) == pytest.approx({NUM_EXAMPLES_KEY: 5 / 3, "train_loss": 5 / 3, "partition-id": 0.0})


def test_multikrum_averages_the_survivors_by_their_weights_and_the_metrics_over_every_reply(caplog):
    # f = 1 over 0, 1, 3, 6, 100: MultiKrum keeps the n - f = 4 closest (test_robust), weighted 3, 1, 1, 1
    values, weights = (0.0, 1.0, 3.0, 6.0, 100.0), (3, 1, 1, 1, 1)
    replies = [
        create_mock_reply({"w": np.array([v], dtype=np.float32)}, n, loss, pid)
        for pid, (v, n, loss) in enumerate(zip(values, weights, (1.0, 1.0, 1.0, 1.0, 8.0), strict=True))
    ]
    arrays, metrics = FedAvgLoRA(**KW, aggregator="multikrum", num_malicious=1).aggregate_train(1, replies)
    np.testing.assert_allclose(from_record(arrays)["w"], [(0 * 3 + 1 + 3 + 6) / 6])
    assert metrics["train_loss"] == pytest.approx((3 + 1 + 1 + 1 + 8) / 7)  # every reply, weighted
    assert "aggregate_train: Received 5 results and 0 failures" in logged(caplog, "flwr")


def test_a_robust_rule_like_flowers_mean_refuses_a_reply_with_a_second_array_record():
    replies = [create_mock_reply({"w": np.array([v], dtype=np.float32)}, 1, 1.0) for v in (0.0, 1.0, 2.0)]
    replies[1].content["extra"] = to_record({"w": np.array([5.0], dtype=np.float32)})
    with pytest.raises(InconsistentMessageReplies):
        FedAvgLoRA(**KW, aggregator="median").aggregate_train(1, replies)
