"""Secure aggregation on the server's real round loop, with clients running the real secure handlers
(:mod:`fedllm_app.client.secure`) behind a Flower ClientApp, over an in-process grid that delivers each
message to the node's ClientApp with the node's own persistent Context.

Each client's "training" adds a known per-node delta to the global adapter, so the tests can check what
the server learns against what the clients sent.
"""

import logging

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm_app.client import secure
from fedllm_app.comm.packing import PACK_KEY, unpack_content
from fedllm_app.secure import keys as K
from fedllm_app.secure.secagg import SecAggParams
from fedllm_app.server.rounds import run_rounds
from fedllm_app.server.secure_round import unflatten
from strategies.dp import with_dp
from strategies.fedadagrad import FedAdagrad
from strategies.fedadam import FedAdam
from strategies.fedavg import ARRAYS_KEY, DATA_SIZE_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, WEIGHT_KEY, FedAvgLoRA
from strategies.fedavgm import FedAvgM
from strategies.fedprox import FedProx
from strategies.fedyogi import FedYogi
from strategies.privacy import DPParams
from strategies.records import from_record, to_record
from strategies.scaffold import C_CLIENT_KEY, C_DELTA_KEY, C_SERVER_KEY, Scaffold
from tests.fakes import Writer

START = {"a": np.zeros((4, 3), dtype=np.float32), "b": np.full(5, 0.5, dtype=np.float32)}


def delta_of(pid):
    """Partition ``pid``'s update (and SCAFFOLD control delta): distinct, inside the clip range."""
    rng = np.random.default_rng(100 + pid)
    return {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in START.items()}


def c_delta_of(pid):
    return {k: v / 10 for k, v in delta_of(pid + 50).items()}


def client_app(delta=delta_of, c_delta=c_delta_of, noise_rng=None):
    """The real secure handlers; training replaced by adding ``delta(pid)`` to the global (SCAFFOLD: a control
    delta ``c_delta(pid)``). ``noise_rng(pid)``: the generator of a distributed-noise share (None: the client's own,
    from the OS's entropy).
    """
    app = ClientApp()

    @app.query()
    def partition(msg, context):
        return Message(RecordDict({METRICS_KEY: MetricRecord({"partition-id": context.node_config["partition-id"]})}),
                       reply_to=msg)  # fmt: skip

    @app.query("secagg")
    def stage(msg, context):
        return Message(secure.handle_query(msg, context.state), reply_to=msg)

    @app.train("secagg")
    def train(msg, context):
        pid = context.node_config["partition-id"]
        msg.content = unpack_content(msg.content)  # as the real ClientApp: the arrays travel packed
        msg = secure.training_message(msg, context.state)
        trained = {k: v + delta(pid)[k] for k, v in from_record(msg.content[ARRAYS_KEY]).items()}
        metrics = {NUM_EXAMPLES_KEY: 8, DATA_SIZE_KEY: 8, "train_loss": 1.0 + pid, "partition-id": pid}
        content = RecordDict({ARRAYS_KEY: to_record(trained), METRICS_KEY: MetricRecord(metrics)})
        if C_CLIENT_KEY in msg.content:
            content[C_DELTA_KEY] = to_record(c_delta(pid))
        rng = noise_rng(pid) if noise_rng else None
        return Message(secure.masked_content(msg, content, context.state, rng), reply_to=msg)

    return app


def stage_of(msg):
    if msg.metadata.message_type == K.TRAIN_TYPE:
        return K.MASK
    return str(msg.content[K.RECORD][K.STAGE]) if K.RECORD in msg.content else msg.metadata.message_type


class LoopbackGrid:
    """Nodes 1..n, node k holding partition k - 1, each a ClientApp with its own Context kept across messages.

    ``lost``: (stage, partition) pairs whose reply never reaches the server (the client ran the stage).
    ``received`` keeps every reply the server got, to inspect what it could read.
    """

    def __init__(self, n, app, lost=()):
        self.app, self.lost, self.pending, self.received, self.sent = app, set(lost), {}, [], []
        self.contexts = {k: Context(1, k, {"partition-id": k - 1}, RecordDict(), {}) for k in range(1, n + 1)}

    def get_node_ids(self):
        return list(self.contexts)

    def _answer(self, msg):
        ctx = self.contexts[msg.metadata.dst_node_id]
        try:
            return self.app(msg, ctx)
        except Exception as err:  # noqa: BLE001 - as Flower: a failed ClientApp is an error reply
            return Message(Error(code=0, reason=str(err)), reply_to=msg)

    def send_and_receive(self, messages, *, timeout=None):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
        return [self._answer(m) for m in messages]

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.pending[m.object_id] = m
            self.sent.append(m)
        return [m.object_id for m in messages]

    def pull_messages(self, ids):
        out = []
        for i in ids:
            msg = self.pending.pop(i, None)
            if msg is None:
                continue
            reply = self._answer(msg)
            if (stage_of(msg), self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]) not in self.lost:
                out.append(reply)
        self.received.extend(out)
        return out


def kw(n):
    return {"num_clients": n, "sample_clients": n, "num_rounds": 1, "lr_max": 1e-2, "lr_min": 1e-3}


def secure_rounds(grid, strategy, params=None, min_replies=1, timeout=0.3):
    writer = Writer()
    arrays, _ = run_rounds(grid, strategy, to_record(START), 1, timeout, writer, "secagg", poll_interval=0.001,
                           min_replies=min_replies, secagg=params or SecAggParams())  # fmt: skip
    return from_record(arrays), writer.rows[0]


def mean_of(pids):
    return {k: START[k] + np.mean([delta_of(p)[k] for p in pids], axis=0) for k in START}


def assert_close(got, want, atol=1e-6):
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=atol)


def test_a_curious_server_sees_only_masked_values_and_still_gets_the_mean():
    grid = LoopbackGrid(4, client_app())
    got, row = secure_rounds(grid, FedAvgLoRA(**kw(4)))
    assert_close(got, mean_of(range(4)))
    assert row["aggregated"] and row["secagg_survivors"] == 4 and row["replied"] == 4 and row["sampled"] == 4
    # every stage's bytes are counted, each node under the partition its masked reply named
    assert sorted(e["partition"] for e in row["bytes_by_node"].values()) == [0, 1, 2, 3]
    assert row["bytes_received"] > 4 * 4 * 17  # at least the four masked vectors of 17 uint32
    masked = [r for r in grid.received if K.MASKED_RECORD in r.content]
    assert len(masked) == 4
    for reply in grid.received:  # no reply carries an adapter, a delta or a control delta in the clear
        assert ARRAYS_KEY not in reply.content and C_DELTA_KEY not in reply.content
    for reply in masked:  # each masked vector is spread over the whole field, unlike its small update
        vector = reply.content[K.MASKED_RECORD][K.MASKED].numpy().astype(np.float64)
        assert vector.dtype == np.float64 and vector.max() > 2**31 and vector.std() > 2**29
        pid = reply.content[METRICS_KEY]["partition-id"]
        update = np.concatenate([v.ravel() for v in delta_of(pid).values()])
        assert abs(np.corrcoef(update, vector)[0, 1]) < 0.9  # 17 values: no visible relation (see the unit test)


def test_the_mask_stages_train_message_travels_packed_as_a_plain_rounds_does():
    seen = []  # what each train message carries as it leaves the server (the client unpacks it in place)

    class Watching(LoopbackGrid):
        def push_messages(self, messages):
            for m in messages:
                if m.metadata.message_type == K.TRAIN_TYPE:
                    seen.append((set(m.content.keys()), {k: len(v) for k, v in m.content.array_records.items()}))
            return super().push_messages(messages)

    got, _ = secure_rounds(Watching(3, client_app()), Scaffold(**kw(3), server_lr=1.0))
    assert len(seen) == 3
    for keys, lengths in seen:  # the adapter and c-server each one array, indexed; the stage's records kept
        assert {PACK_KEY, K.RECORD, K.SHARES_RECORD} <= keys
        assert lengths == {ARRAYS_KEY: 1, C_SERVER_KEY: 1}
    assert_close(got, mean_of(range(3)))


@pytest.mark.parametrize(("n", "lost"), [(4, {2}), (10, {1, 5, 8})])
def test_clients_lost_after_masking_leave_the_mean_of_the_survivors(n, lost, caplog):
    grid = LoopbackGrid(n, client_app(), lost={("mask", p) for p in lost})
    with caplog.at_level(logging.WARNING):
        got, row = secure_rounds(grid, FedAvgLoRA(**kw(n)))
    assert_close(got, mean_of([p for p in range(n) if p not in lost]))
    assert row["secagg_survivors"] == n - len(lost) and row["secagg_dropped"] == len(lost)
    assert row["failed"] == len(lost)


def test_fewer_survivors_than_the_threshold_fail_the_round_loudly_and_reveal_nothing(caplog):
    grid = LoopbackGrid(4, client_app(), lost={("mask", 0), ("mask", 3)})  # threshold ceil(2/3 * 4) = 3
    with caplog.at_level(logging.ERROR):
        got, row = secure_rounds(grid, FedAvgLoRA(**kw(4)))
    assert_close(got, START, atol=0)
    assert row["aggregated"] is False
    assert "2 of 4 clients returned a masked update, fewer than the threshold of 3" in row["secagg_error"]
    assert "the global adapter is unchanged" in caplog.text
    assert not [m for m in grid.sent if stage_of(m) == K.UNMASK]  # no share was ever asked for


def test_a_masked_reply_of_the_wrong_shape_counts_as_a_dropout_and_the_others_are_unmasked(caplog):
    inner = client_app()
    app = ClientApp()

    @app.query()
    def partition(msg, context):
        return inner(msg, context)

    @app.query("secagg")
    def stage(msg, context):
        return inner(msg, context)

    @app.train("secagg")
    def train(msg, context):
        reply = inner(msg, context)
        if context.node_config["partition-id"] == 1:  # a client that replies a truncated vector
            record = reply.content[K.MASKED_RECORD]
            record[K.MASKED] = Array(record[K.MASKED].numpy()[:5])
        return reply

    with caplog.at_level(logging.WARNING):
        got, row = secure_rounds(LoopbackGrid(4, app), FedAvgLoRA(**kw(4)))
    assert_close(got, mean_of([0, 2, 3]))
    assert row["secagg_dropped"] == 1 and "it counts as dropped" in caplog.text


def plain_reply(sent, strategy, scaffold=False):
    """The reply a client without secure aggregation would send: its adapter (and control delta) in clear."""
    sent.metadata.__dict__["_message_id"] = sent.object_id
    pid = strategy.partition_of[sent.metadata.dst_node_id]
    new = {k: START[k] + delta_of(pid)[k] for k in START}
    metrics = {WEIGHT_KEY: 1.0, NUM_EXAMPLES_KEY: 8, "train_loss": 1.0 + pid, "partition-id": pid}
    content = RecordDict({ARRAYS_KEY: to_record(new), METRICS_KEY: MetricRecord(metrics)})
    if scaffold:
        content[C_DELTA_KEY] = to_record(c_delta_of(pid))
    return Message(content, reply_to=sent)


FEDOPT = {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
STRATEGIES = [
    (FedAvgLoRA, {}),
    (FedProx, {"mu": 0.01}),
    (FedAvgM, {"server_lr": 1.0, "momentum": 0.9}),
    (FedAdagrad, {"eta": 1e-2, "tau": 1e-3}),
    (FedAdam, FEDOPT),
    (FedYogi, FEDOPT),
    (Scaffold, {"server_lr": 1.0}),
]


@pytest.mark.parametrize(("cls", "hp"), STRATEGIES, ids=[c.__name__ for c, _ in STRATEGIES])
def test_every_strategy_steps_on_the_secure_mean_as_on_the_plain_equal_weight_mean(cls, hp):
    n = 4
    secure_strategy = cls(**hp, **kw(n) | {"sample_clients": 3})
    grid = LoopbackGrid(n, client_app())
    got, row = secure_rounds(grid, secure_strategy)
    plain = cls(**hp, **kw(n) | {"sample_clients": 3})
    msgs = plain.configure_train(1, to_record(START), ConfigRecord(), LoopbackGrid(n, client_app()))
    want, _ = plain.aggregate_train(1, [plain_reply(m, plain, cls is Scaffold) for m in msgs])
    assert_close(got, from_record(want), atol=1e-5)
    if cls is Scaffold:
        assert_close(secure_strategy.c, plain.c, atol=1e-6)  # c moved by (|S|/N) mean(delta c_i)
        assert secure_strategy.c_i == {}  # each c_i stays with its client
        held = [ctx.state.get(secure.C_STATE_KEY) for ctx in grid.contexts.values()]
        assert sum(h is not None for h in held) == 3


@pytest.mark.parametrize(
    ("cls", "hp"), [STRATEGIES[0], STRATEGIES[4], STRATEGIES[6]], ids=["FedAvg", "FedAdam", "Scaffold"]
)
def test_dp_noise_is_added_to_the_unmasked_sum_as_to_the_plain_dp_mean(cls, hp):
    """DP and secure aggregation at once: the server noises the fixed-weight mean of the unmasked sum, then
    steps, exactly as plain DP-FedAvg does on the same (already clipped) updates with the same noise draw."""
    dp = DPParams(clip_norm=1.0, noise_multiplier=0.5, sample_rate=1.0, num_clients=4)
    secure_strategy = with_dp(cls)(dp=dp, rng=np.random.default_rng(7), **hp, **kw(4))
    got, row = secure_rounds(LoopbackGrid(4, client_app()), secure_strategy)
    plain = with_dp(cls)(dp=dp, rng=np.random.default_rng(7), **hp, **kw(4))
    msgs = plain.configure_train(1, to_record(START), ConfigRecord(), LoopbackGrid(4, client_app()))
    want, _ = plain.aggregate_train(1, [plain_reply(m, plain, cls is Scaffold) for m in msgs])
    assert row["secagg_survivors"] == 4 and row["dp_noise_std"] == pytest.approx(0.5 / 4)
    assert_close(got, from_record(want), atol=1e-5)
    assert not np.allclose(got["a"], mean_of(range(4))["a"], atol=1e-3)  # the noise is there
    if cls is Scaffold:
        assert_close(secure_strategy.c, plain.c, atol=1e-5)
        assert secure_strategy.c_i == {}  # each c_i stays with its client


# --- real clients: the fedllm ClientApp trains the tiny model; the server runs its real round loop ---------


def tiny_run(strategy_name, secagg, n=3):
    """One round of ``n`` real clients through the fedllm ClientApp; the new global adapter and the round row."""
    from fedllm_app.client_app import app
    from fedllm_app.config import load_config
    from fedllm_app.model import get_adapter, get_model
    from fedllm_app.server.guard import GuardParams, ReplyGuard
    from fedllm_app.server.run import build_strategy
    from fedllm_app.server.secure_round import secagg_params

    over = (f"strategy={strategy_name} num_clients={n} num_rounds=1 training.max_steps=2 training.batch_size=2 "
            f"training.max_length=128 privacy.secagg={str(secagg).lower()} robust.weights=uniform")  # fmt: skip
    cfg = load_config({"overrides": over})
    grid = LoopbackGrid(n, app)
    for k, ctx in grid.contexts.items():
        grid.contexts[k] = Context(1, k, {"partition-id": k - 1, "num-partitions": n}, ctx.state, {"overrides": over})
    start = get_adapter(get_model(cfg.model, cfg.seed)[0])
    writer = Writer()
    arrays, _ = run_rounds(grid, build_strategy(cfg), to_record(start), 1, 600.0, writer, strategy_name,
                           poll_interval=0.001, guard=ReplyGuard(GuardParams(weights="uniform")),
                           secagg=secagg_params(cfg))  # fmt: skip
    return start, from_record(arrays), writer.rows[0], grid


@pytest.mark.slow
@pytest.mark.parametrize("strategy_name", ["fedavg", "fedadam"])
def test_real_clients_train_under_secure_aggregation_and_the_server_steps_on_their_mean(strategy_name, monkeypatch):
    sent = []  # a spy on the clients' side: the update each client masked (the server never sees it)
    vector = secure.update_vector
    monkeypatch.setattr(secure, "update_vector", lambda msg, content: sent.append(vector(msg, content)) or sent[-1])
    start, end, row, grid = tiny_run(strategy_name, secagg=True)
    assert row["aggregated"] and row["secagg_survivors"] == 3 and row["train_loss"] > 0
    assert all(ARRAYS_KEY not in r.content for r in grid.received)  # no adapter travelled back in clear
    assert max(np.abs(end[k] - start[k]).max() for k in start if "lora_B" in k) > 0, "LoRA B did not move"
    mean = {k: start[k] + v for k, v in unflatten(np.mean(sent, axis=0), start).items()}
    if strategy_name == "fedavg":
        assert_close(end, mean, atol=1e-6)  # the global adapter is the clients' mean, up to quantisation
    else:  # FedAdam's first step from zero moments: eta * sign-like(delta), the direction of the mean update
        for k in start:
            d = mean[k] - start[k]
            big = np.abs(d) > 1e-4
            assert np.all(np.sign(end[k] - start[k])[big] == np.sign(d)[big])


def rewriting_app(stage, pid, rewrite):
    """The real secure client, except that partition ``pid`` passes its ``stage`` reply through ``rewrite``."""
    inner = client_app()
    app = ClientApp()

    def relay(msg, context):
        reply = inner(msg, context)
        if stage_of(msg) == stage and context.node_config["partition-id"] == pid and not reply.has_error():
            rewrite(reply.content)
        return reply

    app.query()(relay)
    app.query("secagg")(relay)
    app.train("secagg")(relay)
    return app


def _set(record, key, value):
    def rewrite(content):
        content[record][key] = value

    return rewrite


def _replace(record, value):
    def rewrite(content):
        content[record] = value

    return rewrite


def _uneven(keys, values):
    def rewrite(content):
        conf = content[K.RECORD]
        conf[keys] = [*list(conf[keys]), 3]
        conf[values] = list(conf[values])[:1]

    return rewrite


def _each_share(share):
    def rewrite(content):
        conf = content[K.RECORD]
        conf[K.SHARES] = [share] * len(conf[K.SRC])

    return rewrite


def raw_array(stype, data):
    return Array(dtype="uint32", shape=(17,), stype=stype, data=data)


ALL, NOT_1 = [0, 1, 2, 3], [0, 2, 3]
HOSTILE = {  # id: (stage, rewrite of partition 1's reply, whose mean the round ends with; None: the round fails)
    "keys-str-key": (K.KEYS, _set(K.RECORD, K.C_PK, "not bytes"), NOT_1),
    "keys-short-key": (K.KEYS, _set(K.RECORD, K.S_PK, b"\x01" * 31), NOT_1),
    "keys-zero-key": (K.KEYS, _set(K.RECORD, K.S_PK, b"\x00" * 32), NOT_1),
    "keys-int-key": (K.KEYS, _set(K.RECORD, K.C_PK, 7), NOT_1),
    "share-uneven-lists": (K.SHARE, _uneven(K.DST, K.CIPHERTEXTS), NOT_1),
    "share-str-dst": (K.SHARE, _set(K.RECORD, K.DST, ["a", "b", "c", "d"]), NOT_1),
    "share-foreign-dst": (K.SHARE, _set(K.RECORD, K.DST, [0, 1, 2, 99]), NOT_1),
    "mask-inf-num-examples": (K.MASK, _set(METRICS_KEY, NUM_EXAMPLES_KEY, float("inf")), NOT_1),
    "mask-list-metric": (K.MASK, _set(METRICS_KEY, "train_loss", [1.0, 2.0]), NOT_1),
    "mask-config-for-array": (K.MASK, _replace(K.MASKED_RECORD, ConfigRecord({K.MASKED: "x"})), NOT_1),
    "mask-garbage-array": (K.MASK, _set(K.MASKED_RECORD, K.MASKED, raw_array("numpy.ndarray", b"x" * 9)), NOT_1),
    "mask-foreign-stype": (K.MASK, _set(K.MASKED_RECORD, K.MASKED, raw_array("torch", b"x" * 68)), NOT_1),
    "unmask-uneven-lists": (K.UNMASK, _uneven(K.SRC, K.SHARES), ALL),
    "unmask-str-src": (K.UNMASK, _set(K.RECORD, K.SRC, ["a", "b", "c", "d"]), ALL),
    "unmask-empty-shares": (K.UNMASK, _each_share(b""), None),
    "unmask-garbage-shares": (K.UNMASK, _each_share(b"\xff" * 40), None),
}


@pytest.mark.parametrize(("stage", "rewrite", "survivors"), HOSTILE.values(), ids=HOSTILE.keys())
def test_a_malformed_secure_reply_is_a_dropout_or_fails_the_round_loudly_never_the_run(
    stage, rewrite, survivors, caplog
):
    with caplog.at_level(logging.WARNING):
        got, row = secure_rounds(LoopbackGrid(4, rewriting_app(stage, 1, rewrite)), FedAvgLoRA(**kw(4)))
    if survivors is None:
        assert row["aggregated"] is False and "unmasking failed" in row["secagg_error"]
        assert_close(got, START, atol=0)
    else:
        assert row["aggregated"] and row["secagg_survivors"] == len(survivors), row.get("secagg_error")
        assert_close(got, mean_of(survivors))
        assert "it counts as dropped" in caplog.text
