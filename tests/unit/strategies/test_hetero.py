"""Strategies with clients of different LoRA ranks: what each node is sent, how replies come back to r_max,
which strategies compose (built from the config, as the server does)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.reply_checks import sent_shapes, shapes_of, split_replies
from fedllm_app.server.run import build_strategy, local_strategy
from strategies import hetero_rank as hr
from strategies.fedavg import ARRAYS_KEY, DATA_SIZE_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, PARTITION_KEY, WEIGHT_KEY
from strategies.fedprox import PROXIMAL_MU_KEY
from strategies.hetero import RANK_KEY, RANK_QUERY
from strategies.records import from_record, to_record
from tests.fakes import FakeGrid

L = "m.q_proj"
RANKS = {1: 1, 2: 2, 3: 4}  # node id -> rank; r_max = 4


class RankGrid(FakeGrid):
    """Nodes answer the rank query with their rank in ``ranks``, the partition query with id - 1."""

    def __init__(self, ranks):
        super().__init__(list(ranks))
        self.ranks, self.queried = ranks, []

    def answer_query(self, query):
        if query.metadata.message_type != RANK_QUERY:
            return super().answer_query(query)
        self.queried.append(query.metadata.dst_node_id)
        return {RANK_KEY: self.ranks[query.metadata.dst_node_id]}


def glob(r=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {L + hr.A_SUFFIX: rng.normal(size=(r, 6)), L + hr.B_SUFFIX: rng.normal(size=(7, r))}
    return {k: v.astype(np.float32) for k, v in arrays.items()}  # as adapters travel


def product(arrays):
    return arrays[L + hr.B_SUFFIX] @ arrays[L + hr.A_SUFFIX]


def build(strategy="fedavg", method="hetlora", extra=""):
    n = len(RANKS)
    overrides = f"strategy={strategy} num_clients={n} lora_aggregation={method} model.lora.r=4 {extra}"
    return build_strategy(load_config({"overrides": overrides}))


def reply_to(msg, arrays, n):
    """A sound reply of node ``msg``'s partition (node id - 1) with ``n`` rows."""
    metrics = {NUM_EXAMPLES_KEY: n, DATA_SIZE_KEY: n, PARTITION_KEY: msg.metadata.dst_node_id - 1, "train_loss": 1.0}
    return Message(RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


def server_weighted(replies):
    """The replies with the server's weight set, as the reply guard does (their data size here)."""
    for m in replies:
        m.content[METRICS_KEY][WEIGHT_KEY] = float(m.content[METRICS_KEY][DATA_SIZE_KEY])
    return replies


def test_each_node_is_sent_only_its_own_ranks_of_the_global_and_asked_its_rank_once():
    s, grid, g = build("fedprox", extra="strategy.mu=0.1"), RankGrid(RANKS), glob()
    msgs = s.configure_train(1, to_record(g), ConfigRecord(), grid)
    for m in msgs:
        rank = RANKS[m.metadata.dst_node_id]
        got = from_record(m.content[ARRAYS_KEY])
        np.testing.assert_array_equal(got[L + hr.A_SUFFIX], g[L + hr.A_SUFFIX][:rank])
        np.testing.assert_array_equal(got[L + hr.B_SUFFIX], g[L + hr.B_SUFFIX][:, :rank])
        assert m.content["config"][PROXIMAL_MU_KEY] == 0.1  # FedProx's own step still applies
    s.configure_train(2, to_record(g), ConfigRecord(), grid)
    assert sorted(grid.queried) == [1, 2, 3]


def test_a_node_with_a_bad_rank_is_left_out_of_every_round_naming_it_and_the_fix_and_the_others_train(caplog):
    """One node's answer must not end everyone's run: above r_max, not an integer, or an error reply."""

    class BadRanks(RankGrid):
        def send_and_receive(self, messages, *, timeout=None):
            node4 = [m for m in messages if m.metadata.message_type == RANK_QUERY and m.metadata.dst_node_id == 4]
            out = super().send_and_receive([m for m in messages if m not in node4], timeout=timeout)
            self.queried += [4] * len(node4)
            return out + [Message(Error(code=0, reason="E_CONFIG: see the node's log"), reply_to=m) for m in node4]

    grid = BadRanks({1: 1, 2: 8, 3: 2.5, 4: 4, 5: 4})
    s = build_strategy(load_config({"overrides": "num_clients=5 lora_aggregation=hetlora model.lora.r=4"}))
    for rnd in (1, 2):
        sent = [m.metadata.dst_node_id for m in s.configure_train(rnd, to_record(glob()), ConfigRecord(), grid)]
        assert sorted(sent) == [1, 5]
    assert sorted(grid.queried) == [1, 2, 3, 4, 5]  # the refused ones are not asked again
    errors = [r.getMessage() for r in caplog.records if r.name == "fedllm" and r.levelname == "ERROR"]
    assert any(e.startswith("node 2 has LoRA rank 8, outside 1..r_max=4") and "raise model.lora.r" in e for e in errors)
    assert any("node 3 answered the LoRA rank query with 2.5, not an integer" in e for e in errors)
    assert any("node 4 could not say its LoRA rank: E_CONFIG" in e for e in errors)


def run_round(s, g, weights):
    msgs = list(s.configure_train(1, to_record(g), ConfigRecord(), RankGrid(RANKS)))
    nodes = [m.metadata.dst_node_id for m in msgs]
    trained = {n: glob(RANKS[n], seed=10 + n) for n in nodes}
    replies = [reply_to(m, trained[m.metadata.dst_node_id], weights[m.metadata.dst_node_id]) for m in msgs]
    kept, rejected = split_replies(replies, shapes_of(to_record(g)), by_node=sent_shapes(msgs))
    assert rejected == []  # each reply matches the shapes of its own rank
    arrays, metrics = s.aggregate_train(1, server_weighted(kept))
    return from_record(arrays), [trained[n] for n in sorted(trained)], metrics


def test_hetlora_returns_the_norm_weighted_padded_average_at_r_max():
    new, clients, metrics = run_round(build(), glob(), {1: 10, 2: 20, 3: 30})
    want = hr.hetlora_aggregate(clients, hr.hetlora_weights(clients, [10, 20, 30]), 4)
    for k in want:
        np.testing.assert_allclose(new[k], want[k], rtol=1e-6)
    assert new[L + hr.A_SUFFIX].shape == (4, 6) and metrics["train_loss"] == pytest.approx(1.0)


def test_flexlora_returns_the_truncated_svd_of_the_example_weighted_mean_product():
    new, clients, _ = run_round(build(method="flexlora"), glob(), {1: 10, 2: 20, 3: 30})
    mean = sum(n * c[L + hr.B_SUFFIX] @ c[L + hr.A_SUFFIX] for c, n in zip(clients, [10, 20, 30], strict=True)) / 60
    u, s, vt = np.linalg.svd(mean)
    np.testing.assert_allclose(new[L + hr.B_SUFFIX] @ new[L + hr.A_SUFFIX], (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)


def test_fedavgm_steps_on_the_hetlora_aggregate():
    g = glob()
    plain, _, _ = run_round(build(), g, {1: 1, 2: 1, 3: 1})
    new, _, _ = run_round(build("fedavgm", extra="strategy.server_lr=0.5 strategy.momentum=0.9"), g, {1: 1, 2: 1, 3: 1})
    for k in g:  # first round, zero-started buffer: m = 0.1 delta, x += 0.5 m
        np.testing.assert_allclose(new[k], g[k] + 0.05 * (plain[k] - g[k]), rtol=1e-5)


def test_local_baseline_keeps_each_clients_adapter_padded_to_r_max():
    s = local_strategy(load_config({"overrides": "num_clients=3 lora_aggregation=hetlora model.lora.r=4"}))
    msgs = list(s.configure_train(1, to_record(glob()), ConfigRecord(), RankGrid(RANKS)))
    replies = []
    for pid, m in enumerate(msgs):
        r = reply_to(m, glob(RANKS[m.metadata.dst_node_id], seed=pid), 5)
        r.content[METRICS_KEY]["partition-id"] = pid
        replies.append(r)
    assert s.aggregate_train(1, server_weighted(replies))[0] is None
    for pid, m in enumerate(msgs):
        kept = from_record(s.client_arrays[pid])
        own = glob(RANKS[m.metadata.dst_node_id], seed=pid)
        assert kept[L + hr.A_SUFFIX].shape == (4, 6)
        np.testing.assert_allclose(product(kept), product(own))


@pytest.mark.parametrize(
    ("strategy", "method", "pattern"),
    [
        ("scaffold", "hetlora", r"strategy=scaffold: Scaffold cannot run with lora_aggregation=hetlora.*homogeneous"),
        ("central", "flexlora", r"strategy=central: Central cannot run with lora_aggregation=flexlora"),
        ("fedadam", "flexlora", r"FedAdam cannot run with lora_aggregation=flexlora.*lora_aggregation=hetlora"),
        ("fedavgm", "flexlora", r"FedAvgM cannot run with lora_aggregation=flexlora"),
    ],
)
def test_meaningless_combinations_fail_at_start_with_the_fix(strategy, method, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build(strategy, method)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "local"])
def test_hetlora_composes_with_every_other_strategy(strategy):
    assert "hetlora up to r_max=4" in build(strategy).describe()


def test_the_config_accepts_exactly_the_methods_and_weightings_the_strategies_implement():
    from fedllm_app import config
    from strategies import hetero

    assert (config.AGGREGATIONS, config.WEIGHTINGS) == (hetero.AGGREGATIONS, hr.WEIGHTINGS)
    assert (config.HETLORA_AVERAGES, config.FLEXLORA_AVERAGES) == (hr.AVERAGES, hr.FLEXLORA_AVERAGES)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ("lora_aggregation=svd", r"lora_aggregation='svd' must be one of homogeneous, hetlora, flexlora"),
        ("hetlora_average=mean", r"hetlora_average='mean' must be one of zero_padded, per_rank"),
        ("flexlora_average=mean", r"flexlora_average='mean' must be one of products, updates"),
        ("model.lora.client_ranks=[4,32]", r"client_ranks=\[4, 32\] holds 32, outside 1..model.lora.r=16.*at least 32"),
        ("model.lora.client_ranks=[4,8]", r"lora_aggregation=homogeneous.*set lora_aggregation=hetlora or flexlora"),
        ("lora_aggregation=hetlora hetlora_weighting=size", r"hetlora_weighting='size' must be one of norm, examples"),
    ],
)
def test_bad_rank_settings_fail_at_start_naming_the_value_and_the_fix(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"overrides": overrides})
