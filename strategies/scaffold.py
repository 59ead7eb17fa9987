"""SCAFFOLD (Karimireddy et al., 2020) over LoRA arrays.

Server state: the control variate ``c`` (zeros at start), kept here and saved with
:meth:`Scaffold.state_dict`. The global update is FedAvg's mean with a server step
size; ``c += (|S| / N) mean_i(delta c_i)``
(:func:`strategies.aggregation.scaffold_server_step`).

Client contract
---------------
Each train message carries, besides FedAvg's ``arrays`` and ``config``, an
ArrayRecord ``c-server`` with ``c`` (same names as the adapter). The client keeps its
own ``c_i`` in ``context.state`` (zeros at first), adds ``c - c_i`` to its gradients
before every optimizer step, then sets ``c_i+`` to the mean of its raw gradients over
the K steps actually taken (equal to option II, ``c_i - c + (x - y_i) / (K lr)``, under
local SGD, and still in gradient units under Adam; see
:func:`strategies.aggregation.scaffold_client_control`), stores it and replies with an
extra ArrayRecord ``c-delta`` holding ``c_i+ - c_i``. The server removes ``c-delta`` before FedAvg's aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from strategies.aggregation import Arrays, scaffold_server_step
from strategies.fedavg import FedAvgLoRA
from strategies.fedopt import check_range
from strategies.records import from_record, to_record

C_SERVER_KEY = "c-server"
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
    """FedAvg plus server and client control variates that correct client drift."""

    reply_arrays = (C_DELTA_KEY,)

    def __init__(self, *, server_lr: float, **kwargs: Any) -> None:
        self.params = ScaffoldParams(server_lr=server_lr)
        super().__init__(**kwargs)
        self.c: Arrays | None = None
        self.global_arrays: Arrays | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = from_record(arrays)
        if self.c is None:
            self.c = {k: np.zeros_like(v) for k, v in self.global_arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        c_record = to_record(self.c)
        for msg in messages:
            msg.content[C_SERVER_KEY] = c_record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        deltas = [from_record(m.content[C_DELTA_KEY]) for m in replies if not m.has_error()]
        for m in replies:
            if not m.has_error():
                del m.content[C_DELTA_KEY]  # Flower's FedAvg expects exactly one ArrayRecord
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.global_arrays is None or self.c is None:
            return mean, metrics
        mean_dc = {k: sum(d[k] for d in deltas) / len(deltas) for k in self.c}
        new, self.c = scaffold_server_step(
            self.global_arrays, from_record(mean), self.c, mean_dc, len(deltas), self.num_clients, self.params.server_lr
        )
        return to_record(new), metrics

    def state_dict(self) -> dict[str, Arrays | None]:
        return {"c": None if self.c is None else {k: v.copy() for k, v in self.c.items()}}

    def load_state_dict(self, state: dict[str, Arrays | None]) -> None:
        c = state.get("c")
        self.c = None if c is None else {k: v.copy() for k, v in c.items()}
