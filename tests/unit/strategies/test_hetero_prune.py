"""HetLoRA's rank self-pruning: the pruning rule on hand-computed norms, and the server's side (the rank it learns
from a reply, the ranks it sends next, what a resumed run remembers)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.reply_checks import sent_shapes, shapes_of, split_replies
from fedllm_app.server.resume import load_state, save_state
from fedllm_app.server.run import build_strategy, local_strategy
from strategies import hetero_rank as hr
from strategies.fedavg import ARRAYS_KEY, METRICS_KEY
from strategies.hetero import PRUNED_STATE_KEY, RANK_KEY
from strategies.records import from_record, to_record
from tests.unit.strategies.test_hetero import RANKS, RankGrid, glob, reply_to, server_weighted

L, M = "m.q_proj", "m.v_proj"
ON = hr.PruneParams(enabled=True, decay=0.5)


def two_layers():
    """Two layers of rank 3 whose tails are known by hand.

    Layer L: A = [[1, 0], [0, 1], [0, 3]], B = [[1, 0, 0], [0, 1, 4]]. From rank 2 on: A row (0, 3), B column (0, 4):
    the product [[0, 0], [0, 12]], norm 12. From rank 1 on: [[0, 0], [0, 1 + 12]], norm 13.
    Layer M: A = [[2, 0], [0, 0], [1, 0]], B = [[1, 0, 3], [0, 0, 4]]: from rank 2 on the product is
    [[3, 0], [4, 0]], norm 5; from rank 1 on the same (its rank 1 is zero).
    """
    arrays = {
        L + hr.A_SUFFIX: [[1, 0], [0, 1], [0, 3]],
        L + hr.B_SUFFIX: [[1, 0, 0], [0, 1, 4]],
        M + hr.A_SUFFIX: [[2, 0], [0, 0], [1, 0]],
        M + hr.B_SUFFIX: [[1, 0, 3], [0, 0, 4]],
    }
    return {k: np.array(v, dtype=np.float32) for k, v in arrays.items()}


@pytest.mark.parametrize(
    ("rank", "decay", "kept"), [(4, 0.9, 3), (4, 0.5, 2), (10, 0.3, 3), (10, 0.05, 1), (1, 0.9, 1)]
)
def test_a_pruning_client_keeps_floor_decay_times_its_rank_and_never_fewer_than_one(rank, decay, kept):
    assert hr.kept_rank(rank, decay) == kept
    with pytest.raises(ValueError, match=r"^rank 0 must be at least 1$"):
        hr.kept_rank(0, decay)


def test_the_tails_size_is_the_sum_over_layers_of_the_frobenius_norm_of_its_product():
    arrays = two_layers()
    assert hr.tail_norm(arrays, 2) == pytest.approx(12 + 5)
    assert hr.tail_norm(arrays, 1) == pytest.approx(13 + 5)
    assert hr.tail_norm(arrays, 3) == 0.0


@pytest.mark.parametrize(
    ("before", "after", "threshold", "rank"),
    [
        (2.0, 1.5, 1.0, 2),  # the tail shrank: prune to floor(0.5 * 4)
        (2.0, 2.5, 1.0, 4),  # it grew: keep every rank
        (2.0, 2.0, 1.0, 4),  # the same: keep (strictly smaller prunes)
        (0.0, 0.0, 1.0, 4),  # a tail that started at zero is never pruned
        (2.0, 1.5, 0.5, 4),  # threshold 0.5: it must fall below 1.0
        (2.0, 0.9, 0.5, 2),
    ],
)
def test_a_client_prunes_when_its_tail_fell_below_threshold_times_its_size_at_the_rounds_start(
    before, after, threshold, rank
):
    params = hr.PruneParams(enabled=True, decay=0.5, threshold=threshold)
    assert hr.pruned_rank(4, before, after, params) == rank


def test_a_rank_one_client_or_pruning_off_keeps_its_rank():
    assert hr.pruned_rank(1, 2.0, 0.0, ON) == 1
    assert hr.pruned_rank(4, 2.0, 0.0, hr.PruneParams(enabled=False)) == 4


def test_zero_tail_zeroes_the_a_rows_and_b_columns_after_the_kept_ranks_only():
    arrays = two_layers()
    out = hr.zero_tail(arrays, 1)
    np.testing.assert_array_equal(out[L + hr.A_SUFFIX], [[1, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(out[M + hr.B_SUFFIX], [[1, 0, 0], [0, 0, 0]])
    assert hr.tail_norm(out, 1) == 0.0 and hr.tail_norm(arrays, 1) > 0  # a copy: the input is unchanged


@pytest.mark.parametrize(
    ("key", "value"),
    [("decay", 0.0), ("decay", 1.0), ("decay", -0.5), ("weight", -0.1), ("threshold", 0.0), ("threshold", -1.0)],
)
def test_the_config_and_the_prune_params_refuse_the_same_bad_values_naming_them(key, value):
    with pytest.raises(ValueError, match=rf"hetlora_prune.{key}={value} must"):
        hr.PruneParams(enabled=True, **{key: value})
    with pytest.raises(ConfigError, match=rf"hetlora_prune.{key}={value} must .*e.g. hetlora_prune.{key}="):
        load_config({"overrides": f"lora_aggregation=hetlora hetlora_prune.enabled=true hetlora_prune.{key}={value}"})


@pytest.mark.parametrize("method", ["homogeneous", "flexlora"])
def test_pruning_without_hetlora_fails_at_start_with_the_fix(method):
    with pytest.raises(ConfigError, match=rf"hetlora_prune.enabled=true with lora_aggregation={method}.*hetlora"):
        load_config({"overrides": f"lora_aggregation={method} hetlora_prune.enabled=true"})


def build(strategy="fedavg", extra=""):
    overrides = (
        f"strategy={strategy} num_clients={len(RANKS)} lora_aggregation=hetlora model.lora.r=4 "
        f"hetlora_prune.enabled=true hetlora_prune.decay=0.5 {extra}"
    )
    return build_strategy(load_config({"overrides": overrides}))


def prune_round(s, grid, g, server_round=1, prune_to=2):
    """One round in which node 3 (rank 4) prunes to ``prune_to``: its tail zeroed, its new rank in the metrics."""
    msgs = list(s.configure_train(server_round, to_record(g), ConfigRecord(), grid))
    replies, sent = [], {}
    for m in msgs:
        node = m.metadata.dst_node_id
        sent[node] = from_record(m.content[ARRAYS_KEY])
        trained = {k: v + 0.1 for k, v in sent[node].items()}
        if node == 3:
            trained = hr.zero_tail(trained, prune_to)
        reply = reply_to(m, trained, 10)
        reply.content[METRICS_KEY][RANK_KEY] = prune_to if node == 3 else hr.rank_of(sent[node])
        replies.append(reply)
    kept, rejected = split_replies(replies, shapes_of(to_record(g)), by_node=sent_shapes(msgs))
    assert rejected == []  # the pruning reply keeps the shapes it was sent
    arrays, _ = s.aggregate_train(server_round, server_weighted(kept))
    return from_record(arrays), sent, [from_record(m.content[ARRAYS_KEY]) for m in kept]


def test_the_server_aggregates_a_pruned_reply_at_its_new_rank_and_sends_that_rank_from_then_on():
    s, grid, g = build(), RankGrid(RANKS), glob()
    new, sent, replies = prune_round(s, grid, g)
    assert hr.rank_of(sent[3]) == 4
    clients = [hr.slice_rank(r, 2) if hr.rank_of(r) == 4 else r for r in replies]  # as if it sent 2 ranks
    want = hr.hetlora_aggregate(clients, hr.hetlora_weights(clients, [10, 10, 10]), 4, previous=g)
    for k in want:
        np.testing.assert_allclose(new[k], want[k], rtol=1e-6)
    np.testing.assert_array_equal(new[L + hr.A_SUFFIX][2:], g[L + hr.A_SUFFIX][2:])  # no client holds ranks 2-3 now
    nxt = {m.metadata.dst_node_id: hr.rank_of(from_record(m.content[ARRAYS_KEY])) for m in s.configure_train(
        2, to_record(new), ConfigRecord(), grid)}  # fmt: skip
    assert nxt == {1: 1, 2: 2, 3: 2}
    assert grid.queried.count(3) == 1  # the server keeps the pruned rank; it does not ask again


@pytest.mark.parametrize(("strategy", "extra"), [("fedavg", ""), ("fedavgm", "strategy.momentum=0.9")])
def test_a_resumed_run_sends_a_pruned_partition_its_pruned_rank_whatever_its_new_node_id(strategy, extra, tmp_path):
    s = build(strategy, extra)
    prune_round(s, RankGrid(RANKS), glob())
    state = s.state_dict()
    assert {k: int(v) for k, v in state[PRUNED_STATE_KEY].items()} == {"2": 2}  # partition 2 (node 3)
    save_state(tmp_path, phase="federated", server_round=1, arrays=to_record(glob()), strategy_state=state,
               totals={}, summary={}, last_eval={}, metrics=[])  # fmt: skip
    resumed = build(strategy, extra)
    resumed.load_state_dict(load_state(tmp_path).strategy)
    assert resumed.state_dict().keys() == state.keys()  # the strategy's own state (FedAvgM's momentum) too
    msgs = resumed.configure_train(2, to_record(glob()), ConfigRecord(), RankGrid(RANKS))
    assert {m.metadata.dst_node_id: hr.rank_of(from_record(m.content[ARRAYS_KEY])) for m in msgs} == {1: 1, 2: 2, 3: 2}


def test_a_reply_claiming_more_ranks_than_it_was_sent_is_rejected():
    s, grid, g = build(), RankGrid(RANKS), glob()
    msgs = list(s.configure_train(1, to_record(g), ConfigRecord(), grid))
    replies = []
    for m in msgs:
        reply = reply_to(m, from_record(m.content[ARRAYS_KEY]), 10)
        reply.content[METRICS_KEY][RANK_KEY] = 3  # nodes 1 and 2 were sent ranks 1 and 2; node 3 rank 4
        replies.append(reply)
    kept, rejected = split_replies(replies, shapes_of(to_record(g)), by_node=sent_shapes(msgs))
    assert [m.metadata.src_node_id for m in kept] == [3]
    assert sorted(r["node"] for r in rejected) == [1, 2]
    assert "'lora-rank' is 3; a client can only keep or prune the ranks it was sent, 1..1" in rejected[0]["reason"]


def test_without_pruning_a_replys_rank_changes_nothing_and_the_local_baseline_never_prunes():
    overrides = f"num_clients={len(RANKS)} lora_aggregation=hetlora model.lora.r=4"
    off = build_strategy(load_config({"overrides": overrides}))
    grid, g = RankGrid(RANKS), glob()
    prune_round(off, grid, g)
    assert {m.metadata.dst_node_id: hr.rank_of(from_record(m.content[ARRAYS_KEY])) for m in off.configure_train(
        2, to_record(g), ConfigRecord(), grid)} == RANKS  # fmt: skip
    assert PRUNED_STATE_KEY not in off.state_dict()
    baseline = local_strategy(load_config({"overrides": overrides + " hetlora_prune.enabled=true"}))
    assert baseline.hetero.prune is False


def test_the_prune_section_becomes_the_params_with_defaults_for_what_it_leaves_out():
    assert hr.PruneParams.from_config(None) == hr.PruneParams()
    assert hr.PruneParams.from_config({}) == hr.PruneParams()
    got = hr.PruneParams.from_config({"decay": 0.5, "weight": 0, "threshold": 2})
    assert got == hr.PruneParams(enabled=False, decay=0.5, weight=0.0, threshold=2.0)
    assert all(isinstance(v, float) for v in (got.decay, got.weight, got.threshold))
    both = {"enabled": True, "decay": 0.25, "weight": 0.5, "threshold": 0.5}
    assert hr.PruneParams.from_config(both) == hr.PruneParams(True, 0.25, 0.5, 0.5)


def test_a_prune_section_with_an_unknown_key_or_a_non_boolean_switch_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"^hetlora_prune has unknown keys \['rate'\]; its keys are enabled, decay"):
        hr.PruneParams.from_config({"enabled": True, "decay": 0.5, "weight": 0.1, "threshold": 1.0, "rate": 2})
    with pytest.raises(ValueError, match=r"^hetlora_prune.enabled='yes' must be true or false$"):
        hr.PruneParams.from_config({"enabled": "yes"})


def test_a_saved_state_without_pruned_ranks_restores_none_and_passes_the_rest_on():
    s = build_strategy(load_config({"overrides": "lora_aggregation=hetlora hetlora_prune.enabled=true"}))
    s.pruned = {0: 2}
    assert s.load_rank_state({"other": 1}) == {"other": 1}
    assert s.pruned == {}


def test_the_server_logs_which_node_and_partition_pruned_from_which_rank_to_which(caplog):
    caplog.set_level("INFO", logger="fedllm")
    prune_round(build(), RankGrid(RANKS), glob())
    pruned = [r.getMessage() for r in caplog.records if r.name == "fedllm" and "pruned" in r.getMessage()]
    assert pruned == ["node 3 (partition 2) pruned its LoRA rank 4 -> 2"]


def test_without_pruning_a_saved_pruned_rank_is_not_applied_and_each_node_gets_the_rank_it_says():
    off = build_strategy(
        load_config({"overrides": f"num_clients={len(RANKS)} lora_aggregation=hetlora model.lora.r=4"})
    )
    off.load_state_dict({PRUNED_STATE_KEY: {"2": np.array(2)}})  # partition 2 (node 3) pruned in an earlier run
    msgs = off.configure_train(1, to_record(glob()), ConfigRecord(), RankGrid(RANKS))
    assert {m.metadata.dst_node_id: hr.rank_of(from_record(m.content[ARRAYS_KEY])) for m in msgs} == RANKS
