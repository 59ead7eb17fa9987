"""fedllm's ClientApp: parse, train one round, reply; and say this node's LoRA rank when asked."""

from __future__ import annotations

from fedllm_app.console import quiet_library_warnings, setup_console

quiet_library_warnings()  # before torch and transformers are imported: some warn at import

from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedllm_app.client import faults  # noqa: E402
from fedllm_app.client.round import DATA_PATH_KEY, round_config, train_one_round  # noqa: E402
from fedllm_app.config import ConfigError, load_config, parse_faults  # noqa: E402
from fedllm_app.model import RANK_NODE_KEY, client_rank, with_client_rank  # noqa: E402
from strategies.fedavg import CONFIG_KEY, METRICS_KEY  # noqa: E402
from strategies.hetero import RANK_KEY, RANK_QUERY  # noqa: E402
from strategies.local import PARTITION_KEY  # noqa: E402

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Parse the run config, train this node's round (on its own ``data-path`` file if set), reply."""
    cfg = round_config(context.run_config, msg)
    setup_console(cfg.logging.verbose, progress=False)
    pid = partition_id(context)
    cfg = with_client_rank(cfg, node_rank(cfg, pid, context))
    data_path = context.node_config.get(DATA_PATH_KEY)
    content = train_one_round(cfg, pid, msg, context.state, str(data_path) if data_path else None)
    fault = parse_faults(cfg.fault_injection).get((int(msg.content[CONFIG_KEY]["server-round"]), pid))
    if fault:  # tests only: reply with a deliberately bad update
        content = faults.corrupt(content, fault)
    return Message(content, reply_to=msg)


@app.query(RANK_QUERY.split(".")[1])
def lora_rank(msg: Message, context: Context) -> Message:
    """Reply with this node's LoRA rank (:func:`fedllm_app.model.client_rank`), for a server of mixed ranks."""
    cfg = load_config(context.run_config)
    rank = node_rank(cfg, partition_id(context), context)
    return Message(RecordDict({METRICS_KEY: MetricRecord({RANK_KEY: rank})}), reply_to=msg)


def partition_id(context: Context) -> int:
    if PARTITION_KEY not in context.node_config:
        raise ConfigError(
            f'node config has no {PARTITION_KEY}; start the SuperNode with --node-config "{PARTITION_KEY}=0 '
            f'num-partitions=2" (add {DATA_PATH_KEY}=<file> for its own data, {RANK_NODE_KEY}=<r> for its LoRA rank)'
        )
    return int(context.node_config[PARTITION_KEY])


def node_rank(cfg: DictConfig, pid: int, context: Context) -> int:
    return client_rank(cfg, pid, context.node_config.get(RANK_NODE_KEY))
