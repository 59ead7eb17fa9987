"""fedllm's ClientApp: load the global adapter into the cached model, train, reply."""

from __future__ import annotations

import resource

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm_app.config import cfg_key, load_config
from fedllm_app.data import partition, round_indices
from fedllm_app.model import from_record, get_adapter, get_model, set_adapter, to_record
from fedllm_app.train import client_trainer
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from strategies.local import PARTITION_KEY

LOCAL_STATE_KEY = "local-adapter"
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Parse, build, train, reply."""
    cfg = load_config(context.run_config)
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    pid = int(context.node_config[PARTITION_KEY])
    conf = msg.content[CONFIG_KEY]
    rnd, local = int(conf["server-round"]), conf.get("mode") == "local"
    model, tokenizer = get_model(cfg.model, cfg.seed)
    start = context.state.get(LOCAL_STATE_KEY) if local else None
    set_adapter(model, from_record(start if start is not None else msg.content[ARRAYS_KEY]))
    trainer = client_trainer(model, tokenizer, partition(cfg, pid), cfg, key=f"client {pid} ({cfg_key(cfg)})")
    indices = round_indices(len(trainer.dataset), cfg, rnd, pid)
    result = trainer.train_round(indices, float(conf["lr"]), seed=cfg.seed * 100_003 + rnd)
    arrays = to_record(get_adapter(model))
    if local:
        context.state[LOCAL_STATE_KEY] = arrays
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: result.num_examples,
            "train_loss": result.loss,
            PARTITION_KEY: pid,
            "train_seconds": result.seconds,
            "optimizer_seconds": result.optimizer_seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )
    return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=msg)
