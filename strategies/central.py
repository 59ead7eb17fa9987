"""Centralised baseline (simulation only): one model trained on the pooled data of all clients.

Each round one node trains on the union of every partition for
``sample_clients x max_steps`` steps, the same total steps a federated round
spends, from the current global adapter; the server takes its adapter as is.

Client contract
---------------
``mode="central"`` and ``steps-multiplier`` in the train config; the client samples
``steps-multiplier`` times OpenFedLLM's per-round rows from the pooled data and trains
that many times ``max_steps`` steps. Replies are FedAvg's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies.fedavg import FedAvgLoRA

STEPS_MULTIPLIER_KEY = "steps-multiplier"


class Central(FedAvgLoRA):
    """Pooled-data training through one node, as many steps per round as a federated round."""

    mode = "central"

    def __init__(self, *, num_clients: int, sample_clients: int, **kwargs: Any) -> None:
        super().__init__(num_clients=num_clients, sample_clients=1, **kwargs)
        self.steps_multiplier = sample_clients

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), STEPS_MULTIPLIER_KEY: self.steps_multiplier})
        return super().configure_train(server_round, arrays, config, grid)
