"""Local-only baseline: every client trains only on its own partition, nothing is averaged.

Client contract
---------------
Messages carry ``mode="local"``: the client trains the adapter it kept in its
persistent state (``context.state``) from earlier local rounds, or the arrays in
the message on its first local round, and stores the result back. Replies are
FedAvg's (arrays + ``num-examples``, ``train_loss``, ``partition-id``).
The server keeps each client's latest adapter (:attr:`client_arrays`) to
evaluate it; the global arrays are left unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord

from strategies.fedavg import ARRAYS_KEY, METRICS_KEY, PARTITION_KEY, FedAvgLoRA

__all__ = ["PARTITION_KEY", "LocalOnly"]


class LocalOnly(FedAvgLoRA):
    """The same sampling, steps and learning rates as FedAvg, without aggregation."""

    mode = "local"
    averages = False  # each client's adapter stays its own: no update bound against the global adapter

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
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
