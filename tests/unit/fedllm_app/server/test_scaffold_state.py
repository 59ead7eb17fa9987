"""SCAFFOLD's control variates through the server's round loop: ``c = mean_i c_i`` over the N partitions
holds after rejected, late and too few replies and across a resume, with quadratic clients that run the
app's own SCAFFOLD client code (:class:`fedllm_app.client.gradient_terms.ScaffoldClient`) on local SGD.
"""

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedllm_app.client.gradient_terms import ScaffoldClient
from fedllm_app.server.resume import load_state, save_state
from fedllm_app.server.rounds import run_rounds
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, DATA_SIZE_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, PARTITION_KEY
from strategies.records import from_record, to_record
from strategies.scaffold import C_CLIENT_KEY, C_DELTA_KEY, C_SERVER_KEY, Scaffold
from tests.fakes import FakeGrid, Writer

N = 4
KW = {"num_clients": N, "sample_clients": 3, "num_rounds": 8, "lr_max": 1e-2, "lr_min": 1e-3, "seed": 1}
START = {"w": np.zeros(3, np.float32)}  # adapters travel as float32 (the reply checks)
CURVATURE = np.array([1.0, 4.0, 10.0, 2.0])
OPTIMUM = np.array([[-2.0, 0.5, 1.0], [3.0, -1.0, 0.0], [0.5, 2.0, -3.0], [1.0, 1.0, 1.0]])


def local_sgd(msg: Message, pid: int, steps: int = 5, lr: float = 0.05) -> RecordDict:
    """Partition ``pid``'s client: local SGD on ``a/2 ||x - o||^2`` corrected by ``c - c_i``, SCAFFOLD's reply."""
    client = ScaffoldClient.from_message(msg)
    correction = client.correction()["w"]
    y, grads = from_record(msg.content[ARRAYS_KEY])["w"], []
    for _ in range(steps):
        g = CURVATURE[pid] * (y - OPTIMUM[pid])
        grads.append(g)
        y = y - lr * (g + correction)
    metrics = MetricRecord({NUM_EXAMPLES_KEY: 10, DATA_SIZE_KEY: 10, "train_loss": 1.0, PARTITION_KEY: pid})
    dc = client.finish({"w": np.mean(grads, axis=0).astype(np.float32)})
    as_sent = {"w": y.astype(np.float32)}  # clients send float32 (the server's reply checks)
    return RecordDict({ARRAYS_KEY: to_record(as_sent), METRICS_KEY: metrics, C_DELTA_KEY: dc})


def scaffold_grid(first_id: int, fault=lambda rnd, pid, content: content) -> FakeGrid:
    """Nodes ``first_id + p`` hold partition ``p``; ``fault(round, pid, content)`` may spoil or drop a reply."""

    def reply(msg: Message) -> RecordDict | None:
        pid = msg.metadata.dst_node_id - first_id
        return fault(int(msg.content[CONFIG_KEY]["server-round"]), pid, local_sgd(msg, pid))

    return FakeGrid(range(first_id, first_id + N), reply=reply, partition_of=lambda node: node - first_id)


def mean_of_client_controls(strategy: Scaffold) -> np.ndarray:
    """``mean_i c_i`` over all N partitions (a partition never accepted holds zeros)."""
    return sum(strategy.client_control(p)["w"] for p in range(N)) / N


def play(strategy, grid, first: int, last: int, arrays=None, **kwargs):
    writer = Writer()
    out, _ = run_rounds(
        grid, strategy, arrays or to_record(START), last, 0.2, writer, "scaffold",
        poll_interval=0.0, start_round=first, **kwargs,
    )  # fmt: skip
    return from_record(out)["w"], writer.rows


def test_c_stays_the_mean_of_every_c_i_after_rejected_late_and_thin_rounds():
    def fault(rnd, pid, content):
        if rnd == 2 and pid == sampled[2][0]:  # a NaN control delta: rejected
            content[C_DELTA_KEY] = to_record({"w": np.full(3, np.nan, np.float32)})
        if rnd == 3 and pid == sampled[3][0]:  # late: no reply within the round
            return None
        if rnd == 4 and pid in sampled[4][:2]:  # only one reply, below min_replies=2
            return None
        return content

    strategy = Scaffold(server_lr=1.0, **KW)
    sampled = {r: sorted(strategy.round_partitions(r)) for r in range(1, 7)}
    seen = []

    def check(rnd, arrays, record):
        np.testing.assert_allclose(strategy.c["w"], mean_of_client_controls(strategy), atol=1e-6)
        seen.append((record["replied"], record["aggregated"], len(record["rejected"])))

    play(strategy, scaffold_grid(100, fault), 1, 6, min_replies=2, on_round_end=check)
    assert seen[1:4] == [(2, True, 1), (2, True, 0), (1, False, 0)]
    assert np.abs(strategy.c["w"]).max() > 0.1  # the control variates did move


def test_a_partitions_c_i_changes_only_when_its_reply_is_accepted():
    strategy = Scaffold(server_lr=1.0, **KW)
    play(strategy, scaffold_grid(100), 1, 1)
    before = {p: strategy.client_control(p)["w"].copy() for p in range(N)}
    rejected = sorted(strategy.round_partitions(2))[0]

    def fault(rnd, pid, content):
        if pid == rejected:
            content[C_DELTA_KEY] = to_record({"w": np.full(3, np.inf, np.float32)})
        return content

    play(strategy, scaffold_grid(100, fault), 2, 2)
    np.testing.assert_array_equal(strategy.client_control(rejected)["w"], before[rejected])
    changed = [p for p in range(N) if not np.array_equal(strategy.client_control(p)["w"], before[p])]
    assert sorted(changed) == sorted(set(strategy.round_partitions(2)) - {rejected})


def test_each_train_message_carries_c_and_its_own_partitions_c_i():
    strategy = Scaffold(server_lr=1.0, **KW)
    play(strategy, scaffold_grid(100), 1, 2)
    grid = scaffold_grid(100)
    for msg in strategy.configure_train(3, to_record(START), ConfigRecord(), grid):
        pid = msg.metadata.dst_node_id - 100
        np.testing.assert_array_equal(from_record(msg.content[C_SERVER_KEY])["w"], strategy.c["w"])
        np.testing.assert_array_equal(from_record(msg.content[C_CLIENT_KEY])["w"], strategy.client_control(pid)["w"])


def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(tmp_path):
    """The next rounds' clients use the restored c and c_i: losing either changes the global model."""
    whole = Scaffold(server_lr=1.0, **KW)
    w2, _ = play(whole, scaffold_grid(100), 1, 2)
    save_state(
        tmp_path, phase="scaffold", server_round=2, arrays=to_record({"w": w2}),
        strategy_state=whole.state_dict(), totals={}, summary={}, last_eval={}, metrics=[],
    )  # fmt: skip
    expected, _ = play(whole, scaffold_grid(100), 3, 6, arrays=to_record({"w": w2}))

    state = load_state(tmp_path)
    resumed = Scaffold(server_lr=1.0, **KW)
    resumed.load_state_dict(state.strategy)
    got, _ = play(resumed, scaffold_grid(500), 3, 6, arrays=state.arrays)  # a new run: other node ids
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(resumed.c["w"], whole.c["w"], rtol=1e-12)

    lost = Scaffold(server_lr=1.0, **KW)
    lost.load_state_dict({k: v for k, v in state.strategy.items() if k != "c"})
    without_c, _ = play(lost, scaffold_grid(500), 3, 6, arrays=state.arrays)
    assert not np.allclose(without_c, expected, rtol=1e-6)


def test_server_lr_scales_the_step_towards_the_clients_mean():
    for server_lr, expected in [(1.0, 1.0), (0.5, 0.5)]:
        strategy = Scaffold(server_lr=server_lr, **{**KW, "sample_clients": N})
        grid = scaffold_grid(100, lambda rnd, pid, c: same_reply(c, 1.0))
        w, _ = play(strategy, grid, 1, 1)
        np.testing.assert_allclose(w, np.full(3, expected))


def same_reply(content: RecordDict, value: float) -> RecordDict:
    content[ARRAYS_KEY] = to_record({"w": np.full(3, value, np.float32)})
    return content


def test_a_scaffold_state_saved_before_the_first_round_holds_no_c():
    kw = {"num_clients": 2, "sample_clients": 2, "num_rounds": 1, "lr_max": 1e-2, "lr_min": 1e-3}
    assert Scaffold(server_lr=1.0, **kw).state_dict() == {"c": None}


def test_a_scaffold_round_whose_every_reply_failed_keeps_x_and_c():
    from flwr.app import Error

    kw = {"num_clients": 2, "sample_clients": 2, "num_rounds": 1, "lr_max": 1e-2, "lr_min": 1e-3}
    s = Scaffold(server_lr=1.0, **kw)
    sent = list(s.configure_train(1, to_record({"w": np.ones(2, np.float32)}), ConfigRecord(), FakeGrid(2)))
    failed = [Message(Error(code=0, reason="client crashed"), reply_to=m) for m in sent]
    assert s.aggregate_train(1, failed) == (None, None)
    np.testing.assert_array_equal(s.c["w"], [0.0, 0.0])
