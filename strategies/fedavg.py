"""FedAvg over LoRA arrays, weighted by the clients' data sizes.

Flower's FedAvg already computes the weighted mean we want
(``sum_k n_k theta_k / sum_k n_k``), here with ``n_k`` the size of client k's data as
McMahan et al. and OpenFedLLM weigh it, not the per-round sample (equal for every client
whose partition holds one round's rows). The server writes ``n_k`` into each sound reply's
metrics under :data:`WEIGHT_KEY` after judging it (``fedllm_app/server/guard.py``): a
client never sets its own weight. This subclass only adds what fedllm's clients need each round.

Client contract
---------------
A client answers a ``query`` message (config ``{"query": "partition-id"}``) with a MetricRecord
``metrics`` holding its ``partition-id``: the server asks each node it has not met yet once, and
samples partitions from ``(seed, round)`` (:mod:`strategies.sampling`), then sends to the nodes
holding them.
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

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation import Arrays
from strategies.records import from_record, is_integer, to_record
from strategies.robust import AggregatorParams, aggregate, trimming_shortfall
from strategies.sampling import nodes_for, sample_partitions
from strategies.schedule import cosine_lr

log = logging.getLogger("fedllm")

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
NUM_CLIENTS_KEY = "num-clients"
PARTITION_KEY = "partition-id"
DATA_SIZE_KEY = "data-size"
# Set by the server on each accepted reply (never by a client): the weight of the reply in the mean.
WEIGHT_KEY = "server-weight"
QUERY_KEY = "query"


def partition_queries(nodes: list[int]) -> list[Message]:
    """One partition query per node."""
    content = RecordDict({CONFIG_KEY: ConfigRecord({QUERY_KEY: PARTITION_KEY})})
    return [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]


def _partition_answer(reply: Message) -> Any:
    """The reply's metrics if it answers the partition query, else None (an error reply, or no answer in it)."""
    metrics = None if reply.has_error() else reply.content.get(METRICS_KEY)
    return metrics if metrics is not None and PARTITION_KEY in metrics else None


class FedAvgLoRA(FedAvg):
    """FedAvg with ``sample_clients`` of ``num_clients`` per round and a cosine lr across rounds.

    ``seed`` fixes which partitions each round trains; ``query_timeout`` bounds the wait for a new
    node's answer to the partition query. A node that does not answer in time is not sampled until it
    answers: its question stays open, and each later round reads any answer without waiting for it.
    """

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
        seed: int = 0,
        query_timeout: float = 600.0,
    ) -> None:
        self.aggregation = AggregatorParams(aggregator, num_malicious, trim_fraction)
        if shortfall := trimming_shortfall(self.aggregation, sample_clients):
            log.warning(shortfall)
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
        self.seed, self.query_timeout = seed, query_timeout
        self.partition_of: dict[int, int | None] = {}  # node id -> its partition id (None: a bad answer)
        self._asked: dict[int, str] = {}  # node id -> id of the partition query it has not answered yet
        self._shared_warned: set[tuple[int, int]] = set()  # (partition, node) already warned as held twice

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

    def step_from_mean(
        self, global_: Arrays, mean: dict[str, Arrays], count: float, per_partition: dict[int, dict[str, Arrays]]
    ) -> Arrays:
        """The new global adapter from a mean update computed outside the strategy (DP-FedAvg's noised mean).

        ``mean[ARRAYS_KEY]`` is the mean adapter delta (plus, by name, the means of :attr:`reply_arrays`);
        ``count`` the number of clients the mean stands for; ``per_partition`` each contributing partition's
        own (clipped) parts. FedAvg takes the mean step: ``x + mean``.
        """
        return {k: global_[k] + mean[ARRAYS_KEY][k] for k in global_}

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The round's train config: the caller's, plus round, lr, mode and ``num-clients``."""
        return ConfigRecord(
            {
                **dict(config),
                "server-round": server_round,
                "lr": self.learning_rate(server_round),
                "mode": self.mode,
                NUM_CLIENTS_KEY: self.num_clients,
            }
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: self.train_config(server_round, config)})
        return self._construct_messages(record, self.sample_nodes(server_round, grid), MessageType.TRAIN)

    def sample_nodes(self, server_round: int, grid: Grid, poll: float = 1.0) -> list[int]:
        """The nodes holding the partitions drawn for ``server_round``.

        Waits, as Flower's sampler, for ``min_available_nodes`` connected nodes; a node that did not
        tell its partition is left out (the round then trains fewer clients).
        """
        needed = max(self.min_train_nodes, self.min_available_nodes)
        while len(node_of := self.connected_partitions(grid)) < needed and len(list(grid.get_node_ids())) < needed:
            log.info("waiting for nodes: %d connected, %d needed", len(list(grid.get_node_ids())), needed)
            time.sleep(poll)
        partitions = self.round_partitions(server_round, node_of)
        # Flower's own line (shown with logging.verbose), with the partitions drawn
        flwr_log(INFO, "configure_train: Sampled %s nodes (out of %s): partitions %s", len(partitions),
                 len(list(grid.get_node_ids())), partitions)  # fmt: skip
        return nodes_for(partitions, node_of)

    def round_partitions(self, server_round: int, available: Iterable[int] | None = None) -> list[int]:
        """The partitions ``server_round`` trains (of ``available`` ones; default all), from ``(seed, round)``."""
        pool = range(self.num_clients) if available is None else available
        return sample_partitions(self.seed, server_round, self.num_clients, self.min_train_nodes, pool)

    def sent_partition(self, reply: Message) -> int:
        """The partition the server sent this round to the reply's node: its answer to the partition query (the
        server's record, never the reply's own claim).
        """
        pid = self.partition_of.get(reply.metadata.src_node_id)
        if pid is None:
            raise ValueError(f"a reply from node {reply.metadata.src_node_id}, which was sent no round")
        return pid

    def connected_partitions(self, grid: Grid) -> dict[int, int]:
        """Partition id -> connected node holding it; nodes not met before are queried first."""
        connected = sorted(grid.get_node_ids())
        if self._asked:
            self.partition_of.update(self.late_answers(grid))
        unknown = [n for n in connected if n not in self.partition_of and n not in self._asked]
        if unknown:
            found = self.query_partitions(grid, unknown)
            self.partition_of.update({n: pid for n, pid in found.items() if n not in self._asked})
        node_of: dict[int, int] = {}
        for node in connected:
            pid = self.partition_of.get(node)
            if pid is not None and node_of.setdefault(pid, node) != node and (pid, node) not in self._shared_warned:
                self._shared_warned.add((pid, node))
                log.warning("nodes %s and %s both hold partition-id %s; only node %s is sampled for it: give each "
                            "SuperNode its own partition-id", node_of[pid], node, pid, node_of[pid])  # fmt: skip
        return node_of

    def query_partitions(self, grid: Grid, nodes: list[int]) -> dict[int, int | None]:
        """Ask ``nodes`` for their partition id, waiting up to ``query_timeout`` s; None for a bad answer.

        A node that did not answer in time is asked again without waiting (:meth:`late_answers` reads it).
        """
        found: dict[int, int | None] = dict.fromkeys(nodes)
        answered = set()
        for reply in grid.send_and_receive(partition_queries(nodes), timeout=self.query_timeout):
            if (metrics := _partition_answer(reply)) is not None:
                answered.add(reply.metadata.src_node_id)
                found[reply.metadata.src_node_id] = self._checked_partition(reply.metadata.src_node_id, metrics)
        silent = [n for n in nodes if n not in answered]  # a bad answer was logged as such by _checked_partition
        if silent:
            log.warning("nodes %s did not tell their partition within %s s; they are not sampled until they "
                        "answer (asked again; each round reads the answer without waiting)", silent,
                        self.query_timeout)  # fmt: skip
            queries = partition_queries(silent)
            self._asked.update(zip(silent, grid.push_messages(queries), strict=True))
        return found

    def late_answers(self, grid: Grid) -> dict[int, int | None]:
        """Answers to the questions still open (read now, not waited for); those nodes are asked no more."""
        found: dict[int, int | None] = {}
        for reply in grid.pull_messages(list(self._asked.values())):
            node = reply.metadata.src_node_id
            if node not in self._asked or reply.metadata.reply_to_message_id != self._asked[node]:
                continue
            del self._asked[node]
            metrics = _partition_answer(reply)
            if metrics is None:  # an error reply (the node failed or the question expired): ask once more
                self._asked.update(zip([node], grid.push_messages(partition_queries([node])), strict=True))
                continue
            found[node] = self._checked_partition(node, metrics)
            if found[node] is not None:
                log.info("node %s told its partition (%s) late; it can be sampled from now on", node, found[node])
        return found

    def _checked_partition(self, node: int, metrics: Any) -> int | None:
        """The node's answer if it is a partition id of this run; else None, with the reason logged."""
        pid = metrics[PARTITION_KEY]
        if not is_integer(pid):
            log.warning("node %s answered the partition query with %r, not an integer; it is not sampled", node, pid)
            return None
        if not 0 <= pid < self.num_clients:
            log.error(
                "node %s holds partition-id %s, outside 0..%s for num_clients=%s; it is not sampled: give each "
                "SuperNode a partition-id below num_clients", node, pid, self.num_clients - 1, self.num_clients,
            )  # fmt: skip
            return None
        return pid
