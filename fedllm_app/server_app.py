"""fedllm's ServerApp: federated LoRA fine-tuning, server-side evaluation, outputs."""

from __future__ import annotations

import random
import time

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedllm_app.config import load_config
from fedllm_app.server import FederatedRun, check_nodes

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Parse the config, build the run, train, then the local-only baseline if asked."""
    start = time.perf_counter()
    cfg = load_config(context.run_config)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    check_nodes(grid, cfg)
    run = FederatedRun(cfg, started=start)
    run.federated(grid)
    if cfg.baseline == "local":
        run.local_baseline(grid)
    run.finish()
