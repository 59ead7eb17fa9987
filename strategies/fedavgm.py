"""FedAvgM (Hsu et al., 2019) over LoRA arrays; math in :func:`strategies.aggregation.fedavgm_step`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strategies.aggregation import Arrays, fedavgm_step, initial_first_moment
from strategies.fedopt import ServerOptimizer, check_first_moment, check_range


@dataclass(frozen=True)
class FedAvgMParams:
    """Hyperparameters of FedAvgM (OpenFedLLM's defaults).

    Attributes
    ----------
    server_lr : float
        Step applied to the momentum buffer, > 0 (OpenFedLLM: 1).
    momentum : float
        Decay of the buffer ``m = momentum m + (1 - momentum) delta``, in (0, 1).
    first_moment : str
        Start of the buffer: ``"zero"`` (each delta weighs 1 in total) or ``"delta"`` (OpenFedLLM: the first
        round's delta, which that round then counts ``1 / (1 - momentum)`` times).
    """

    server_lr: float = 1.0
    momentum: float = 0.9
    first_moment: str = "zero"

    def __post_init__(self) -> None:
        check_range("server_lr", self.server_lr, 0.0, float("inf"), 1.0)
        check_range("momentum", self.momentum, 0.0, 1.0, 0.9)
        check_first_moment(self.first_moment)


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum. Client contract: FedAvg's."""

    def __init__(self, *, server_lr: float, momentum: float, first_moment: str = "zero", **kwargs: Any) -> None:
        self.params = FedAvgMParams(server_lr=server_lr, momentum=momentum, first_moment=first_moment)
        super().__init__(**kwargs)

    def step(self, global_: Arrays, d: Arrays) -> Arrays:
        p = self.params
        m = self.state.get("m") or initial_first_moment(global_, p.first_moment)
        new, self.state["m"] = fedavgm_step(global_, d, m, p.server_lr, p.momentum)
        return new
