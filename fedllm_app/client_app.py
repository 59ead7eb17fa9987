"""fedllm's ClientApp: check the run config against the node's policy, train one round, reply; and say
this node's LoRA rank when asked.

Flower sends ``str(exception)`` of a failed ClientApp to the server, so nothing of a failure's details
leaves the node: the server gets a short code and a generic sentence (:class:`NodeError`); the details
are logged here, on the node.
"""

from __future__ import annotations

from fedllm_app.client import warmup
from fedllm_app.console import quiet_library_warnings, setup_console

quiet_library_warnings()  # before torch and transformers are imported: some warn at import
warmup.enable()  # a simulation's Ray workers, started after this import, preload the training libraries

import logging  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402
from functools import partial  # noqa: E402

from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedllm_app.client import faults, secure  # noqa: E402
from fedllm_app.client.policy import NodePolicy, PolicyError  # noqa: E402
from fedllm_app.client.round import DATA_PATH_KEY, round_config, train_one_round  # noqa: E402
from fedllm_app.comm.codecs import CommParams  # noqa: E402
from fedllm_app.comm.packing import unpack_content  # noqa: E402
from fedllm_app.comm.wire import decode_message, encode_reply  # noqa: E402
from fedllm_app.config import EVERY_ROUND, ConfigError, load_config, parse_faults  # noqa: E402
from fedllm_app.model import RANK_NODE_KEY, client_rank, with_client_rank  # noqa: E402
from fedllm_app.secure import keys as secagg_keys  # noqa: E402
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY  # noqa: E402
from strategies.hetero import RANK_KEY, RANK_QUERY, TRAIN_RANK_KEY  # noqa: E402
from strategies.local import PARTITION_KEY  # noqa: E402
from strategies.records import from_record  # noqa: E402

app = ClientApp()
log = logging.getLogger("fedllm")

# What the server learns of a failure on this node: a code and a sentence, never the details.
ERRORS = {
    PolicyError: "E_POLICY: this node's policy refused the run config; its owner can read why in the node's log",
    ConfigError: "E_CONFIG: the run config or node config is invalid on this node; see the node's log",
    Exception: "E_TRAIN: the round failed on this node; see the node's log",
}


class NodeError(RuntimeError):
    """A failure as the server sees it: one of :data:`ERRORS`."""


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's round; any failure reaches the server only as a :class:`NodeError`."""
    os.umask(0o077)  # what the round writes (trainer folders, caches) is the node owner's alone
    try:
        NodePolicy.from_node_config(context.node_config).check_plain_round()
        return _train(msg, context)
    except Exception as err:  # noqa: BLE001 - every failure is logged here and sent as a code
        raise _node_error(err) from None


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id (it samples partitions, then sends to their nodes)."""
    try:
        pid = partition_id(context)
    except Exception as err:  # noqa: BLE001 - as in train: the details stay on the node
        raise _node_error(err) from None
    return Message(RecordDict({METRICS_KEY: MetricRecord({PARTITION_KEY: pid})}), reply_to=msg)


@app.query(RANK_QUERY.split(".")[1])
def lora_rank(msg: Message, context: Context) -> Message:
    """Reply with this node's LoRA rank (:func:`fedllm_app.model.client_rank`), for a server of mixed ranks."""
    try:
        policy = NodePolicy.from_node_config(context.node_config)
        policy.check_run_config(context.run_config)
        cfg = load_config(context.run_config, policy.node_overrides())
        rank = node_rank(cfg, partition_id(context), context)
    except Exception as err:  # noqa: BLE001 - as in train: the details stay on the node
        raise _node_error(err) from None
    return Message(RecordDict({METRICS_KEY: MetricRecord({RANK_KEY: rank})}), reply_to=msg)


@app.train(secagg_keys.TRAIN_TYPE.split(".")[1])
def secure_train(msg: Message, context: Context) -> Message:
    """Secure aggregation's mask stage: train as :func:`train`, reply only the masked update
    (:mod:`fedllm_app.client.secure`).
    """
    os.umask(0o077)
    try:
        msg.content = unpack_content(msg.content)  # SCAFFOLD's c-server is read before training
        content, _ = _trained(secure.training_message(msg, context.state), context)
        return Message(secure.masked_content(msg, content, context.state), reply_to=msg)
    except Exception as err:  # noqa: BLE001 - as in train: the details stay on the node
        raise _node_error(err) from None


@app.query(secagg_keys.QUERY_TYPE.split(".")[1])
def secure_stage(msg: Message, context: Context) -> Message:
    """Secure aggregation's keys, share and unmask stages; the round's secrets stay in the node's state."""
    try:
        return Message(secure.handle_query(msg, context.state), reply_to=msg)
    except Exception as err:  # noqa: BLE001 - as in train: the details stay on the node
        raise _node_error(err) from None


def _node_error(err: Exception) -> NodeError:
    """Log ``err`` on the node; the error the server sees: a code and a generic sentence."""
    log.error("this node refused or failed the request: %s: %s", type(err).__name__, err, exc_info=True)
    kind = next(k for k in ERRORS if isinstance(err, k))
    return NodeError(ERRORS[kind])


def _train(msg: Message, context: Context) -> Message:
    """Parse the run config within the node's policy, train (on the node's ``data-path`` if set), reply the
    update as it travels (``comm.codec``, packed).
    """
    content, travel = _trained(msg, context)
    return Message(travel(content), reply_to=msg)


def _trained(msg: Message, context: Context) -> tuple[RecordDict, Callable[[RecordDict], RecordDict]]:
    """The content of this node's train reply (trained adapter, metrics, SCAFFOLD's control delta), plain,
    and how it travels (:func:`encoded` with the round's config).
    """
    policy = NodePolicy.from_node_config(context.node_config)
    decode_message(msg, context.state)  # comm.codec: the arrays as sent, decoded before anything reads them
    cfg = round_config(context.run_config, msg, policy)
    setup_console(cfg.logging.verbose, progress=False)
    pid = partition_id(context)
    rank = node_rank(cfg, pid, context)
    if TRAIN_RANK_KEY not in msg.content[CONFIG_KEY]:  # hetlora_tail=frozen: the model keeps the global's rank
        cfg = with_client_rank(cfg, rank)
    content = train_one_round(cfg, pid, msg, context.state, policy.data_path)
    planned = parse_faults(cfg.fault_injection)
    fault = planned.get((int(msg.content[CONFIG_KEY]["server-round"]), pid)) or planned.get((EVERY_ROUND, pid))
    if fault:  # tests and the robustness benchmark only: reply with a deliberately bad update
        content = faults.corrupt(content, fault, from_record(msg.content[ARRAYS_KEY]))
    return content, partial(encoded, msg=msg, cfg=cfg, context=context, pid=pid)


def encoded(content: RecordDict, msg: Message, cfg: DictConfig, context: Context, pid: int) -> RecordDict:
    """The reply's content as it travels with ``comm.codec``: the update's delta against the global this
    node received, encoded, with the codec's error feedback kept in the node's state (per partition).

    No error feedback in a local-only round (the global never moves, so the delta is the client's whole drift
    since the start, not one round's change: a kept residual would be counted again every round) nor under
    DP (the residual would push the encoded update past the clip norm, and the server clips that part off).
    """
    comm = CommParams.from_config(cfg.get("comm"))
    local = str(msg.content[CONFIG_KEY].get("mode", "federated")) == "local"
    if local or bool((cfg.get("privacy") or {}).get("dp", False)):
        comm = replace(comm, error_feedback=False)
    return encode_reply(content, from_record(msg.content[ARRAYS_KEY]), comm, context.state, pid)


def partition_id(context: Context) -> int:
    """The partition id in the node config."""
    if PARTITION_KEY not in context.node_config:
        raise ConfigError(
            f'node config has no {PARTITION_KEY}; start the SuperNode with --node-config "{PARTITION_KEY}=0 '
            f'num-partitions=2" (add {DATA_PATH_KEY}=<file> for its own data, {RANK_NODE_KEY}=<r> for its LoRA rank)'
        )
    return int(context.node_config[PARTITION_KEY])


def node_rank(cfg: DictConfig, pid: int, context: Context) -> int:
    """The node's LoRA rank: node config ``lora-rank``, else the run's ``model.lora.client_ranks``, else r."""
    return client_rank(cfg, pid, context.node_config.get(RANK_NODE_KEY))
