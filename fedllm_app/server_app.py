"""fedllm's ServerApp: federated LoRA fine-tuning, server-side evaluation, outputs."""

from __future__ import annotations

from fedllm_app.console import quiet_library_warnings, setup_console

quiet_library_warnings()  # before torch and transformers are imported: some warn at import

import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedllm_app.comm.object_pulls import shorten_object_pull_backoff  # noqa: E402
from fedllm_app.config import load_config  # noqa: E402
from fedllm_app.server.nodes import check_nodes  # noqa: E402
from fedllm_app.server.outputs import PRIVATE_UMASK  # noqa: E402
from fedllm_app.server.run import FederatedRun  # noqa: E402

app = ServerApp()
shorten_object_pull_backoff()  # the replies' arrays reach the server sooner (a deployment's ServerApp process)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Parse the config, check the SuperNodes (a simulation sets num_clients), build the run, train, baseline."""
    start = time.perf_counter()
    os.umask(PRIVATE_UMASK)  # outputs, checkpoints, resume state and caches: 0600 files in 0700 folders
    cfg = load_config(context.run_config)
    setup_console(cfg.logging.verbose)
    cfg = check_nodes(grid, cfg, context.run_config)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with FederatedRun(cfg, started=start) as run:  # ends the trackers' runs, as failed if this raises
        run.federated(grid)
        if cfg.baseline == "local":
            run.local_baseline(grid)
        run.finish()
