"""Strategies with clients of different LoRA ranks: what each node is sent, how replies come back to r_max,
which strategies compose (built from the config, as the server does)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.reply_checks import sent_shapes, shapes_of, split_replies
from fedllm_app.server.run import build_strategy, local_strategy
from strategies import hetero_rank as hr
from strategies.central import Central
from strategies.fedavg import ARRAYS_KEY, DATA_SIZE_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, PARTITION_KEY, WEIGHT_KEY
from strategies.fedavgm import FedAvgM
from strategies.fedprox import PROXIMAL_MU_KEY
from strategies.hetero import RANK_KEY, RANK_QUERY, HeteroRank, HeteroRankParams, with_lora_ranks
from strategies.records import from_record, to_record
from strategies.scaffold import Scaffold
from tests.fakes import FakeGrid, logged

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


class OddRankGrid(RankGrid):
    """RankGrid whose nodes in ``odd`` answer the rank query with ``odd[node](query)`` (a reply, or None: silent);
    ``rank_queries`` keeps each rank query with the timeout it was sent with."""

    def __init__(self, ranks, odd=None):
        super().__init__(ranks)
        self.odd, self.rank_queries = odd or {}, []

    def send_and_receive(self, messages, *, timeout=None):
        asked = [m for m in messages if m.metadata.message_type == RANK_QUERY]
        self.rank_queries += [(m, timeout) for m in asked]
        odd = {id(m) for m in asked if m.metadata.dst_node_id in self.odd}
        out = super().send_and_receive([m for m in messages if id(m) not in odd], timeout=timeout)
        answers = [self.odd[m.metadata.dst_node_id](m) for m in messages if id(m) in odd]
        return out + [a for a in answers if a is not None]


def silent(query):
    return None


def error_reply(query):
    return Message(Error(code=0, reason="E_CONFIG: see the node's log"), reply_to=query)


def const(rank, value):
    """An adapter of test_hetero's layer shapes at ``rank``, every entry ``value`` (float32, as adapters travel)."""
    return {
        L + hr.A_SUFFIX: np.full((rank, 6), value, np.float32),
        L + hr.B_SUFFIX: np.full((7, rank), value, np.float32),
    }


def echo_round(s, g, weights, server_round=1):
    """One round in which every node sends back exactly the slice it was sent; the new global."""
    msgs = list(s.configure_train(server_round, to_record(g), ConfigRecord(), RankGrid(RANKS)))
    replies = [reply_to(m, from_record(m.content[ARRAYS_KEY]), weights[m.metadata.dst_node_id]) for m in msgs]
    arrays, _ = s.aggregate_train(server_round, server_weighted(replies))
    return from_record(arrays)


def test_the_rank_query_sends_each_new_node_only_r_max_and_waits_round_timeout_for_the_answers():
    s, grid = build(extra="round_timeout=42"), OddRankGrid(RANKS)
    s.configure_train(1, to_record(glob()), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m, _ in grid.rank_queries) == [1, 2, 3]
    for query, timeout in grid.rank_queries:
        assert {name: dict(record) for name, record in query.content.items()} == {"config": {"r-max": 4}}
        assert timeout == 42


def test_nodes_that_do_not_say_their_rank_in_time_sit_the_round_out_under_one_warning_and_are_asked_again(caplog):
    s = build_strategy(
        load_config({"overrides": "num_clients=4 lora_aggregation=hetlora model.lora.r=4 round_timeout=42"})
    )
    grid = OddRankGrid({1: 1, 2: 2, 3: 4, 4: 4}, {2: error_reply, 3: silent, 4: silent})
    assert [m.metadata.dst_node_id for m in s.configure_train(1, to_record(glob()), ConfigRecord(), grid)] == [1]
    assert logged(caplog, level="WARNING") == ["nodes [3, 4] did not say their LoRA rank within 42 s"]  # not node 2
    grid.odd = {}
    assert [m.metadata.dst_node_id for m in s.configure_train(2, to_record(glob()), ConfigRecord(), grid)] == [1, 3, 4]
    assert sorted(m.metadata.dst_node_id for m, _ in grid.rank_queries) == [1, 2, 3, 3, 4, 4]


def test_an_error_reply_to_the_rank_query_is_logged_with_its_reason_and_the_node_left_out(caplog):
    s, grid = build(), OddRankGrid(RANKS, {2: error_reply})
    assert [m.metadata.dst_node_id for m in s.configure_train(1, to_record(glob()), ConfigRecord(), grid)] == [1, 3]
    assert logged(caplog, level="ERROR") == [
        "node 2 could not say its LoRA rank: E_CONFIG: see the node's log; node 2 is not sampled in this run"
    ]


def test_a_rank_answer_without_metrics_is_refused_as_no_integer_naming_the_node_not_a_crash(caplog):
    s, grid = build(), OddRankGrid(RANKS, {3: lambda query: Message(RecordDict({}), reply_to=query)})
    assert [m.metadata.dst_node_id for m in s.configure_train(1, to_record(glob()), ConfigRecord(), grid)] == [1, 2]
    assert logged(caplog, level="ERROR") == [
        "node 3 answered the LoRA rank query with None, not an integer; give it a whole number as its lora-rank "
        "node config; node 3 is not sampled in this run"
    ]


@pytest.mark.parametrize(
    ("average", "want"),
    [("products", lambda w, w1, w2: (10 * w1 + 20 * w2 + 30 * w) / 60), ("updates", lambda w, w1, w2: w)],
    ids=["products", "updates"],
)
def test_flexlora_with_update_averaging_keeps_the_global_when_every_client_returns_what_it_was_sent(average, want):
    """Averaging products mixes W with its rank-1 and rank-2 truncations W_1, W_2 (the nodes of rank 1 and 2 sent
    back what they got); averaging updates adds a zero mean update to W."""
    g = glob()
    new = echo_round(build(method="flexlora", extra=f"flexlora_average={average}"), g, {1: 10, 2: 20, 3: 30})
    w1, w2 = product(hr.slice_rank(g, 1)), product(hr.slice_rank(g, 2))
    np.testing.assert_allclose(product(new), want(product(g), w1, w2), atol=1e-5)


def test_flexlora_starts_the_ranks_beyond_the_mean_from_a_generator_seeded_with_the_round():
    s = build_strategy(load_config({"overrides": "num_clients=1 lora_aggregation=flexlora model.lora.r=4"}))
    msgs = list(s.configure_train(3, to_record(glob()), ConfigRecord(), RankGrid({1: 1})))
    client = glob(1, seed=7)
    new = from_record(s.aggregate_train(3, server_weighted([reply_to(msgs[0], client, 10)]))[0])
    bound = 1 / np.sqrt(6)  # PEFT's start of an A row, in = 6
    drawn = np.random.default_rng(3).uniform(-bound, bound, size=(3, 6)).astype(np.float32)
    np.testing.assert_array_equal(new[L + hr.A_SUFFIX][1:], drawn)
    assert np.abs(new[L + hr.B_SUFFIX][:, 1:]).max() == 0
    np.testing.assert_allclose(product(new), product(client), atol=1e-5)


@pytest.mark.parametrize(
    ("average", "rows"),
    [
        # weights 1/6, 2/6, 3/6 for the nodes of rank 1, 2, 4 sending all-1, all-2, all-3 factors
        ("zero_padded", [(1 + 4 + 9) / 6, (4 + 9) / 6, 9 / 6, 9 / 6]),
        ("per_rank", [(1 + 4 + 9) / 6, (4 + 9) / 5, 3, 3]),  # rank 1 over 5/6 of the weight, ranks 2-3 over 3/6
    ],
    ids=["zero_padded", "per_rank"],
)
def test_hetlora_through_the_server_averages_each_rank_as_hetlora_average_says(average, rows):
    s = build(extra=f"hetlora_average={average} hetlora_weighting=examples")
    msgs = list(s.configure_train(1, to_record(glob()), ConfigRecord(), RankGrid(RANKS)))
    replies = [reply_to(m, const(RANKS[n], n), 10 * n) for m in msgs for n in [m.metadata.dst_node_id]]
    new = from_record(s.aggregate_train(1, server_weighted(replies))[0])
    np.testing.assert_allclose(new[L + hr.A_SUFFIX], np.repeat(np.array(rows)[:, None], 6, 1), rtol=1e-6)
    np.testing.assert_allclose(new[L + hr.B_SUFFIX], np.repeat(np.array(rows)[None], 7, 0), rtol=1e-6)


def test_clients_combined_before_any_global_was_sent_leave_the_ranks_no_client_holds_at_zero():
    """No previous global to keep them from: HetLoRA's own formula, the zero-padded average."""
    s = build(extra="hetlora_weighting=examples")
    new = s.combine([const(1, 1.0), const(2, 2.0)], [1, 3])
    np.testing.assert_allclose(new[L + hr.A_SUFFIX], np.repeat([[7 / 4], [6 / 4], [0], [0]], 6, 1))
    np.testing.assert_allclose(new[L + hr.B_SUFFIX], np.repeat([[7 / 4, 6 / 4, 0, 0]], 7, 0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "svd"}, "lora_aggregation='svd' must be one of homogeneous, hetlora, flexlora"),
        ({"r_max": 0}, "model.lora.r=0 must be at least 1"),
        ({"weighting": "size"}, "weighting='size' must be one of norm, examples"),
        ({"average": "mean"}, "average='mean' must be one of zero_padded, per_rank"),
        (
            {"method": "flexlora", "prune": True},
            "hetlora_prune.enabled=true with lora_aggregation=flexlora: rank self-pruning is HetLoRA's; "
            "set lora_aggregation=hetlora or hetlora_prune.enabled=false",
        ),
    ],
    ids=["method", "r_max", "weighting", "average", "prune"],
)
def test_the_strategys_rank_parameters_refuse_a_bad_setting_naming_it_and_the_choices_or_the_fix(kwargs, message):
    with pytest.raises(ValueError) as err:
        HeteroRankParams(**{"method": "hetlora", "r_max": 4, **kwargs})
    assert str(err.value) == message


def test_a_global_adapter_of_rank_one_is_a_valid_r_max():
    assert HeteroRankParams(method="hetlora", r_max=1).r_max == 1


@pytest.mark.parametrize(
    ("cls", "method", "message"),
    [
        (
            Scaffold,
            "hetlora",
            "Scaffold cannot run with lora_aggregation=hetlora: its control variates would have to be sliced and "
            "padded across ranks, which SCAFFOLD's correction does not define; use lora_aggregation=homogeneous or "
            "another strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad)",
        ),
        (
            Central,
            "flexlora",
            "Central cannot run with lora_aggregation=flexlora: it trains one adapter on the pooled data of every "
            "client, so no client rank applies; use lora_aggregation=homogeneous or another strategy",
        ),
    ],
)
def test_a_strategy_that_cannot_take_client_ranks_is_refused_whole_with_the_fix(cls, method, message):
    with pytest.raises(ValueError) as err:
        with_lora_ranks(cls, method)
    assert str(err.value) == message


def test_the_combined_class_is_named_and_documented_after_the_strategy_it_extends():
    combined = with_lora_ranks(FedAvgM, "hetlora")
    assert combined.__name__ == "FedAvgMWithLoRARanks"
    assert combined.__doc__ == "FedAvgM with clients of different ranks."
    assert issubclass(combined, FedAvgM) and issubclass(combined, HeteroRank)
