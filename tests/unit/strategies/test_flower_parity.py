"""fedllm's server optimisers against Flower's own strategies on the same arrays and replies.

Each test drives both through ``configure_train`` and ``aggregate_train`` for several rounds
with the same global arrays and the same client replies, and compares the new global arrays.
Where fedllm differs from Flower on purpose (docs/strategies.md), the test states the
difference and removes it: FedAdagrad/FedYogi/FedAdam start ``v`` at ``tau**2`` (Reddi et
al.), Flower at zero; Flower's FedAdam folds Adam's bias correction into ``eta``; FedAvgM
keeps a damped average ``m = beta m + (1 - beta) delta`` where Flower keeps ``m = beta m + delta``.
"""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower

from strategies.fedadagrad import FedAdagrad
from strategies.fedadam import FedAdam
from strategies.fedavg import WEIGHT_KEY
from strategies.fedavgm import FedAvgM
from strategies.fedyogi import FedYogi
from strategies.records import from_record, to_record
from tests.fakes import FakeGrid

KW = {"num_clients": 2, "sample_clients": 2, "num_rounds": 5, "lr_max": 1e-2, "lr_min": 1e-3}
FLOWER_KW = {"fraction_evaluate": 0.0, "min_train_nodes": 2, "min_available_nodes": 2}
START = {"a": np.array([0.5, -0.2, 0.0], np.float64), "b": np.array([[1.0, 2.0]], np.float64)}
ROUNDS = 4


def client_updates(rnd: int) -> list[tuple[dict, int]]:
    """Two clients' (update, examples) in round ``rnd``: different signs and sizes per entry and round."""
    rng = np.random.default_rng(rnd)
    return [({k: rng.normal(0, 0.1 * (i + 1), v.shape) for k, v in START.items()}, 10 * (i + 1)) for i in range(2)]


def reply(arrays: dict, n: int) -> Message:
    metrics = MetricRecord({"num-examples": n, WEIGHT_KEY: n, "train_loss": 1.0, "partition-id": n // 10 - 1})
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": metrics}), dst_node_id=1, message_type="train")


def one_round(strategy, rnd: int, x: dict) -> dict:
    list(strategy.configure_train(rnd, to_record(x), ConfigRecord(), FakeGrid(2)))
    replies = [reply({k: x[k] + u[k] for k in x}, n) for u, n in client_updates(rnd)]
    new, _ = strategy.aggregate_train(rnd, replies)
    return from_record(new)


def run_flower(strategy) -> list[dict]:
    x, out = dict(START), []
    for rnd in range(1, ROUNDS + 1):
        x = one_round(strategy, rnd, x)
        out.append(x)
    return out


def run_ours(make, state: dict | None = None) -> list[dict]:
    """``make(rnd)`` builds our strategy for round ``rnd``; the optimizer state carries over between rounds."""
    x, out = dict(START), []
    for rnd in range(1, ROUNDS + 1):
        strategy = make(rnd)
        strategy.load_state_dict(state or {})
        x = one_round(strategy, rnd, x)
        state = strategy.state_dict()
        out.append(x)
    return out


def assert_same(ours: list[dict], theirs: list[dict]) -> None:
    for rnd, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        for k in START:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-9, err_msg=f"round {rnd}, array {k}")


def zero_second_moment() -> dict:
    return {"v": {k: np.zeros_like(v) for k, v in START.items()}}


def test_fedadagrad_equals_flowers_when_v_starts_at_zero_as_flowers_does():
    ours = run_ours(lambda rnd: FedAdagrad(eta=0.3, tau=0.01, **KW), zero_second_moment())
    assert_same(ours, run_flower(flower.FedAdagrad(eta=0.3, tau=0.01, **FLOWER_KW)))


def test_fedyogi_equals_flowers_when_v_starts_at_zero_as_flowers_does():
    hp = {"eta": 0.3, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.01}
    ours = run_ours(lambda rnd: FedYogi(**hp, **KW), zero_second_moment())
    assert_same(ours, run_flower(flower.FedYogi(**hp, **FLOWER_KW)))


def test_fedadam_equals_flowers_with_flowers_bias_correction_folded_into_eta():
    hp = {"beta_1": 0.9, "beta_2": 0.99, "tau": 0.01}

    def flower_eta(rnd: int) -> float:  # Flower's eta_norm, as flwr.serverapp.strategy.FedAdam computes it
        return 0.3 * np.sqrt(1 - hp["beta_2"] ** (rnd + 1.0)) / (1 - hp["beta_1"] ** (rnd + 1.0))

    ours = run_ours(lambda rnd: FedAdam(eta=flower_eta(rnd), **hp, **KW), zero_second_moment())
    assert_same(ours, run_flower(flower.FedAdam(eta=0.3, **hp, **FLOWER_KW)))


@pytest.mark.parametrize("strategy_cls", [FedAdam, FedYogi])
def test_openfedllms_squared_momentum_is_a_different_optimizer(strategy_cls):
    """``second_moment=momentum`` (OpenFedLLM's m**2) departs from Flower's and the paper's delta**2."""
    hp = {"eta": 0.3, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.01}
    paper = run_ours(lambda rnd: strategy_cls(**hp, **KW))
    openfedllm = run_ours(lambda rnd: strategy_cls(**hp, second_moment="momentum", **KW))
    assert not np.allclose(paper[-1]["a"], openfedllm[-1]["a"], rtol=1e-3)


def test_fedavgm_equals_flowers_heavy_ball_with_the_server_lr_scaled_by_one_minus_beta():
    """m = beta m + (1 - beta) d from zero is (1 - beta) x Flower's m = beta m + d (first m = d)."""
    ours = run_ours(lambda rnd: FedAvgM(server_lr=1.0, momentum=0.9, **KW))
    theirs = flower.FedAvgM(server_learning_rate=0.1, server_momentum=0.9, **FLOWER_KW)
    assert_same(ours, run_flower(theirs))
