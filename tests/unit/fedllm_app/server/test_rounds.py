"""The server's reply polling: returns as soon as every reply is in, stops at the timeout."""

import time
from types import SimpleNamespace

from fedllm_app.server.rounds import send_and_receive


class SlowGrid:
    """A Grid whose replies become available ``delay`` seconds after the push."""

    def __init__(self, delay: float, answer: set[str]) -> None:
        self.delay, self.answer, self.pulls = delay, answer, 0

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        return [f"id{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        if time.monotonic() - self.pushed < self.delay:
            return []
        ready = [i for i in ids if i in self.answer]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


def test_returns_soon_after_the_last_reply():
    grid = SlowGrid(0.2, {"id0", "id1"})
    start = time.monotonic()
    replies = send_and_receive(grid, ["a", "b"], timeout=10, poll_interval=0.02)
    assert len(replies) == 2
    assert time.monotonic() - start < 0.5
    assert grid.pulls >= 2


def test_missing_replies_end_at_the_timeout():
    grid = SlowGrid(0.0, {"id0"})
    start = time.monotonic()
    replies = send_and_receive(grid, ["a", "b"], timeout=0.3, poll_interval=0.05)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id0"]
    assert 0.3 <= time.monotonic() - start < 1.0


# --- the round loop over a grid that answers: bad updates, empty rounds, dropouts, bytes ---

import logging  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flwr.app import RecordDict  # noqa: E402

from fedllm_app.client import faults  # noqa: E402
from fedllm_app.server.rounds import NodeWaitError, content_bytes, run_rounds  # noqa: E402
from strategies.fedavg import ARRAYS_KEY, FedAvgLoRA  # noqa: E402
from strategies.records import from_record, to_record  # noqa: E402
from tests.fakes import FakeGrid, Writer, trained_reply  # noqa: E402


def answering(n, answer=lambda node, content: content):
    """Nodes 1..n; node k replies with the global arrays plus k (or what ``answer`` makes of it)."""
    return FakeGrid(n, reply=lambda msg: answer(msg.metadata.dst_node_id, trained_reply(msg)))


KW = {"num_clients": 2, "sample_clients": 2, "num_rounds": 2, "lr_max": 1e-2, "lr_min": 1e-3}
START = {"w": np.zeros(3, dtype=np.float32)}


def rounds(grid, num_rounds=1, **kwargs):
    writer = Writer()
    arrays, _ = run_rounds(
        grid, FedAvgLoRA(**KW), to_record(START), num_rounds, 1.0, writer, "fedavg", poll_interval=0.01, **kwargs
    )
    return from_record(arrays)["w"], writer.rows


def test_a_bad_update_is_rejected_and_the_others_are_aggregated(caplog):
    grid = answering(2, lambda node, c: faults.corrupt(c, "nan") if node == 2 else c)
    with caplog.at_level(logging.WARNING):
        w, rows = rounds(grid)
    np.testing.assert_array_equal(w, [1, 1, 1])  # node 1's update alone (start + 1)
    assert rows[0]["replied"] == 1 and rows[0]["rejected"][0]["node"] == 2
    assert "rejected the update of node 2 (partition 1): array 'w' contains NaN or Inf" in caplog.text


def test_a_round_without_valid_replies_keeps_the_model_and_says_so(caplog):
    grid = answering(2, lambda node, c: faults.corrupt(c, "zero_examples"))
    with caplog.at_level(logging.WARNING):
        w, rows = rounds(grid)
    np.testing.assert_array_equal(w, [0, 0, 0])
    assert rows[0]["aggregated"] is False and rows[0]["replied"] == 0
    assert "fewer than min_replies=1: the round is NOT aggregated" in caplog.text


def test_min_replies_holds_back_a_thin_round():
    grid = answering(2, lambda node, c: None if node == 2 else c)  # node 2 never answers
    w, rows = rounds(grid, min_replies=2)
    np.testing.assert_array_equal(w, [0, 0, 0])
    assert rows[0]["failed_nodes"] == [2] and rows[0]["failed"] == 1
    w, rows = rounds(answering(2, lambda node, c: None if node == 2 else c), min_replies=1)
    np.testing.assert_array_equal(w, [1, 1, 1])


def test_missing_nodes_sample_the_connected_ones_after_node_wait():
    start = time.monotonic()
    w, rows = rounds(answering(1), node_wait=0.3)  # the strategy wants 2 nodes, 1 is connected
    assert 0.3 <= time.monotonic() - start < 2.0
    assert rows[0]["sampled"] == 1
    np.testing.assert_array_equal(w, [1, 1, 1])


def test_too_few_nodes_end_with_a_clear_error_not_a_hang():
    with pytest.raises(NodeWaitError, match="0 SuperNodes connected after waiting node_wait_timeout=0.2 s"):
        rounds(answering(0), node_wait=0.2)


def test_bytes_per_node_and_running_totals():
    totals = {}
    _, rows = rounds(answering(2), num_rounds=2, totals=totals)
    first = rows[0]
    assert set(first["bytes_by_node"]) == {"1", "2"}
    assert {e["partition"] for e in first["bytes_by_node"].values()} == {0, 1}
    per_node = first["bytes_by_node"]["1"]
    assert per_node["sent"] > 12 and per_node["received"] > 12  # at least the 3 float32 values each way
    assert first["bytes_sent"] == sum(e["sent"] for e in first["bytes_by_node"].values())
    assert rows[1]["bytes_sent_total"] == first["bytes_sent"] + rows[1]["bytes_sent"]
    assert rows[1]["bytes_received_total"] == totals["bytes_received_total"]
    content = RecordDict({ARRAYS_KEY: to_record(START)})
    assert content_bytes(content) >= 12  # the values plus the names and dtypes
