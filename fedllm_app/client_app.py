"""fedllm's ClientApp: parse, train one round, reply."""

from __future__ import annotations

from fedllm_app.console import quiet_library_warnings, setup_console

quiet_library_warnings()  # before torch and transformers are imported: some warn at import

from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedllm_app.client import faults  # noqa: E402
from fedllm_app.client.round import DATA_PATH_KEY, round_config, train_one_round  # noqa: E402
from fedllm_app.config import ConfigError, parse_faults  # noqa: E402
from strategies.fedavg import CONFIG_KEY, METRICS_KEY  # noqa: E402
from strategies.local import PARTITION_KEY  # noqa: E402

app = ClientApp()


def node_partition(context: Context) -> int:
    """The partition id in the node config (the SuperNode's `--node-config "partition-id=..."`)."""
    if PARTITION_KEY not in context.node_config:
        raise ConfigError(
            f'node config has no {PARTITION_KEY}; start the SuperNode with --node-config "{PARTITION_KEY}=0 '
            f'num-partitions=2" (add {DATA_PATH_KEY}=<file> for its own data)'
        )
    return int(context.node_config[PARTITION_KEY])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id (it samples partitions, then sends to their nodes)."""
    return Message(RecordDict({METRICS_KEY: MetricRecord({PARTITION_KEY: node_partition(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Parse the run config, train this node's round (on its own ``data-path`` file if set), reply."""
    cfg = round_config(context.run_config, msg)
    setup_console(cfg.logging.verbose, progress=False)
    pid = node_partition(context)
    data_path = context.node_config.get(DATA_PATH_KEY)
    content = train_one_round(cfg, pid, msg, context.state, str(data_path) if data_path else None)
    fault = parse_faults(cfg.fault_injection).get((int(msg.content[CONFIG_KEY]["server-round"]), pid))
    if fault:  # tests only: reply with a deliberately bad update
        content = faults.corrupt(content, fault)
    return Message(content, reply_to=msg)
