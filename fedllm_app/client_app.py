"""fedllm's ClientApp: parse, train one round, reply."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedllm_app import faults
from fedllm_app.client import train_one_round
from fedllm_app.config import load_config
from strategies.fedavg import CONFIG_KEY
from strategies.local import PARTITION_KEY

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Parse the run config, train this node's round, reply with the adapter."""
    cfg = load_config(context.run_config)
    pid = int(context.node_config[PARTITION_KEY])
    content = train_one_round(cfg, pid, msg, context.state)
    fault = faults.parse(cfg.fault_injection).get((int(msg.content[CONFIG_KEY]["server-round"]), pid))
    if fault:  # tests only: reply with a deliberately bad update
        content = faults.corrupt(content, fault)
    return Message(content, reply_to=msg)
