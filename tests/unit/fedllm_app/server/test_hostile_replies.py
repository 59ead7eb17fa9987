"""Hostile clients against the real round loop: no reply crashes the run or takes over the global adapter.

Each test drives :func:`fedllm_app.server.rounds.run_rounds` with fedllm's strategies over a grid whose
nodes answer with crafted Flower Messages; node 1 is honest (it adds 1 to the global arrays), the other
nodes add their id unless the test makes them hostile.
"""

import io
import logging
import pickle

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedllm_app.server.guard import GuardParams, ReplyGuard
from fedllm_app.server.rounds import run_rounds
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, DATA_SIZE_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, FedAvgLoRA
from strategies.local import PARTITION_KEY, LocalOnly
from strategies.records import from_record, to_record
from strategies.scaffold import C_DELTA_KEY, C_SERVER_KEY, Scaffold
from tests.fakes import FakeGrid, Writer, changed_metrics, trained_reply


class HostileGrid(FakeGrid):
    """Nodes 1..n; node k replies with the global arrays + k, then ``answer(node, round, content)`` rewrites it."""

    def __init__(self, n, answer=None, data_size=10):
        super().__init__(n, reply=self.hostile)
        self.answer, self.data_size = answer or (lambda node, rnd, c: c), data_size

    def hostile(self, msg):
        node, rnd = msg.metadata.dst_node_id, int(msg.content[CONFIG_KEY]["server-round"])
        return self.answer(node, rnd, self.honest(node, msg))

    def honest(self, node, msg):
        content = trained_reply(msg, self.data_size(node) if callable(self.data_size) else self.data_size)
        if C_SERVER_KEY in msg.content:
            arrays = from_record(content[ARRAYS_KEY])
            content[C_DELTA_KEY] = to_record({k: np.full_like(v, 0.5) for k, v in arrays.items()})
        return content


START = {"w": np.zeros(3, dtype=np.float32)}


def kw(n):
    return {"num_clients": n, "sample_clients": n, "num_rounds": 2, "lr_max": 1e-2, "lr_min": 1e-3}


def run(grid, strategy=None, num_rounds=1, guard=None):
    strategy = strategy or FedAvgLoRA(**kw(grid.n))
    writer = Writer()
    arrays, _ = run_rounds(
        grid, strategy, to_record(START), num_rounds, 1.0, writer, "fedavg", poll_interval=0.01, guard=guard
    )
    return from_record(arrays)["w"], writer.rows, strategy


def only(node, bad):
    """An answer: ``node`` sends what ``bad(content)`` makes of its honest reply; the others are honest."""
    return lambda n, rnd, c: bad(c) if n == node else c


def with_array(content, array, key=ARRAYS_KEY, name="w"):
    content[key] = ArrayRecord({name: array})
    return content


def with_metric(content, key, value):
    return changed_metrics(content, {key: value})


def npy(values, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, values, allow_pickle=allow_pickle)
    return buf.getvalue()


def raw(data, shape=(3,), dtype="float32", stype="numpy.ndarray"):
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


HOSTILE = {
    "complex128": (lambda c: with_array(c, Array(np.ones(3, dtype=np.complex128))), "dtype complex128"),
    "declared shape differs from the data": (lambda c: with_array(c, raw(npy(np.ones(2, np.float32)))), "declared"),
    "unsupported serialization": (lambda c: with_array(c, raw(npy(np.ones(3, np.float32)), stype="torch")), "serial"),
    "garbage bytes": (lambda c: with_array(c, raw(b"\x00garbage bytes")), "unreadable reply"),
    "pickled bytes": (lambda c: with_array(c, raw(pickle.dumps(np.ones(3, np.float32)))), "unreadable reply"),
    "a pickled object array": (
        lambda c: with_array(c, raw(npy(np.array([{"x": 1}, 2, 3], dtype=object), allow_pickle=True))),
        "unreadable reply",
    ),
    "partition-id NaN": (lambda c: with_metric(c, PARTITION_KEY, float("nan")), "'partition-id' is nan"),
    "partition-id a list": (lambda c: with_metric(c, PARTITION_KEY, [0, 1]), "'partition-id' is [0, 1]"),
    "partition-id out of range": (lambda c: with_metric(c, PARTITION_KEY, 7), "'partition-id' is 7"),
    "an extra metric key": (lambda c: with_metric(c, "server-weight", 1e9), "unexpected metrics ['server-weight']"),
    "train_loss a list": (lambda c: with_metric(c, "train_loss", [1.0, 2.0]), "'train_loss' is [1.0, 2.0]"),
    "no data-size": (lambda c: with_metric(c, DATA_SIZE_KEY, None), "'data-size' is None"),
    "an extra ArrayRecord": (lambda c: with_array(c, Array(np.ones(3, np.float32)), key="x"), "unexpected ['x']"),
    "metrics as a ConfigRecord": (
        lambda c: c.__setitem__(METRICS_KEY, ConfigRecord(dict(c[METRICS_KEY]))) or c,
        "'metrics' is a ConfigRecord",
    ),
    "float16 claiming partition -1": (
        lambda c: with_metric(with_array(c, Array(np.ones(3, np.float16))), PARTITION_KEY, -1),
        "dtype float16",
    ),
    "NaN values": (lambda c: with_array(c, Array(np.array([np.nan, 0, 0], np.float32))), "NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_reply_is_rejected_by_name_and_the_round_goes_on(case, caplog):
    bad, words = HOSTILE[case]
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        w, rows, _ = run(HostileGrid(2, only(2, bad)))
    np.testing.assert_array_equal(w, [1, 1, 1])  # node 1's update alone
    assert w.dtype == np.float32
    [rejection] = rows[0]["rejected"]
    assert rejection["node"] == 2 and words in rejection["reason"]
    assert f"rejected the update of node 2 (partition {rejection['partition']}): {rejection['reason']}" in caplog.text


def test_replies_from_nodes_not_sampled_or_twice_are_rejected():
    class Extra(HostileGrid):
        def pull_messages(self, ids):
            sent = {self.sent[i].metadata.dst_node_id: self.sent[i] for i in ids if i in self.sent}
            out = super().pull_messages(ids)  # ids may come in any order (a set): pick messages by node
            if not sent:
                return out
            stranger = Message(RecordDict(), dst_node_id=9, message_type="train")
            from_node_1 = next(m for m in out if m.metadata.src_node_id == 1)
            return [
                *out,
                Message(self.honest(2, sent[2]), reply_to=sent[2]),
                Message(from_node_1.content, reply_to=stranger),
            ]

    w, rows, _ = run(Extra(2))
    reasons = {(r["node"], r["reason"]) for r in rows[0]["rejected"]}
    assert reasons == {
        (2, "a second reply from this node in the same round"),
        (9, "the server sent this node no message this round"),
    }
    np.testing.assert_allclose(w, [1.5, 1.5, 1.5])


def test_a_claimed_example_count_does_not_buy_weight():
    w, rows, _ = run(HostileGrid(2, only(2, lambda c: with_metric(c, NUM_EXAMPLES_KEY, 10**9))))
    np.testing.assert_allclose(w, [1.5, 1.5, 1.5])  # the plain mean of +1 and +2, not node 2's +2


def test_a_claimed_data_size_is_capped_at_the_plan():
    grid = HostileGrid(2, data_size=lambda node: 10 if node == 1 else 10**9)
    w, _, _ = run(grid, guard=ReplyGuard(plan={0: 10, 1: 10}))
    np.testing.assert_allclose(w, [1.5, 1.5, 1.5])
    with pytest.raises(AssertionError):  # under plan weights the liar is rejected outright
        np.testing.assert_allclose(run(grid, guard=ReplyGuard(GuardParams(weights="plan"), {0: 10, 1: 10}))[0], 1.5)


def test_a_changed_data_size_is_rejected_after_the_first_report():
    sizes = iter([10, 10, 10, 50])  # node 1 round 1, node 2 round 1, node 1 round 2, node 2 round 2
    _, rows, _ = run(HostileGrid(2, data_size=lambda node: next(sizes)), num_rounds=2)
    assert rows[1]["rejected"][0]["reason"] == "'data-size' is 50, this partition reported 10 before"


def test_values_near_float32_max_are_clipped_and_the_global_stays_finite(caplog):
    huge = lambda c: with_array(c, Array(np.full(3, 3e38, np.float32)))  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        w, rows, _ = run(HostileGrid(3, only(3, huge)))
    [clip] = rows[0]["clipped"]
    assert clip["node"] == 3 and "exceeds the bound" in clip["reason"]
    assert "node 3 (partition 2): 'arrays' update norm" in caplog.text
    # node 3's update is clipped to norm_factor (10) x the median distance of the others (+1, +2: 1.5 each)
    np.testing.assert_allclose(w, [(1 + 2 + 15) / 3] * 3, rtol=1e-6)
    assert np.isfinite(run(HostileGrid(3, only(3, huge)), num_rounds=2)[0]).all()


def test_an_oversized_update_is_rejected_when_configured():
    big = lambda c: with_array(c, Array(np.full(3, 1e6, np.float32)))  # noqa: E731
    guard = ReplyGuard(GuardParams(on_exceed="reject"))
    w, rows, _ = run(HostileGrid(3, only(3, big)), guard=guard)
    np.testing.assert_allclose(w, [1.5, 1.5, 1.5])
    assert "robust.on_exceed=reject" in rows[0]["rejected"][0]["reason"]


def scaffold(n):
    return Scaffold(server_lr=1.0, **kw(n))


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (lambda c: c.pop(C_DELTA_KEY) and c, "missing ['c-delta']"),
        (lambda c: with_array(c, Array(np.ones(3, np.float32)), key=C_DELTA_KEY, name="v"), "of 'c-delta'"),
        (lambda c: with_array(c, Array(np.ones((2, 3), np.float32)), key=C_DELTA_KEY), "of 'c-delta'"),
        (lambda c: with_array(c, Array(np.full(3, np.inf, np.float32)), key=C_DELTA_KEY), "of 'c-delta'"),
    ],
    ids=["no c-delta", "wrong names", "wrong shape", "non-finite"],
)
def test_a_bad_scaffold_reply_leaves_the_server_control_variate_sound(bad, words):
    w, rows, strategy = run(HostileGrid(2, only(2, bad)), scaffold(2))
    np.testing.assert_array_equal(w, [1, 1, 1])
    assert words in rows[0]["rejected"][0]["reason"]
    assert strategy.c["w"].shape == (3,)
    np.testing.assert_allclose(strategy.c["w"], 0.5 * 1 / 2)  # (|S| / N) x node 1's delta


def test_a_scaffold_reply_without_c_delta_is_not_aggregated_by_a_fedavg_server():
    grid = HostileGrid(2, only(2, lambda c: c.__setitem__(C_DELTA_KEY, to_record(START)) or c))
    _, rows, _ = run(grid)
    assert "unexpected ['c-delta']" in rows[0]["rejected"][0]["reason"]


def test_local_only_keeps_each_partition_for_the_node_that_first_held_it():
    spoof = lambda n, rnd, c: with_metric(c, PARTITION_KEY, 0) if (n, rnd) == (2, 2) else c  # noqa: E731
    _, rows, strategy = run(HostileGrid(2, spoof), LocalOnly(**kw(2)), num_rounds=2)
    assert rows[1]["rejected"][0]["reason"] == "'partition-id' is 0, but this node trains partition 1"
    np.testing.assert_array_equal(from_record(strategy.client_arrays[0])["w"], [1, 1, 1])  # node 1's adapter
    race = lambda n, rnd, c: with_metric(c, PARTITION_KEY, 0) if n == 2 else c  # noqa: E731
    _, rows, strategy = run(HostileGrid(2, race), LocalOnly(**kw(2)), num_rounds=2)  # a race wins nothing
    assert [[r["node"] for r in row["rejected"]] for row in rows] == [[2], [2]]
    assert rows[0]["rejected"][0]["reason"] == "'partition-id' is 0, but this node trains partition 1"
    assert set(strategy.client_arrays) == {0}
    np.testing.assert_array_equal(from_record(strategy.client_arrays[0])["w"], [1, 1, 1])


def test_a_node_claiming_a_partition_first_cannot_lock_its_holder_out():
    """Node 2 (partition 1 by the partition query) claims partition 0 before node 1 ever replies; node 1's
    replies for partition 0 still count, as the server sent it partition 0's round (the one source of
    node -> partition is the query, which also picks the nodes and their weights)."""
    silent_first = lambda n, rnd, c: None if (n, rnd) == (1, 1) else c  # noqa: E731
    steal = lambda n, rnd, c: with_metric(c, PARTITION_KEY, 0) if n == 2 else silent_first(n, rnd, c)  # noqa: E731
    _, rows, _ = run(HostileGrid(2, steal), num_rounds=2)
    assert [[r["node"] for r in row["rejected"]] for row in rows] == [[2], [2]]
    assert rows[1]["replied"] == 1 and rows[1]["aggregated"]


def test_a_reply_that_breaks_any_reader_is_a_rejection_not_a_crash():
    class Exploding(RecordDict):
        def keys(self):
            raise RuntimeError("boom")

    w, rows, _ = run(HostileGrid(2, only(2, lambda c: Exploding(dict(c.items())))))
    np.testing.assert_array_equal(w, [1, 1, 1])
    assert "unreadable reply (RuntimeError: boom)" in rows[0]["rejected"][0]["reason"]


# --- FedAvg weights: the client's data size (McMahan et al., OpenFedLLM), as the server plans it ---


def test_fedavg_weighs_clients_by_their_partition_size_not_the_round_sample():
    # Both clients train on 10 rows this round (num-examples 10); partition 0 holds 30 rows, partition 1 holds 10.
    grid = HostileGrid(2, data_size=lambda node: 30 if node == 1 else 10)
    w, _, _ = run(grid, guard=ReplyGuard(plan={0: 30, 1: 10}))
    np.testing.assert_allclose(w, [(30 * 1 + 10 * 2) / 40] * 3)


def test_uniform_weights_ignore_the_sizes():
    grid = HostileGrid(2, data_size=lambda node: 30 if node == 1 else 10)
    w, _, _ = run(grid, guard=ReplyGuard(GuardParams(weights="uniform"), {0: 30, 1: 10}))
    np.testing.assert_allclose(w, [1.5] * 3)


def test_the_local_only_baseline_keeps_each_clients_adapter_unclipped():
    far = lambda c: with_array(c, Array(np.full(3, 1e3, np.float32)))  # noqa: E731
    _, rows, strategy = run(HostileGrid(3, only(3, far)), LocalOnly(**kw(3)))
    assert rows[0]["clipped"] == [] and rows[0]["rejected"] == []
    np.testing.assert_array_equal(from_record(strategy.client_arrays[2])["w"], [1e3] * 3)
