"""Local-only baseline: every client trains only on its own partition, nothing is averaged.

Client contract
---------------
Messages carry ``mode="local"``: the client trains the adapter it kept in its
persistent state (``context.state``) from earlier local rounds, or the arrays in
the message on its first local round, and stores the result back. Replies are
FedAvg's (arrays + ``num-examples``, ``train_loss``, ``partition-id``).
Every client trains in every round, whatever ``sample_clients`` says (as OpenFedLLM's local
baseline, which trains its one client every round): a client alone gets the full schedule,
not only the rounds a federated run would have drawn it in. The server keeps each client's
latest adapter (:attr:`client_arrays`) to evaluate it; the global arrays are left unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from strategies.fedavg import ARRAYS_KEY, METRICS_KEY, PARTITION_KEY, FedAvgLoRA

__all__ = ["PARTITION_KEY", "LocalOnly"]


class LocalOnly(FedAvgLoRA):
    """The same steps and learning rates as FedAvg, every client every round, without aggregation."""

    mode = "local"
    averages = False  # each client's adapter stays its own: no update bound against the global adapter

    def __init__(self, *, num_clients: int, sample_clients: int, **kwargs: Any) -> None:
        del sample_clients  # every client trains every round
        super().__init__(num_clients=num_clients, sample_clients=num_clients, **kwargs)
        self.client_arrays: dict[int, ArrayRecord] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        _, metrics = super().aggregate_train(server_round, replies)
        for msg in replies:
            if not msg.has_error():
                pid = int(msg.content[METRICS_KEY][PARTITION_KEY])
                self.client_arrays[pid] = msg.content[ARRAYS_KEY]
        return None, metrics
