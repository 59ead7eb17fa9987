"""The server's round loop under DP-FedAvg: epsilon each round, a clean stop before the target, every round noised."""

import logging

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedllm_app.config import load_config
from fedllm_app.server.outputs import format_round
from fedllm_app.server.rounds import run_rounds
from fedllm_app.server.run import build_strategy
from strategies.accounting import epsilon
from strategies.dp import WITHIN_CLIP_KEY
from strategies.fedavg import ARRAYS_KEY, DATA_SIZE_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from strategies.records import from_record, to_record
from tests.fakes import Writer

START = {"w": np.zeros(3, dtype=np.float32)}


class Grid:
    """Nodes 1..n holding partitions 0..n-1; node k replies with the global arrays plus k (norm k sqrt 3)."""

    def __init__(self, n, within=0.0):
        self.n, self.sent, self.within = n, {}, within

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def send_and_receive(self, messages, *, timeout=None):
        return [
            Message(RecordDict({METRICS_KEY: MetricRecord({"partition-id": m.metadata.dst_node_id - 1})}), reply_to=m)
            for m in messages
        ]

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.sent[m.object_id] = m
        return [m.object_id for m in messages]

    def pull_messages(self, ids):
        out = []
        for i in ids:
            msg = self.sent.pop(i, None)
            if msg is None:
                continue
            node = msg.metadata.dst_node_id
            arrays = {k: v + node for k, v in from_record(msg.content[ARRAYS_KEY]).items()}
            metrics = {NUM_EXAMPLES_KEY: 10, DATA_SIZE_KEY: 10, "train_loss": 1.0, "partition-id": node - 1}
            metrics[WITHIN_CLIP_KEY] = self.within  # what a DP client reports
            out.append(Message(RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: MetricRecord(metrics)}),
                               reply_to=msg))  # fmt: skip
        return out


def dp_strategy(overrides, num_rounds):
    return build_strategy(
        load_config({"overrides": f"privacy.dp=true baseline=none num_rounds={num_rounds} {overrides}"})
    )


def dp_rounds(overrides, nodes, num_rounds, within=0.0, strategy=None):
    strategy = strategy or dp_strategy(overrides, num_rounds)
    writer = Writer()
    start = to_record(START)
    arrays, _ = run_rounds(Grid(nodes, within), strategy, start, num_rounds, 5.0, writer, "fedavg", poll_interval=0.01)
    return from_record(arrays)["w"], writer.rows, strategy


def test_every_round_reports_epsilon_and_the_noise_in_metrics_and_the_round_line():
    w, rows, strategy = dp_rounds("num_clients=4 sample_clients=2 privacy.noise_multiplier=1.0", 4, 3)
    assert [(r["replied"], r["rejected"]) for r in rows] == [(r["sampled"], []) for r in rows]  # DP replies pass
    assert [r["epsilon"] for r in rows] == [pytest.approx(epsilon(0.5, 1.0, t, 1e-5)) for t in (1, 2, 3)]
    assert all(r["dp_noise_std"] == pytest.approx(1.0 * 1.0 / 2) and r["dp_clip_norm"] == 1.0 for r in rows)
    assert all(r["clipped"] == [] for r in rows)  # no median-relative bound from the guard under DP
    line = format_round({**rows[-1], "seconds": 1.0})
    assert f"| epsilon {rows[-1]['epsilon']:.2f} (delta 1e-05)" in line
    assert np.isfinite(w).all() and not np.allclose(w, 0.0)


def test_updates_that_clients_did_not_clip_are_clipped_by_the_server():
    _, rows, _ = dp_rounds("num_clients=3 sample_clients=3 privacy.clip_norm=1.0", 3, 1)  # q = 1: all three
    assert rows[0]["replied"] == 3 and rows[0]["dp_server_clipped"] == 3.0  # norms sqrt 3, 2 sqrt 3, 3 sqrt 3


def test_target_epsilon_ends_the_run_before_the_round_that_would_exceed_it(caplog):
    q, z = 0.5, 2.0
    last = max(t for t in range(1, 30) if epsilon(q, z, t, 1e-5) <= 3.0)
    overrides = f"num_clients=4 sample_clients=2 privacy.noise_multiplier={z} privacy.target_epsilon=3.0"
    with caplog.at_level(logging.WARNING):
        _, rows, _ = dp_rounds(overrides, 4, last + 5)
    assert [r["round"] for r in rows] == list(range(1, last + 1))
    assert rows[-1]["epsilon"] <= 3.0
    assert f"stopping before round {last + 1}" in caplog.text and f"the run ends after round {last}" in caplog.text


def test_a_round_where_poisson_sampling_drew_no_client_is_still_noised_and_aggregated():
    # q = 1/5: find a round whose (secret) draw is empty, run up to it
    overrides = "num_clients=5 sample_clients=1 privacy.noise_multiplier=1.0"
    strategy = dp_strategy(overrides, 1)
    empty = next(r for r in range(1, 200) if not strategy.round_partitions(r))
    w, rows, _ = dp_rounds(overrides, 5, empty, strategy=strategy)
    assert rows[-1]["sampled"] == 0 and rows[-1]["aggregated"] is True


def test_a_client_claiming_a_within_clip_bit_of_50_moves_the_adaptive_count_by_one_only():
    _, rows, strategy = dp_rounds("num_clients=2 sample_clients=2 privacy.adaptive_clip=true", 2, 1, within=50.0)
    assert rows[0]["replied"] == 2 and rows[0]["dp_clip_fraction"] == 0.0
    # two bits of 1 and N(0, 1) count noise: C = exp(-0.2 ((2 + noise) / 2 - 0.5)), within [0.5, 1.6] unless the
    # noise passes 5 std; taken at face value, 50 + 50 would give exp(-0.2 * 49.5), about 5e-5
    assert 0.5 < strategy.clip_norm < 1.6
