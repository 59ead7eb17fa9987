"""FedAvg over LoRA arrays, weighted by the clients' data sizes.

Flower's FedAvg already computes the weighted mean we want
(``sum_k n_k theta_k / sum_k n_k``), here with ``n_k`` the size of client k's data as
McMahan et al. and OpenFedLLM weigh it, not the per-round sample (equal for every client
whose partition holds one round's rows). The server writes ``n_k`` into each sound reply's
metrics under :data:`WEIGHT_KEY` after judging it (``fedllm_app/server/guard.py``): a
client never sets its own weight. This subclass only adds what fedllm's clients need each round.

Client contract
---------------
Each train message carries ``arrays`` (the global adapter) and ``config`` with
``server-round``, ``lr`` (constant within the round), ``mode`` ("federated") and
``num-clients`` (the run's number of clients, which a simulation may have adapted to its
SuperNodes: clients compute their data partition from it).
Each reply carries one ArrayRecord ``arrays`` (the trained adapter) and one
MetricRecord ``metrics`` with ``num-examples`` (rows trained this round), ``data-size``
(rows the client holds), ``partition-id`` and ``train_loss``. SCAFFOLD adds ArrayRecords
(:attr:`FedAvgLoRA.reply_arrays`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.records import from_record, to_record
from strategies.robust import AggregatorParams, aggregate
from strategies.schedule import cosine_lr

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
NUM_CLIENTS_KEY = "num-clients"
PARTITION_KEY = "partition-id"
DATA_SIZE_KEY = "data-size"
# Set by the server on each accepted reply (never by a client): the weight of the reply in the mean.
WEIGHT_KEY = "server-weight"


class FedAvgLoRA(FedAvg):
    """FedAvg with ``sample_clients`` of ``num_clients`` per round and a cosine lr across rounds."""

    mode = "federated"
    params: Any = None  # the algorithm's validated hyperparameter dataclass, if it has any
    reply_arrays: tuple[str, ...] = ()  # ArrayRecords a reply carries besides the adapter, shaped like it
    averages = True  # the replies are combined into one global adapter (the server bounds each update's size)

    def __init__(
        self,
        *,
        num_clients: int,
        sample_clients: int,
        num_rounds: int,
        lr_max: float,
        lr_min: float,
        aggregator: str = "mean",
        num_malicious: int = 0,
        trim_fraction: float = 0.2,
    ) -> None:
        self.aggregation = AggregatorParams(aggregator, num_malicious, trim_fraction)
        super().__init__(
            fraction_train=sample_clients / num_clients,
            fraction_evaluate=0.0,
            min_train_nodes=sample_clients,
            min_available_nodes=num_clients,
            weighted_by_key=WEIGHT_KEY,
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
        )
        self.num_clients, self.sample_clients = num_clients, sample_clients
        self.num_rounds = num_rounds
        self.lr_max, self.lr_min = lr_max, lr_min

    def state_dict(self) -> dict[str, Any]:
        """Server-side state to save for resuming (FedAvg has none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    def describe(self) -> str:
        """One line with the algorithm and its hyperparameters, for the run log."""
        params = asdict(self.params) if self.params is not None else {}
        if self.aggregation.aggregator != "mean":
            params.update(asdict(self.aggregation))
        return f"{type(self).__name__} {params} sampling {self.sample_clients}/{self.num_clients} clients per round"

    def learning_rate(self, server_round: int) -> float:
        return cosine_lr(server_round, self.num_rounds, self.lr_max, self.lr_min)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted mean, or the robust rule of ``strategy.aggregator`` (:mod:`strategies.robust`)."""
        if self.aggregation.aggregator == "mean":
            return super().aggregate_train(server_round, replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        updates = [from_record(m.content[self.arrayrecord_key]) for m in valid]
        weights = [float(m.content[METRICS_KEY][self.weighted_by_key]) for m in valid]
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return to_record(aggregate(updates, weights, self.aggregation)), metrics

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord(
            {
                **dict(config),
                "lr": self.learning_rate(server_round),
                "mode": self.mode,
                NUM_CLIENTS_KEY: self.num_clients,
            }
        )
        return super().configure_train(server_round, arrays, config, grid)
