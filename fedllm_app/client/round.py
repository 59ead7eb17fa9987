"""One client round, whatever the algorithm: what the ClientApp's entry point calls.

The server's train config says what to do (:class:`RoundPlan`): the round and its
learning rate, ``mode`` (federated, local-only or central), FedProx's ``mu`` and the
central baseline's step multiplier; SCAFFOLD's control variate travels as an extra
ArrayRecord. The same path serves every strategy and both tasks (SFT, DPO).

A SuperNode whose node config names ``data-path`` (:data:`DATA_PATH_KEY`) trains on that
local file, the whole file being its partition::

    flower-supernode ... --node-config "partition-id=0 num-partitions=2 data-path=/data/private.jsonl"

The file is read in the run's dataset format (``dataset=alpaca_gpt4``: alpaca columns;
``dataset=synthetic``/``custom``: prompt/response or prompt/chosen/rejected) and never sent:
only the adapter and metrics travel.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from omegaconf import DictConfig

from fedllm_app.client.gradient_terms import ScaffoldClient
from fedllm_app.client.policy import DATA_PATH_KEY, NodePolicy
from fedllm_app.client.trainer import ClientTrainer, client_trainer
from fedllm_app.config import ConfigError, cfg_key, load_config
from fedllm_app.data.canaries import CanarySpec
from fedllm_app.data.pipeline import local_rows, partition, pooled
from fedllm_app.data.rows import Row
from fedllm_app.data.sampling import round_indices
from fedllm_app.model import get_adapter, get_model, set_adapter
from strategies.central import STEPS_MULTIPLIER_KEY
from strategies.dp import CLIP_NORM_KEY, WITHIN_CLIP_KEY, clip_reply_parts
from strategies.fedavg import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DATA_SIZE_KEY,
    METRICS_KEY,
    NUM_CLIENTS_KEY,
    NUM_EXAMPLES_KEY,
)
from strategies.fedprox import PROXIMAL_MU_KEY
from strategies.local import PARTITION_KEY
from strategies.records import from_record, to_record
from strategies.scaffold import C_DELTA_KEY

log = logging.getLogger("fedllm")
LOCAL_STATE_KEY = "local-adapter"
__all__ = ["DATA_PATH_KEY", "round_config", "train_one_round"]


@dataclass(frozen=True)
class RoundPlan:
    """The round's instructions from the server's train config."""

    server_round: int
    lr: float
    mode: str = "federated"
    mu: float = 0.0
    multiplier: int = 1

    @classmethod
    def from_message(cls, msg: Message) -> RoundPlan:
        conf = msg.content[CONFIG_KEY]
        return cls(
            server_round=int(conf["server-round"]),
            lr=float(conf["lr"]),
            mode=str(conf.get("mode", "federated")),
            mu=float(conf.get(PROXIMAL_MU_KEY, 0.0)),
            multiplier=int(conf.get(STEPS_MULTIPLIER_KEY, 1)),
        )


def round_config(run_config: Mapping[str, Any], msg: Message, policy: NodePolicy | None = None) -> DictConfig:
    """The run's config as the server runs it, within this node's policy.

    The run config is checked against ``policy`` (:mod:`fedllm_app.client.policy`; default: a node
    that trusts its run config, as in a simulation), then composed with the server's ``num_clients``
    (a simulation may adapt it to its SuperNodes, :mod:`fedllm_app.server.nodes`: the train message
    carries the value, so every client computes the server's partitions) and the node's own overrides.
    """
    policy = policy if policy is not None else NodePolicy(trust_run_config=True)
    policy.check_run_config(run_config)
    conf = msg.content[CONFIG_KEY]
    extra = [f"num_clients={int(conf[NUM_CLIENTS_KEY])}"] if NUM_CLIENTS_KEY in conf else []
    cfg = load_config(run_config, extra + policy.node_overrides())
    policy.check_config(cfg)
    return cfg


def client_rows(
    cfg: DictConfig, pid: int, mode: str = "federated", data_path: str | None = None
) -> tuple[list[Row], str]:
    """The client's training rows and a name for its logs: its own file, its partition, or the pooled data."""
    if data_path:
        if mode == "central":
            raise ConfigError(
                f"client {pid} has its own data-path {data_path!r}, but strategy=central pools every client's data "
                f"on one node; private files cannot be pooled: run strategy=central in simulation without data-path"
            )
        if CanarySpec.from_config(cfg).count:
            log.warning("client %d trains on its own file (data-path): privacy.canaries inserts nothing into it", pid)
        return local_rows(cfg, data_path, who=f"client {pid}"), f"client {pid} (data-path '{data_path}')"
    if mode == "central":
        return pooled(cfg), "pooled data"
    return partition(cfg, pid), f"client {pid}"


def _trainer(
    cfg: DictConfig, pid: int, plan: RoundPlan, model: Any, tokenizer: Any, data_path: str | None
) -> ClientTrainer:
    rows, name = client_rows(cfg, pid, plan.mode, data_path)
    return client_trainer(model, tokenizer, rows, cfg, key=f"{name} ({cfg_key(cfg)})")


def process_age() -> float:
    """Seconds since this process started (Linux; 0.0 elsewhere): the ClientApp's start-up cost."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def seed_round(seed: int, pid: int) -> None:
    """Seed Python, NumPy and torch for this client round (LoRA dropout, batch order) from the run's seed,
    the round and the partition, not from what the process ran before.
    """
    from transformers import set_seed

    set_seed(seed + 1_000_003 * pid)


def train_one_round(cfg: DictConfig, pid: int, msg: Message, state: Any, data_path: str | None = None) -> RecordDict:
    """Load the adapter to start from, train this round, and build the reply's content."""
    # Start-up before this call: a fresh process's age, or (warm process) the time since the server sent it.
    age, start = min(process_age(), max(0.0, time.time() - msg.metadata.created_at)), time.perf_counter()
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    plan = RoundPlan.from_message(msg)
    model, tokenizer = get_model(cfg.model, cfg.seed)
    model_load = time.perf_counter() - start
    global_ = from_record(msg.content[ARRAYS_KEY])
    kept = state.get(LOCAL_STATE_KEY) if plan.mode == "local" else None
    set_adapter(model, from_record(kept) if kept is not None else global_)
    trainer = _trainer(cfg, pid, plan, model, tokenizer, data_path)
    scaffold = ScaffoldClient.from_message(msg)
    setup = time.perf_counter() - start
    seed = cfg.seed * 100_003 + plan.server_round
    seed_round(seed, pid)
    result = trainer.train_round(
        round_indices(len(trainer.dataset), cfg, plan.server_round, pid, plan.multiplier),
        plan.lr,
        seed=seed,
        mu=plan.mu,
        correction=scaffold.correction() if scaffold else None,
        max_steps=cfg.training.max_steps * plan.multiplier,
    )
    extras = {C_DELTA_KEY: scaffold.finish(trainer.terms.mean_gradient())} if scaffold else {}
    trained, extras, within = dp_clip(msg, global_, get_adapter(model), extras)
    arrays = to_record(trained)
    if plan.mode == "local":
        state[LOCAL_STATE_KEY] = arrays
    metrics = {
        NUM_EXAMPLES_KEY: result.num_examples,
        DATA_SIZE_KEY: len(trainer.dataset) + trainer.dropped,  # the rows it holds: its weight, as the server plans
        "train_loss": result.loss,
        PARTITION_KEY: pid,
        "train_seconds": result.seconds,
        "optimizer_seconds": result.optimizer_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "process_age_seconds": age,
        "model_load_seconds": model_load,  # 0 when the base model was already in this process
        "setup_seconds": setup,  # model, adapter, trainer and data before the first step
    }
    metrics.update(within)
    return RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(metrics), **extras})


def dp_clip(
    msg: Message, global_: dict[str, Any], trained: dict[str, Any], extras: dict[str, ArrayRecord]
) -> tuple[dict[str, Any], dict[str, ArrayRecord], dict[str, float]]:
    """Under DP-FedAvg (the train config names ``dp-clip-norm``): the update, with SCAFFOLD's ``c-delta``,
    clipped to that norm all together (:mod:`strategies.dp`), and whether it was within it; else unchanged.
    """
    conf = msg.content[CONFIG_KEY]
    if CLIP_NORM_KEY not in conf:
        return trained, extras, {}
    parts = {k: from_record(v) for k, v in extras.items()}
    new, clipped, scaled = clip_reply_parts(global_, trained, parts, float(conf[CLIP_NORM_KEY]))
    return new, {k: to_record(v) for k, v in clipped.items()}, {WITHIN_CLIP_KEY: 0.0 if scaled else 1.0}
