"""HetLoRA's frozen tail (``hetlora_tail=frozen``): the math on hand-computed arrays, what each node is sent,
which replies the checks accept (its own ranks only), the aggregate, and the combinations refused at start."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.reply_checks import shapes_of, split_replies
from fedllm_app.server.rounds import reply_bases
from fedllm_app.server.run import local_strategy
from strategies import hetero_rank as hr
from strategies.fedavg import ARRAYS_KEY
from strategies.hetero import TRAIN_RANK_KEY, HeteroRankParams
from strategies.records import from_record, to_record
from tests.unit.strategies.test_hetero import (
    RANKS,
    RankGrid,
    build,
    glob,
    reply_to,
    server_weighted,
)

A, B = "m" + hr.A_SUFFIX, "m" + hr.B_SUFFIX
L_A = "m.q_proj" + hr.A_SUFFIX  # the layer of test_hetero's glob()
FROZEN = "hetlora_tail=frozen hetlora_weighting=examples"


def test_each_rank_moves_by_the_weighted_mean_update_of_the_clients_that_trained_it():
    # r_max 3; client 1 (weight 0.25) trained rank 0, client 2 (weight 0.75) ranks 0-1; nobody rank 2.
    global_ = {A: np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), B: np.array([[1.0, 2.0, 3.0]])}
    one = {A: np.array([[5.0, 1.0]]), B: np.array([[3.0]])}  # updates: A0 +(4, 0), B0 +2
    two = {A: np.array([[1.0, 9.0], [6.0, 2.0]]), B: np.array([[-1.0, 4.0]])}  # A0 +(0, 8), A1 +(4, 0); B +(-2, 2)
    new = hr.frozen_tail_aggregate(global_, [one, two], [0.25, 0.75])
    # rank 0: 1 + 0.25 (4, 0) + 0.75 (0, 8) = (2, 7); B0: 1 + 0.25 * 2 + 0.75 * -2 = 0
    # rank 1, only client 2 (renormalised to weight 1): A1 = (6, 2), B1 = 4; rank 2 untouched
    np.testing.assert_allclose(new[A], [[2.0, 7.0], [6.0, 2.0], [3.0, 3.0]])
    np.testing.assert_allclose(new[B], [[0.0, 4.0, 3.0]])


def test_the_frozen_tail_keeps_the_globals_float32_and_refuses_a_client_above_its_rank():
    global_ = {A: np.ones((2, 2), np.float32), B: np.ones((1, 2), np.float32)}
    one = {A: np.full((1, 2), 3.0, np.float32), B: np.full((1, 1), 3.0, np.float32)}
    new = hr.frozen_tail_aggregate(global_, [one], [1.0])
    assert new[A].dtype == np.float32 and new[B].dtype == np.float32
    three = {A: np.ones((3, 2), np.float32), B: np.ones((1, 3), np.float32)}
    with pytest.raises(ValueError, match="^a client's rank 3 is above the global adapter's rank 2$"):
        hr.frozen_tail_aggregate(global_, [one, three], [0.5, 0.5])


def test_frozen_sum_adds_each_ranks_weighted_updates_without_renormalising():
    global_ = {A: np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), B: np.array([[1.0, 2.0, 3.0]])}
    one = {A: np.array([[5.0, 1.0]]), B: np.array([[3.0]])}
    two = {A: np.array([[1.0, 9.0], [6.0, 2.0]]), B: np.array([[-1.0, 4.0]])}
    new = hr.frozen_tail_aggregate(global_, [one, two], [0.25, 0.75], renormalise=False)
    # rank 0 as in the renormalised form (both clients trained it); rank 1: 2 + 0.75 (4, 0), B1 2 + 0.75 * 2
    np.testing.assert_allclose(new[A], [[2.0, 7.0], [5.0, 2.0], [3.0, 3.0]])
    np.testing.assert_allclose(new[B], [[0.0, 3.5, 3.0]])


def test_the_server_sums_the_updates_under_frozen_sum():
    s, g = build(extra="hetlora_tail=frozen_sum hetlora_weighting=examples"), glob()
    msgs = list(s.configure_train(1, to_record(g), ConfigRecord(), RankGrid(RANKS)))
    assert all(from_record(m.content[ARRAYS_KEY])[L_A].shape == (4, 6) for m in msgs)  # the whole global
    nodes = [m.metadata.dst_node_id for m in msgs]
    trained = {n: glob(RANKS[n], seed=20 + n) for n in nodes}
    replies = [reply_to(m, trained[n], 10 * n) for m, n in zip(msgs, nodes, strict=True)]
    arrays, _ = s.aggregate_train(1, server_weighted(replies))
    want = hr.frozen_tail_aggregate(g, [trained[n] for n in sorted(trained)], [1 / 6, 2 / 6, 3 / 6], renormalise=False)
    for k in want:
        np.testing.assert_allclose(from_record(arrays)[k], want[k], rtol=1e-6)


def test_with_every_client_at_r_max_it_is_the_weighted_average_of_the_factors():
    g, clients = glob(), [glob(seed=s) for s in (1, 2, 3)]
    weights = [0.2, 0.3, 0.5]
    new = hr.frozen_tail_aggregate(g, clients, weights)
    for k in g:
        np.testing.assert_allclose(new[k], sum(w * c[k] for w, c in zip(weights, clients, strict=True)), rtol=1e-5)


def test_a_rank_whose_trainers_all_have_weight_zero_keeps_the_global():
    global_ = {A: np.ones((2, 2)), B: np.ones((1, 2))}
    small, big = {A: np.zeros((1, 2)), B: np.zeros((1, 1))}, {A: np.full((2, 2), 5.0), B: np.full((1, 2), 5.0)}
    new = hr.frozen_tail_aggregate(global_, [small, big], [1.0, 0.0])
    np.testing.assert_allclose(new[A], [[0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(new[B], [[0.0, 1.0]])


def test_every_node_is_sent_the_whole_global_and_told_how_many_ranks_to_train():
    s, g = build(extra=FROZEN), glob()
    msgs = s.configure_train(1, to_record(g), ConfigRecord(), RankGrid(RANKS))
    for m in msgs:
        got = from_record(m.content[ARRAYS_KEY])
        for k in g:
            np.testing.assert_array_equal(got[k], g[k])
        assert m.content["config"][TRAIN_RANK_KEY] == RANKS[m.metadata.dst_node_id]
        assert m.content["config"]["server-round"] == 1  # the round's own config is kept
    assert len({id(m.content["config"]) for m in msgs}) == len(msgs)  # each node its own config


def test_the_reply_checks_accept_a_nodes_own_ranks_and_reject_the_whole_global_it_was_sent():
    s, g = build(extra=FROZEN), glob()
    msgs = list(s.configure_train(1, to_record(g), ConfigRecord(), RankGrid(RANKS)))
    bases = reply_bases(s, msgs)
    assert {n: shapes_of(a)[L_A] for n, a in bases.items()} == {n: (r, 6) for n, r in RANKS.items()}
    own = [reply_to(m, hr.slice_rank(g, RANKS[m.metadata.dst_node_id]), 5) for m in msgs]
    kept, rejected = split_replies(own, shapes_of(to_record(g)), by_node={n: shapes_of(a) for n, a in bases.items()})
    assert len(kept) == 3 and rejected == []
    whole = [reply_to(m, g, 5) for m in msgs if RANKS[m.metadata.dst_node_id] < 4]
    _, rejected = split_replies(whole, shapes_of(to_record(g)), by_node={n: shapes_of(a) for n, a in bases.items()})
    assert len(rejected) == 2 and all("has shape (4, 6)" in r["reason"] for r in rejected)


def test_the_server_adds_the_replies_updates_rank_by_rank():
    s, g = build(extra=FROZEN), glob()
    msgs = list(s.configure_train(1, to_record(g), ConfigRecord(), RankGrid(RANKS)))
    nodes = [m.metadata.dst_node_id for m in msgs]
    trained = {n: glob(RANKS[n], seed=20 + n) for n in nodes}
    replies = [reply_to(m, trained[n], 10 * n) for m, n in zip(msgs, nodes, strict=True)]
    arrays, _ = s.aggregate_train(1, server_weighted(replies))
    clients = [trained[n] for n in sorted(trained)]
    want = hr.frozen_tail_aggregate(g, clients, [10 / 60, 20 / 60, 30 / 60])
    for k in want:
        np.testing.assert_allclose(from_record(arrays)[k], want[k], rtol=1e-6)


def test_the_local_baseline_sends_each_client_only_its_own_ranks():
    s = local_strategy(load_config({"overrides": f"num_clients=3 lora_aggregation=hetlora model.lora.r=4 {FROZEN}"}))
    for m in s.configure_train(1, to_record(glob()), ConfigRecord(), RankGrid(RANKS)):
        assert from_record(m.content[ARRAYS_KEY])[L_A].shape[0] == RANKS[m.metadata.dst_node_id]
        assert TRAIN_RANK_KEY not in m.content["config"]


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ("lora_aggregation=flexlora", "lora_aggregation=flexlora"),
        ("lora_aggregation=hetlora hetlora_prune.enabled=true", "hetlora_prune.enabled=true"),
        ("lora_aggregation=hetlora hetlora_average=per_rank", "hetlora_average=per_rank"),
        ("lora_aggregation=hetlora comm.codec=fp16", "comm.codec=fp16"),
    ],
)
def test_the_frozen_tail_with_what_it_cannot_combine_with_fails_at_start_naming_it_and_the_fix(extra, names):
    with pytest.raises(ConfigError, match=rf"hetlora_tail=frozen cannot run with {names}.*hetlora_tail=none"):
        load_config({"overrides": f"model.lora.r=4 hetlora_tail=frozen {extra}"})


def test_an_unknown_tail_fails_naming_the_choices():
    with pytest.raises(ConfigError, match=r"hetlora_tail='thawed' must be one of none, frozen, frozen_sum"):
        load_config({"overrides": "lora_aggregation=hetlora hetlora_tail=thawed"})


def test_the_strategys_own_parameters_refuse_the_same_combinations():
    with pytest.raises(ValueError, match=r"hetlora_tail=frozen cannot run with lora_aggregation=flexlora"):
        HeteroRankParams(method="flexlora", r_max=4, tail="frozen")
    with pytest.raises(ValueError, match=r"hetlora_tail=frozen cannot run with hetlora_prune.enabled=true"):
        HeteroRankParams(method="hetlora", r_max=4, tail="frozen", prune=True)


def test_the_config_and_the_strategy_know_the_same_tails():
    from fedllm_app.config import HETLORA_TAILS

    assert HETLORA_TAILS == hr.TAILS


FROZEN_REASON = "the frozen tail is its own way to send, train and aggregate HetLoRA's ranks"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tail": "thawed"}, "hetlora_tail='thawed' must be one of none, frozen, frozen_sum"),
        (
            {"method": "flexlora"},
            f"hetlora_tail=frozen cannot run with lora_aggregation=flexlora: {FROZEN_REASON}; "
            "set lora_aggregation=hetlora or hetlora_tail=none",
        ),
        (
            {"tail": "frozen_sum", "prune": True},
            f"hetlora_tail=frozen_sum cannot run with hetlora_prune.enabled=true: {FROZEN_REASON}; "
            "set hetlora_prune.enabled=false or hetlora_tail=none",
        ),
        (
            {"average": "per_rank"},
            f"hetlora_tail=frozen cannot run with hetlora_average=per_rank: {FROZEN_REASON}; "
            "set hetlora_average=zero_padded or hetlora_tail=none",
        ),
    ],
    ids=["unknown", "flexlora", "prune", "per_rank"],
)
def test_the_strategys_parameters_refuse_a_tail_they_cannot_run_with_the_whole_fix(kwargs, message):
    with pytest.raises(ValueError) as err:
        HeteroRankParams(**{"method": "hetlora", "r_max": 4, "tail": "frozen", **kwargs})
    assert str(err.value) == message
