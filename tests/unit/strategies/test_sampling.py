"""Which partitions train in a round: fixed by (seed, round), whatever the node ids or the run's history."""

import hashlib
import hmac
import random

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from strategies.fedavg import METRICS_KEY, PARTITION_KEY, FedAvgLoRA
from strategies.local import LocalOnly
from strategies.records import to_record
from strategies.sampling import draw_order, keyed_uniform, sample_partitions, secret_poisson_partitions
from tests.fakes import FakeGrid, logged

KW = {"num_clients": 6, "sample_clients": 2, "num_rounds": 10, "lr_max": 1e-2, "lr_min": 1e-3}
ARRAYS = to_record({"w": np.zeros(2, np.float32)})


def trained(strategy, grid, rounds) -> list[list[int]]:
    """The partitions each round's train messages go to."""
    out = []
    for rnd in rounds:
        nodes = [m.metadata.dst_node_id for m in strategy.configure_train(rnd, ARRAYS, ConfigRecord(), grid)]
        out.append(sorted(grid.partition(n) for n in nodes))
    return out


def test_the_same_seed_trains_the_same_partitions_whatever_the_node_ids():
    a = FakeGrid({100 + p: p for p in range(6)})
    b = FakeGrid({n: p for n, p in zip([77, 3, 912, 45, 8, 600], [4, 0, 2, 5, 1, 3], strict=True)})
    random.seed(1)
    first = trained(FedAvgLoRA(**KW, seed=7), a, range(1, 11))
    random.seed(2)  # the process's random state plays no part
    assert trained(FedAvgLoRA(**KW, seed=7), b, range(1, 11)) == first
    assert all(len(r) == 2 for r in first)
    assert trained(FedAvgLoRA(**KW, seed=8), a, range(1, 11)) != first


def test_a_resumed_run_trains_the_same_partitions_as_an_uninterrupted_one():
    grid = FakeGrid({10 + p: p for p in range(6)})
    whole = trained(FedAvgLoRA(**KW, seed=3), grid, range(1, 9))
    resumed = trained(FedAvgLoRA(**KW, seed=3), FakeGrid({50 + p: p for p in range(6)}), range(5, 9))
    assert resumed == whole[4:]


def test_each_node_is_asked_its_partition_once():
    grid = FakeGrid({10 + p: p for p in range(6)})
    trained(FedAvgLoRA(**KW), grid, range(1, 5))
    assert len(grid.queries) == 6


def test_every_partition_is_drawn_about_equally_often():
    counts = np.zeros(6)
    for rnd in range(1, 601):
        counts[sample_partitions(0, rnd, 6, 2, range(6))] += 1
    assert counts.sum() == 1200
    assert counts.min() > 150 and counts.max() < 250  # 200 expected each


def test_a_missing_partition_gives_its_place_to_the_next_one_drawn():
    order = draw_order(5, 3, 6)
    assert sorted(order) == list(range(6))
    assert sample_partitions(5, 3, 6, 2, range(6)) == sorted(order[:2])
    assert sample_partitions(5, 3, 6, 2, set(range(6)) - {order[0]}) == sorted(order[1:3])


def test_a_node_that_does_not_tell_its_partition_is_not_sampled(caplog):
    grid = FakeGrid({1: 0, 2: None, 3: 2})
    strategy = FedAvgLoRA(**{**KW, "num_clients": 3, "sample_clients": 2}, query_timeout=0.1)
    for rnd in range(1, 6):
        assert trained(strategy, grid, [rnd]) == [[0, 2]]
    assert logged(caplog) == [
        "nodes [2] did not tell their partition within 0.1 s; they are not sampled until they answer (asked "
        "again; each round reads the answer without waiting)"
    ]
    assert logged(caplog, "flwr").count("configure_train: Sampled 2 nodes (out of 3): partitions [0, 2]") == 5


def test_a_node_answering_the_partition_query_with_a_non_integer_is_not_sampled(caplog):
    strategy = FedAvgLoRA(**{**KW, "num_clients": 2, "sample_clients": 1}, query_timeout=0.1)
    assert trained(strategy, FakeGrid({1: 0, 2: 1.5}), [1, 2]) == [[0], [0]]
    assert logged(caplog) == ["node 2 answered the partition query with 1.5, not an integer; it is not sampled"]


def test_a_partition_id_outside_num_clients_leaves_that_node_out_and_logs_the_fix(caplog):
    """A node's answer must not end the run (a hostile or misconfigured node would stop everyone's training)."""
    strategy = FedAvgLoRA(**{**KW, "num_clients": 2, "sample_clients": 1}, query_timeout=0.1)
    assert trained(strategy, FakeGrid({1: 0, 2: 2}), [1, 2]) == [[0], [0]]
    assert logged(caplog) == [  # and not also "did not tell their partition": it did
        "node 2 holds partition-id 2, outside 0..1 for num_clients=2; it is not sampled: give each SuperNode a "
        "partition-id below num_clients"
    ]


def test_two_nodes_holding_one_partition_are_named_once_and_only_one_trains_it(caplog):
    grid = FakeGrid({1: 0, 2: 0, 3: 1})
    strategy = FedAvgLoRA(**{**KW, "num_clients": 2, "sample_clients": 2})
    assert trained(strategy, grid, [1, 2, 3]) == [[0, 1]] * 3
    assert logged(caplog) == [
        "nodes 1 and 2 both hold partition-id 0; only node 1 is sampled for it: give each SuperNode its own "
        "partition-id"
    ]


def test_the_local_baseline_trains_every_client_every_round():
    """OpenFedLLM's local baseline trains its client in every round, not only when a federated run would draw it."""
    grid = FakeGrid({10 + p: p for p in range(6)})
    assert trained(LocalOnly(**KW), grid, range(1, 4)) == [list(range(6))] * 3


def test_a_node_silent_at_its_first_query_is_sampled_once_it_answers_and_no_round_waits_for_it(caplog):
    caplog.set_level("INFO", logger="fedllm")
    partitions = {1: 0, 2: None, 3: 2}
    grid = FakeGrid(partitions)
    strategy = FedAvgLoRA(**{**KW, "num_clients": 3, "sample_clients": 2}, query_timeout=0.1)
    assert trained(strategy, grid, [1]) == [[0, 2]]
    waits = []
    grid.send_and_receive = lambda *a, **k: waits.append(a) or []  # no later round may block on a query
    assert trained(strategy, grid, [2, 3]) == [[0, 2], [0, 2]]  # still silent: not sampled, not re-sent
    partitions[2] = 1  # the node comes up and answers the question it was asked
    rounds = trained(strategy, grid, range(4, 10))
    assert any(1 in r for r in rounds), "the node that answered late was never sampled"
    assert waits == []
    messages = logged(caplog)
    assert messages[0].startswith("nodes [2] did not tell their partition within 0.1 s; they are not sampled until")
    assert "node 2 told its partition (1) late; it can be sampled from now on" in messages
    assert len([q for q in grid.queries if q.metadata.dst_node_id == 2]) == 2  # the first query and one re-ask


def test_a_late_answer_outside_num_clients_still_leaves_the_node_out(caplog):
    partitions = {1: 0, 2: None, 3: 2}
    grid = FakeGrid(partitions)
    strategy = FedAvgLoRA(**{**KW, "num_clients": 3, "sample_clients": 2}, query_timeout=0.1)
    trained(strategy, grid, [1])
    partitions[2] = 7
    assert trained(strategy, grid, range(2, 6)) == [[0, 2]] * 4
    assert any("node 2 holds partition-id 7, outside 0..2" in m for m in logged(caplog))
    assert strategy.partition_of[2] is None and not strategy._asked


class LateQueryGrid(FakeGrid):
    """A FakeGrid whose open partition queries can end in an error reply, and which can hand back, before the
    answers asked for, an answer to an older question (``stale``) that the strategy must not take.
    """

    def __init__(self, partitions):
        super().__init__(partitions)
        self.errors: set[int] = set()  # nodes whose open query ends in an error reply, once
        self.stale: list = []

    def pull_messages(self, ids):
        out = list(self.stale)
        self.stale = []
        for i in ids:
            msg = self.sent.get(i)
            node = None if msg is None else msg.metadata.dst_node_id
            if node in self.errors:
                self.errors.discard(node)
                del self.sent[i]
                out.append(Message(Error(code=0, reason="the question expired"), reply_to=msg))
            else:
                out.extend(super().pull_messages([i]))
        return out


def queries_to(grid, node):
    return [q for q in grid.queries if q.metadata.dst_node_id == node]


def test_an_error_reply_to_an_open_partition_query_asks_once_more_and_the_answers_after_it_are_still_read():
    partitions = {1: 0, 2: None, 3: None}
    grid = LateQueryGrid(partitions)
    strategy = FedAvgLoRA(**{**KW, "num_clients": 3, "sample_clients": 1}, query_timeout=0.1)
    trained(strategy, grid, [1])  # nodes 2 and 3 silent: asked again without waiting
    grid.errors.add(2)
    partitions.update({2: 1, 3: 2})
    trained(strategy, grid, [2])  # node 2's open question ends in an error; node 3's answer comes after it
    assert strategy.partition_of.get(3) == 2
    assert 2 not in strategy.partition_of and 2 in strategy._asked
    assert len(queries_to(grid, 2)) == 3  # the first query, the re-ask, and one more after the error
    trained(strategy, grid, [3])
    assert strategy.partition_of[2] == 1 and not strategy._asked


def test_an_answer_to_an_older_partition_query_is_ignored_and_the_current_answers_are_read(caplog):
    partitions = {1: 0, 2: None, 3: None}
    grid = LateQueryGrid(partitions)
    strategy = FedAvgLoRA(**{**KW, "num_clients": 3, "sample_clients": 1}, query_timeout=0.1)
    trained(strategy, grid, [1])
    first = queries_to(grid, 2)[0]  # sent with send_and_receive, before the re-ask the strategy now waits on
    grid.stale = [Message(RecordDict({METRICS_KEY: MetricRecord({PARTITION_KEY: 7})}), reply_to=first)]
    partitions[3] = 2
    trained(strategy, grid, [2])
    assert 2 not in strategy.partition_of and 2 in strategy._asked  # still waiting on its current question
    assert strategy.partition_of.get(3) == 2
    assert not [m for m in logged(caplog) if "partition-id 7" in m]


KEY = bytes(range(32))


def hmac_uniform(key: bytes, server_round: int, partition: int) -> float:
    """The draw recomputed from its definition: HMAC-SHA256 of ``poisson-r-p``, its first 8 bytes big-endian / 2^64."""
    digest = hmac.new(key, f"poisson-{server_round}-{partition}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def test_each_partition_is_drawn_by_its_own_keyed_draw_below_the_rate():
    drawn = secret_poisson_partitions(KEY, 3, 40, 0.3, range(40))
    assert drawn == [p for p in range(40) if hmac_uniform(KEY, 3, p) < 0.3]
    assert 0 < len(drawn) < 40


def test_a_partition_whose_draw_equals_the_rate_exactly_is_not_drawn():
    # P(u < q) = q for u uniform on [0, 1): the draw equal to q is outside
    rate = keyed_uniform(KEY, 1, 5)
    assert rate == hmac_uniform(KEY, 1, 5)
    drawn = secret_poisson_partitions(KEY, 1, 10, rate, range(10))
    assert 5 not in drawn
    assert drawn == [p for p in range(10) if hmac_uniform(KEY, 1, p) < rate]


def test_a_16_byte_sampling_key_is_accepted_and_a_15_byte_one_refused_with_the_whole_message():
    assert secret_poisson_partitions(bytes(16), 1, 10, 1.0, range(10)) == list(range(10))
    with pytest.raises(ValueError) as err:
        secret_poisson_partitions(bytes(15), 1, 10, 1.0, range(10))
    assert str(err.value) == "a sampling key of 15 bytes is too short to keep the sample secret; use 32 random bytes"
