"""The server's saved state: a round trip restores arrays, strategy state, RNGs, totals and metrics."""

import random

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common import MessageType

from fedllm_app.config import ConfigError, load_config
from fedllm_app.server.guard import GuardParams, ReplyGuard
from fedllm_app.server.resume import STATE_FILE, load_state, restore_rng, save_state
from fedllm_app.server.run import resume_point
from strategies.fedadam import FedAdam
from strategies.fedavg import DATA_SIZE_KEY, METRICS_KEY, PARTITION_KEY
from strategies.records import from_record, to_record

FEDADAM = {"num_clients": 2, "sample_clients": 2, "num_rounds": 4, "lr_max": 1e-3, "lr_min": 1e-4}
FEDADAM.update(eta=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3)


def test_state_round_trip(tmp_path):
    arrays = {"a.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    strategy = FedAdam(**FEDADAM)
    strategy.load_state_dict({"m": {"a.lora_A.weight": np.full((2, 3), 0.5, np.float32)}, "v": None})
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    rows = [{"round": 1, "accuracy": 0.25}, {"round": 2, "accuracy": 0.5}]
    save_state(
        tmp_path, phase="fedadam", server_round=2, arrays=to_record(arrays), strategy_state=strategy.state_dict(),
        totals={"bytes_sent_total": 10, "bytes_received_total": 20}, summary={"initial": {"accuracy": 0.0}},
        last_eval={"accuracy": 0.5}, metrics=rows,
    )  # fmt: skip
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)

    state = load_state(tmp_path)
    restore_rng(state.rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert state.round == 2 and state.phase == "fedadam" and state.metrics == rows
    np.testing.assert_array_equal(from_record(state.arrays)["a.lora_A.weight"], arrays["a.lora_A.weight"])
    fresh = FedAdam(**FEDADAM)
    fresh.load_state_dict(state.strategy)
    assert fresh.state_dict()["v"] is None
    np.testing.assert_array_equal(fresh.state_dict()["m"]["a.lora_A.weight"], 0.5)
    assert state.totals == {"bytes_sent_total": 10, "bytes_received_total": 20}
    assert not list(tmp_path.glob("*.tmp*"))


def test_resume_refuses_a_folder_without_state_or_with_other_settings(tmp_path):
    from omegaconf import OmegaConf

    cfg = load_config({"overrides": f"resume={tmp_path}"})
    with pytest.raises(ConfigError, match="no config.yaml there"):
        resume_point(cfg)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(load_config({"overrides": "seed=1"})))
    with pytest.raises(ConfigError, match="other values of seed"):
        resume_point(cfg)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(load_config({})))
    with pytest.raises(ConfigError, match=f"no {STATE_FILE} there"):
        resume_point(cfg)
    with pytest.raises(ConfigError, match="strategy=local"):
        resume_point(load_config({"overrides": f"strategy=local resume={tmp_path}"}))


def test_resume_with_other_num_rounds_fails_instead_of_shifting_the_lr_schedule(tmp_path):
    from omegaconf import OmegaConf

    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(load_config({"overrides": "num_rounds=15"})))
    cfg = load_config({"overrides": f"num_rounds=30 resume={tmp_path}"})
    with pytest.raises(
        ConfigError, match=r"num_rounds=15 .* schedule .* Resume with num_rounds=15, or start a new run"
    ):
        resume_point(cfg)
    with pytest.raises(ConfigError, match=f"no {STATE_FILE} there"):  # the same num_rounds goes on to the state
        resume_point(load_config({"overrides": f"num_rounds=15 resume={tmp_path}"}))


def _reply(partition: int, data_size: int) -> Message:
    metrics = MetricRecord({PARTITION_KEY: partition, DATA_SIZE_KEY: data_size})
    return Message(RecordDict({METRICS_KEY: metrics}), dst_node_id=0, message_type=MessageType.TRAIN)


def test_a_resumed_run_keeps_the_pinned_sizes_and_node_bindings_of_the_reply_guard(tmp_path):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Flower's messages need a task
    guard = ReplyGuard(GuardParams(weights="bounded"), plan={0: 10})
    assert guard.weight(_reply(1, 40)) == (10.0, None)  # not in the plan: pinned at 40, capped at the plan's 10
    guard.book.bind(node=7, pid=1)
    save_state(
        tmp_path, phase="fedavg", server_round=1, arrays=to_record({"w": np.zeros(2, np.float32)}),
        strategy_state={}, totals={}, summary={}, last_eval={}, metrics=[], guard_state=guard.state_dict(),
    )  # fmt: skip

    resumed = ReplyGuard(GuardParams(weights="bounded"), plan={0: 10})
    resumed.load_state_dict(load_state(tmp_path).guard)
    weight, problem = resumed.weight(_reply(1, 10_000))
    assert weight == 0.0 and problem == "'data-size' is 10000, this partition reported 40 before"
    assert resumed.book.problem(node=8, pid=1) == "'partition-id' 1 belongs to node 7"
