"""One client round, whatever the algorithm: what the ClientApp's entry point calls.

The server's train config says what to do (:class:`RoundPlan`): the round and its
learning rate, ``mode`` (federated, local-only or central), FedProx's ``mu`` and the
central baseline's step multiplier; SCAFFOLD's control variate travels as an extra
ArrayRecord. The same path serves every strategy and both tasks (SFT, DPO).

A SuperNode whose node config names ``data-path`` (:data:`DATA_PATH_KEY`) trains on that
local file, the whole file being its partition::

    flower-supernode ... --node-config "partition-id=0 num-partitions=2 data-path=/data/private.jsonl"

Under HetLoRA's rank self-pruning (``hetlora_prune.enabled``, :mod:`strategies.hetero_rank`) the server is
the one record of a client's current rank: the client trains the ranks it is sent (its model keeps the node's
declared rank, the ranks after those held at zero), decides after training whether to prune its tail, replies
with the shapes it was sent (a pruned tail zeroed) and says its new rank in the metrics' ``lora-rank``.

Under HetLoRA's frozen tail (``hetlora_tail=frozen``) the client is sent the whole rank-``r_max`` global and the
train config's ``lora-train-rank`` (``r_k``): its model has rank ``r_max``, only the first ``r_k`` ranks train
(the others' gradients are zeroed before each optimizer step, so they stay exactly the global's) and the reply
holds those ``r_k`` ranks.

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
from omegaconf import DictConfig, OmegaConf

from fedllm_app.client.gradient_terms import RankTerms, ScaffoldClient
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
from strategies.hetero import RANK_KEY, TRAIN_RANK_KEY
from strategies.hetero_rank import (
    PruneParams,
    kept_rank,
    pad_rank,
    pruned_rank,
    rank_of,
    slice_rank,
    tail_norm,
    zero_tail,
)
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
    train_rank: int = 0  # hetlora_tail=frozen: the first ranks of the adapter sent that train (0: all of them)

    @classmethod
    def from_message(cls, msg: Message) -> RoundPlan:
        conf = msg.content[CONFIG_KEY]
        return cls(
            server_round=int(conf["server-round"]),
            lr=float(conf["lr"]),
            mode=str(conf.get("mode", "federated")),
            mu=float(conf.get(PROXIMAL_MU_KEY, 0.0)),
            multiplier=int(conf.get(STEPS_MULTIPLIER_KEY, 1)),
            train_rank=int(conf.get(TRAIN_RANK_KEY, 0)),
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
    prune = pruning(cfg, plan)
    set_adapter(model, from_record(kept) if kept is not None else padded_to_model(global_, cfg.model.lora.r, prune))
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
        ranks=rank_terms(global_, prune, plan.train_rank),
    )
    extras = {C_DELTA_KEY: scaffold.finish(trainer.terms.mean_gradient())} if scaffold else {}
    trained, rank_metrics = self_prune(global_, get_adapter(model), prune, pid)
    if plan.train_rank:  # frozen tail: the reply (and its update) is the ranks this client trained
        trained, global_ = slice_rank(trained, plan.train_rank), slice_rank(global_, plan.train_rank)
    trained, extras, within = dp_clip(msg, global_, trained, extras)
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
    metrics.update(rank_metrics)
    return RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(metrics), **extras})


def pruning(cfg: DictConfig, plan: RoundPlan) -> PruneParams | None:
    """HetLoRA's self-pruning settings when this round prunes (a federated round of a hetlora run with
    ``hetlora_prune.enabled``), else None.
    """
    if plan.mode != "federated" or cfg.get("lora_aggregation", "homogeneous") != "hetlora":
        return None
    section = cfg.get("hetlora_prune")
    params = PruneParams.from_config(OmegaConf.to_container(section) if section is not None else None)
    return params if params.enabled else None


def padded_to_model(sent: dict[str, Any], model_rank: int, prune: PruneParams | None) -> dict[str, Any]:
    """What the model loads: the arrays sent, zero-padded to the model's rank when the client self-prunes (the
    server then sends the client's current rank, at most the node's declared rank ``model_rank``).
    """
    if prune is None:
        return sent
    active = rank_of(sent)
    if active > model_rank:
        raise ValueError(
            f"the server sent {active} LoRA ranks, more than this node's rank {model_rank}; run the same fedllm "
            f"version on the server and the clients"
        )
    return pad_rank(sent, model_rank)


def rank_terms(sent: dict[str, Any], prune: PruneParams | None, train_rank: int = 0) -> RankTerms | None:
    """The round's rank terms. Self-pruning: train the ranks sent, pull their tail's product to zero. Frozen tail
    (``train_rank``): train the first ``train_rank`` ranks of the adapter sent, hold the rest.
    """
    if train_rank:
        if not 1 <= train_rank <= rank_of(sent):
            raise ValueError(
                f"the server asks to train {TRAIN_RANK_KEY}={train_rank} of the {rank_of(sent)} LoRA ranks it sent; "
                f"run the same fedllm version on the server and the clients"
            )
        return RankTerms(active=train_rank, keep=train_rank, weight=0.0)
    if prune is None:
        return None
    active = rank_of(sent)
    return RankTerms(active=active, keep=kept_rank(active, prune.decay), weight=prune.weight)


def self_prune(
    sent: dict[str, Any], trained: dict[str, Any], prune: PruneParams | None, pid: int
) -> tuple[dict[str, Any], dict[str, int]]:
    """The reply's adapter (the ranks sent, a pruned tail zeroed) and its ``lora-rank`` metric; unchanged and no
    metric when the client does not self-prune.
    """
    if prune is None:
        return trained, {}
    active = rank_of(sent)
    trained = slice_rank(trained, active)
    keep = kept_rank(active, prune.decay)
    before, after = tail_norm(sent, keep), tail_norm(trained, keep)
    rank = pruned_rank(active, before, after, prune)
    if rank < active:
        log.info("client %d prunes its LoRA rank %d -> %d (tail norm %.4g, was %.4g)", pid, active, rank, after, before)
        trained = zero_tail(trained, rank)
    return trained, {RANK_KEY: rank}


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
