"""The round loop with comm.codec and comm.budget_mb over a grid whose nodes decode and encode as fedllm's
client does (:mod:`fedllm_app.comm.wire`): every strategy aggregates decoded replies, the bytes counted are the
encoded ones, a reply that does not decode is rejected, and the budget stops the run before a round."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedllm_app.comm.budget import MB
from fedllm_app.comm.codecs import CommParams
from fedllm_app.comm.downlink import BASE
from fedllm_app.comm.packing import pack_content, unpack_content
from fedllm_app.comm.wire import COMM_KEY, decode_message, encode_reply
from fedllm_app.config import load_config
from fedllm_app.server.outputs import format_round
from fedllm_app.server.rounds import LARGEST_REPLY_KEY, TOTAL_KEYS, run_rounds
from fedllm_app.server.run import build_strategy, topk_warning
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, DATA_SIZE_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from strategies.hetero import RANK_KEY, RANK_QUERY
from strategies.local import PARTITION_KEY
from strategies.records import from_record, to_record
from strategies.scaffold import C_DELTA_KEY, C_SERVER_KEY
from tests.fakes import Writer

ALGORITHMS = ["fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "local", "central"]
START = {"a": np.linspace(-1, 1, 8192, dtype=np.float32).reshape(64, 128), "b": np.zeros((32, 128), np.float32)}


class CodecGrid:
    """Nodes 1..n as fedllm's client: decode the message, "train" (add 0.01 * node), encode the reply."""

    def __init__(self, n, comm, tamper=None, lose=()):
        self.n, self.comm, self.tamper, self.sent, self.states = n, comm, tamper, {}, {}
        self.lose = set(lose)  # (node, round): the node decodes and trains, but its reply never arrives
        self.seen = []  # the encoded messages and replies as they travel
        self.down_to = []  # (node, encoded message content)

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def send_and_receive(self, messages, *, timeout=None):
        """Node k holds partition k - 1 and, asked for its LoRA rank, answers 2 * k."""
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            answer = {RANK_KEY: 2 * node} if m.metadata.message_type == RANK_QUERY else {PARTITION_KEY: node - 1}
            out.append(Message(RecordDict({METRICS_KEY: MetricRecord(answer)}), reply_to=m))
        return out

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.sent[m.object_id] = m
            self.seen.append(("down", unpack_content(m.content)))  # what the codec made (it travels packed)
            self.down_to.append((m.metadata.dst_node_id, m.content))
        return [m.object_id for m in messages]

    def pull_messages(self, ids):
        out = []
        for i in ids:
            msg = self.sent.pop(i, None)
            if msg is not None:
                reply = Message(self.client(msg), reply_to=msg)
                if (msg.metadata.dst_node_id, int(msg.content[CONFIG_KEY]["server-round"])) in self.lose:
                    continue
                out.append(reply)
                self.seen.append(("up", unpack_content(out[-1].content)))
        return out

    def client(self, msg):
        node = msg.metadata.dst_node_id
        state = self.states.setdefault(node, {})  # each node's own state, as Flower keeps it
        decode_message(msg, state)
        trained = {k: v + 0.01 * node for k, v in from_record(msg.content[ARRAYS_KEY]).items()}
        metrics = {NUM_EXAMPLES_KEY: 10, DATA_SIZE_KEY: 10, "train_loss": 1.0, PARTITION_KEY: node - 1}
        content = RecordDict({ARRAYS_KEY: to_record(trained), METRICS_KEY: MetricRecord(metrics)})
        if C_SERVER_KEY in msg.content:
            content[C_DELTA_KEY] = to_record({k: np.full_like(v, 0.5) for k, v in trained.items()})
        content = encode_reply(content, from_record(msg.content[ARRAYS_KEY]), self.comm, state, node - 1)
        rnd = int(msg.content[CONFIG_KEY]["server-round"])
        # a tampering node garbles what the codec made, then packs it as fedllm's client would
        return pack_content(self.tamper(node, rnd, unpack_content(content))) if self.tamper else content


def run(name, comm, rounds=2, tamper=None, extra="", start=START, lose=(), **kwargs):
    overrides = f"strategy={name} num_clients=2 sample_clients=2 {extra}"
    strategy = build_strategy(load_config({"overrides": overrides}))
    grid, writer = CodecGrid(2, comm, tamper, lose), Writer()
    arrays, _ = run_rounds(
        grid, strategy, to_record(start), rounds, 1.0, writer, name, poll_interval=0.01, comm=comm, **kwargs
    )
    return from_record(arrays), writer.rows, grid


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_strategy_aggregates_int8_replies_like_plain_ones(name):
    plain, plain_rows, _ = run(name, CommParams())
    got, rows, grid = run(name, CommParams(codec="int8"))
    for k in START:  # int8 of the deltas (0.01-0.02) and of the global: close to the exact run
        np.testing.assert_allclose(got[k], plain[k], atol=0.02)
        assert got[k].dtype == np.float32
    assert all(r["rejected"] == [] and r["replied"] == r["sampled"] for r in rows)
    ups = [c for way, c in grid.seen if way == "up"]
    assert ups and all(c[COMM_KEY]["codec"] == "int8" for c in ups)
    assert all(a.dtype == "uint8" for c in ups for k, a in c[ARRAYS_KEY].items() if k.endswith("#codes"))
    for r, p in zip(rows, plain_rows, strict=True):  # the encoded bytes are what is counted: about 1/4
        assert r["bytes_received"] < 0.45 * p["bytes_received"]
        assert r["bytes_sent"] < 0.45 * p["bytes_sent"] and r["codec_seconds"] > 0


@pytest.mark.parametrize("method", ["hetlora", "flexlora"])
def test_clients_of_lower_rank_get_and_send_their_slice_encoded(method):
    rng = np.random.default_rng(0)
    start = {"m.lora_A.weight": rng.standard_normal((4, 4096)), "m.lora_B.weight": rng.standard_normal((2048, 4))}
    start = {k: v.astype(np.float32) for k, v in start.items()}
    extra = f"lora_aggregation={method} model.lora.r=4"
    plain, _, _ = run("fedavg", CommParams(), extra=extra, start=start)
    got, rows, _ = run("fedavg", CommParams(codec="int8"), extra=extra, start=start)
    for r in rows:
        assert r["rejected"] == [] and r["replied"] == 2
        by_node = r["bytes_by_node"]  # node 1 holds rank 2 of r_max 4: half the bytes of node 2, both ways
        assert by_node["1"]["received"] / by_node["2"]["received"] == pytest.approx(0.5, abs=0.05)
    for k in start:
        np.testing.assert_allclose(got[k], plain[k], atol=0.1)


def test_topk_with_error_feedback_sends_a_fraction_up_and_fp16_down():
    got, rows, grid = run("fedavg", CommParams(codec="topk", topk_fraction=0.25), rounds=3)
    downs = [c for way, c in grid.seen if way == "down"]
    assert all(c[COMM_KEY]["codec"] == "fp16" for c in downs)
    ups = [c for way, c in grid.seen if way == "up"]
    assert all(c[ARRAYS_KEY]["a#indices"].numpy().size == 2048 for c in ups)
    assert all(r["rejected"] == [] for r in rows)
    # Every value of the update is the same here, so feedback spreads the sends: after 3 rounds of 25%,
    # each value moved by up to 3/4 of the true mean update.
    moved = got["a"] - START["a"]
    assert moved.max() <= 3 * 0.015 + 1e-3 and moved.mean() > 0


def _garble(content):
    content[ARRAYS_KEY] = ArrayRecord({"a#codes": Array(np.zeros(3, np.uint8))})
    return content


def _plain(content):
    content.pop(COMM_KEY)
    return content


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (_garble, "declares arrays or shapes other than those sent"),
        (_plain, "the reply is not encoded, the run's comm.codec is 'int8'"),
        (lambda c: c.__setitem__(COMM_KEY, type(c[COMM_KEY])({**c[COMM_KEY], "codec": "nf4"})) or c, "'nf4'"),
    ],
)
def test_a_reply_that_does_not_decode_is_rejected_and_the_round_goes_on(bad, words, caplog):
    tamper = lambda node, rnd, c: bad(c) if node == 2 else c  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        got, rows, _ = run("fedavg", CommParams(codec="int8"), rounds=1, tamper=tamper)
    [rejection] = rows[0]["rejected"]
    assert rejection["node"] == 2 and "does not decode as comm.codec=int8" in rejection["reason"]
    assert words in rejection["reason"]
    assert rows[0]["aggregated"] and "rejected the update of node 2" in caplog.text
    np.testing.assert_allclose(got["b"], 0.01, atol=1e-3)  # node 1's update alone


def test_the_budget_stops_the_run_before_the_round_that_would_exceed_it(caplog):
    _, full, _ = run("fedavg", CommParams(codec="int8"), rounds=3)
    per_round = full[0]["bytes_sent"] + full[0]["bytes_received"]
    budget_mb = 2.5 * per_round / MB
    stops = []
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        _, rows, _ = run(
            "fedavg", CommParams(codec="int8", budget_mb=budget_mb), rounds=3,
            on_budget_stop=lambda rnd, arrays: stops.append((rnd, sorted(arrays.keys()))),
        )  # fmt: skip
    assert [r["round"] for r in rows] == [1, 2] and stops == [(2, ["a", "b"])]
    assert "communication budget: round 3 would need about" in caplog.text
    assert "the run stops before it, its last checkpoint is round 2" in caplog.text
    assert rows[-1]["comm_mb_used"] == pytest.approx(2 * per_round / MB) and rows[-1]["comm_budget_mb"] == budget_mb
    assert f"| comm {2 * per_round / MB:.2f}/{budget_mb:g} MB" in format_round({**rows[-1], "seconds": 1.0})


def test_before_any_reply_the_budget_counts_a_reply_as_large_as_its_message():
    _, full, _ = run("fedavg", CommParams(codec="int8"), rounds=1)
    below_one_round = 0.9 * full[0]["bytes_sent"] * 2 / 1e6
    stops = []
    _, rows, _ = run("fedavg", CommParams(codec="int8", budget_mb=below_one_round), rounds=2,
                     on_budget_stop=lambda rnd, arrays: stops.append(rnd))  # fmt: skip
    assert rows == [] and stops == [0]


def _downs(grid, node):
    """The codec metadata of the messages sent to ``node``, round by round."""
    return [c[COMM_KEY] for to, c in grid.down_to if to == node]


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "fedadam"])
def test_the_delta_downlink_sends_changes_after_the_first_round_and_aggregates_like_the_full_one(name):
    full, _, _ = run(name, CommParams(codec="int8"), rounds=3)
    got, rows, grid = run(name, CommParams(codec="int8", downlink_delta=True), rounds=3)
    assert all(r["rejected"] == [] and r["replied"] == 2 and r["aggregated"] for r in rows)
    for node in (1, 2):
        bases = [BASE + ARRAYS_KEY in meta for meta in _downs(grid, node)]
        assert bases == [False, True, True]
    for k in START:  # the copies are closer to the global than int8 of the global itself
        np.testing.assert_allclose(got[k], full[k], atol=0.02)


def test_under_the_delta_downlink_topk_shrinks_the_downlink_after_the_first_round():
    _, rows, grid = run("fedavg", CommParams(codec="topk", topk_fraction=0.01, downlink_delta=True), rounds=3)
    assert all(r["rejected"] == [] and r["replied"] == 2 for r in rows)
    assert rows[1]["bytes_sent"] < 0.15 * rows[0]["bytes_sent"]  # 1% of the change (8 B a value) vs the fp16 global
    assert [meta.get("codec:" + ARRAYS_KEY) for meta in _downs(grid, 1)] == [None, "topk", "topk"]


def test_a_node_whose_reply_was_lost_gets_the_full_global_next_and_the_run_goes_on():
    comm = CommParams(codec="int8", downlink_delta=True)
    _, rows, grid = run("fedavg", comm, rounds=3, lose={(2, 2)})
    assert rows[1]["failed_nodes"] == [2] and rows[2]["failed_nodes"] == []
    assert [BASE + ARRAYS_KEY in meta for meta in _downs(grid, 1)] == [False, True, True]
    assert [BASE + ARRAYS_KEY in meta for meta in _downs(grid, 2)] == [False, True, False]
    assert rows[2]["rejected"] == [] and rows[2]["replied"] == 2


def _pad(node, rnd, content):
    """Node 2's first reply carries 400 kB more than its arrays (a reply larger than any guess)."""
    if node == 2 and rnd == 1:
        content["pad"] = ConfigRecord({"pad": "x" * 400_000})
    return content


def test_a_resumed_run_estimates_replies_from_the_largest_one_saved_with_the_totals():
    totals = dict.fromkeys(TOTAL_KEYS, 0)
    _, first, _ = run("fedavg", CommParams(codec="int8"), rounds=1, tamper=_pad, totals=totals)
    assert totals[LARGEST_REPLY_KEY] > 400_000  # kept with the totals, which the server saves each round
    used = totals["bytes_sent_total"] + totals["bytes_received_total"]
    budget_mb = (used + 5 * first[0]["bytes_sent"]) / MB  # room for a round of ordinary replies, not of padded ones
    resume = {"rounds": 2, "start_round": 2}
    stops = []
    _, rows, _ = run("fedavg", CommParams(codec="int8", budget_mb=budget_mb), totals=dict(totals),
                     on_budget_stop=lambda rnd, arrays: stops.append(rnd), **resume)  # fmt: skip
    assert rows == [] and stops == [1]
    forgotten = {k: totals[k] for k in TOTAL_KEYS}  # what a resume restored before: round 2 would have run
    _, rows, _ = run("fedavg", CommParams(codec="int8", budget_mb=budget_mb), totals=forgotten, **resume)
    assert [r["round"] for r in rows] == [2]


def _warning(overrides: str) -> str | None:
    cfg = load_config({}, overrides.split())
    return topk_warning(build_strategy(cfg), CommParams.from_config(cfg.comm), cfg.strategy.name)


@pytest.mark.parametrize(
    "overrides",
    [
        "strategy=fedadam comm.codec=topk",
        "strategy=fedadam comm.codec=topk comm.downlink_delta=true",
        "strategy=fedyogi comm.codec=topk comm.downlink=nf4 comm.downlink_delta=true",
        "strategy=fedadagrad comm.codec=topk privacy.dp=true baseline=none",
    ],
)
def test_an_adaptive_server_step_with_top_k_updates_is_warned_with_the_measured_cost_and_the_fix(overrides):
    name = overrides.split()[0].split("=")[1]
    warning = _warning(overrides)
    assert warning is not None and warning.startswith(f"strategy={name} with comm.codec=topk: an adaptive")
    assert "prefer nf4 or int8 with this strategy" in warning


@pytest.mark.parametrize(
    "overrides",
    [
        "strategy=fedavg comm.codec=topk comm.downlink_delta=true",
        "strategy=scaffold comm.codec=topk",
        "strategy=fedavgm comm.codec=topk",
        "strategy=fedadam comm.codec=nf4 comm.downlink_delta=true",
        "strategy=fedadam",
    ],
)
def test_top_k_with_a_mean_or_momentum_step_and_other_codecs_with_fedadam_are_not_warned(overrides):
    assert _warning(overrides) is None
