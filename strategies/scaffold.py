"""SCAFFOLD (Karimireddy et al., 2020) over LoRA arrays.

Server state: the control variate ``c`` and every partition's ``c_i`` (zeros at start), kept
here and saved with :meth:`Scaffold.state_dict`, so clients hold no state. The global update is
FedAvg's mean with a server step size; ``c += (|S| / N) mean_i(delta c_i)`` over the replies the
server accepted (:func:`strategies.aggregation.scaffold_server_step`), and each of those
partitions' ``c_i += delta c_i`` at the same time. A rejected or late reply, a round below
``min_replies`` and a resumed run therefore all keep ``c = mean_i c_i`` over the N partitions.
The cost: the server holds N + 1 adapter-sized arrays (and saves them for resuming).

Client contract
---------------
Each train message carries, besides FedAvg's ``arrays`` and ``config``, the ArrayRecords
``c-server`` with ``c`` and ``c-client`` with the receiving partition's ``c_i`` (same names as
the adapter). The client adds ``c - c_i`` to its gradients before every optimizer step, then
sets ``c_i+`` to the mean of its raw gradients over the K steps actually taken (equal to option
II, ``c_i - c + (x - y_i) / (K lr)``, under local SGD, and still in gradient units under Adam;
see :func:`strategies.aggregation.scaffold_client_control`) and replies with an extra
ArrayRecord ``c-delta`` holding ``c_i+ - c_i``; it stores nothing. The server removes
``c-delta`` before FedAvg's aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid

from strategies.aggregation import Arrays, scaffold_commit_controls, scaffold_server_step
from strategies.fedavg import ARRAYS_KEY, FedAvgLoRA
from strategies.fedopt import check_range
from strategies.records import from_record, to_record

C_SERVER_KEY = "c-server"
C_CLIENT_KEY = "c-client"
CLIENT_STATE_PREFIX = "c-client-"
C_DELTA_KEY = "c-delta"


@dataclass(frozen=True)
class ScaffoldParams:
    """Hyperparameters of SCAFFOLD.

    Attributes
    ----------
    server_lr : float
        Global step size on the clients' mean update, > 0 (1 = take the mean, as OpenFedLLM).
    """

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        check_range("server_lr", self.server_lr, 0.0, float("inf"), 1.0)


class Scaffold(FedAvgLoRA):
    """FedAvg plus server and client control variates that correct client drift, all kept on the server."""

    reply_arrays = (C_DELTA_KEY,)

    def __init__(self, *, server_lr: float, **kwargs: Any) -> None:
        self.params = ScaffoldParams(server_lr=server_lr)
        super().__init__(**kwargs)
        self.c: Arrays | None = None
        self.c_i: dict[int, Arrays] = {}  # partition id -> its control variate; absent = zeros
        self.global_arrays: Arrays | None = None

    def client_control(self, partition: int) -> Arrays:
        """The partition's ``c_i`` (zeros before its first accepted reply)."""
        assert self.c is not None
        return self.c_i.get(partition) or {k: np.zeros_like(v) for k, v in self.c.items()}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = from_record(arrays)
        if self.c is None:
            self.c = {k: np.zeros_like(v) for k, v in self.global_arrays.items()}
        c_record = to_record(self.c)
        messages = []
        for msg in super().configure_train(server_round, arrays, config, grid):
            node = msg.metadata.dst_node_id
            c_i = to_record(self.client_control(self.partition_of[node]))  # type: ignore[index]
            content = RecordDict({**dict(msg.content.items()), C_SERVER_KEY: c_record, C_CLIENT_KEY: c_i})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        deltas: dict[int, Arrays] = {}
        for m in replies:
            if not m.has_error():
                deltas[self.sent_partition(m)] = from_record(m.content[C_DELTA_KEY])
                del m.content[C_DELTA_KEY]  # Flower's FedAvg expects exactly one ArrayRecord
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.global_arrays is None or self.c is None:
            return mean, metrics
        mean_dc = {k: sum(d[k] for d in deltas.values()) / len(deltas) for k in self.c}
        new, self.c = scaffold_server_step(
            self.global_arrays, from_record(mean), self.c, mean_dc, len(deltas), self.num_clients, self.params.server_lr
        )
        self.c_i = scaffold_commit_controls(self.c_i, deltas)
        return to_record(new), metrics

    def step_from_mean(
        self, global_: Arrays, mean: dict[str, Arrays], count: float, per_partition: dict[int, dict[str, Arrays]]
    ) -> Arrays:
        """SCAFFOLD's server step on a mean computed elsewhere (DP-FedAvg's noised mean of the jointly clipped
        adapter and control deltas): ``x += lr mean``, ``c += (count / N) mean(delta c)`` with ``count`` the
        expected number of clients, and each contributing partition's ``c_i`` moves by its own (clipped) delta.
        """
        assert self.c is not None
        mean_y = {k: global_[k] + mean[ARRAYS_KEY][k] for k in global_}
        new, c = scaffold_server_step(
            global_, mean_y, self.c, mean[C_DELTA_KEY], count, self.num_clients, self.params.server_lr
        )
        self.c = {k: v.astype(np.float32) for k, v in c.items()}
        own = {pid: {k: v.astype(np.float32) for k, v in p[C_DELTA_KEY].items()} for pid, p in per_partition.items()}
        self.c_i = scaffold_commit_controls(self.c_i, own)
        return new

    def state_dict(self) -> dict[str, Arrays | None]:
        state: dict[str, Arrays | None] = {"c": None if self.c is None else _copy(self.c)}
        state.update({f"{CLIENT_STATE_PREFIX}{pid}": _copy(c_i) for pid, c_i in self.c_i.items()})
        return state

    def load_state_dict(self, state: dict[str, Arrays | None]) -> None:
        c = state.get("c")
        self.c = None if c is None else _copy(c)
        self.c_i = {
            int(key[len(CLIENT_STATE_PREFIX) :]): _copy(value)
            for key, value in state.items()
            if key.startswith(CLIENT_STATE_PREFIX) and value is not None
        }


def _copy(arrays: Arrays) -> Arrays:
    return {k: v.copy() for k, v in arrays.items()}
