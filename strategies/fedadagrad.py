"""FedAdagrad (Reddi et al., 2021) over LoRA arrays; math in :func:`strategies.aggregation.fedadagrad_step`."""

from __future__ import annotations

from typing import Any

from strategies.aggregation import Arrays, fedadagrad_step, initial_second_moment
from strategies.fedopt import FedOptParams, ServerOptimizer


class FedAdagrad(ServerOptimizer):
    """Adagrad on the server (no momentum, as in the paper). Client contract: FedAvg's.

    ``beta_1``, ``beta_2``, ``first_moment`` and ``second_moment`` are accepted for a uniform config and ignored.
    """

    def __init__(
        self,
        *,
        eta: float,
        tau: float,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        first_moment: str = "zero",
        second_moment: str = "delta",
        **kwargs: Any,
    ) -> None:
        self.params = FedOptParams(
            eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, first_moment=first_moment, second_moment=second_moment
        )
        super().__init__(**kwargs)

    def step(self, global_: Arrays, d: Arrays) -> Arrays:
        v = self.state.get("v") or initial_second_moment(global_, self.params.tau)
        new, self.state["v"] = fedadagrad_step(global_, d, v, self.params.eta, self.params.tau)
        return new
