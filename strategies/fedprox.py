"""FedProx (Li et al., 2020): FedAvg plus a proximal term on each client.

Client contract
---------------
As FedAvg, plus ``proximal-mu`` in the train config: the client adds
``mu/2 ||theta - theta_global||^2`` over its trainable (LoRA) parameters to its
training objective, i.e. ``mu (theta - theta_global)`` to their gradients at every
optimizer step (:mod:`fedllm_app.fed_terms`), for SFT and DPO alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies.fedavg import FedAvgLoRA

PROXIMAL_MU_KEY = "proximal-mu"


@dataclass(frozen=True)
class FedProxParams:
    """Hyperparameters of FedProx.

    Attributes
    ----------
    mu : float
        Weight of the proximal term, >= 0 (0 is FedAvg; OpenFedLLM's default 0.01).
    """

    mu: float = 0.01

    def __post_init__(self) -> None:
        if not self.mu >= 0:
            raise ValueError(f"strategy.mu={self.mu} must be >= 0; e.g. strategy.mu=0.01")


class FedProx(FedAvgLoRA):
    """FedAvg whose train messages carry ``proximal-mu``."""

    def __init__(self, *, mu: float, **kwargs: Any) -> None:
        self.params = FedProxParams(mu=mu)
        super().__init__(**kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), PROXIMAL_MU_KEY: self.params.mu})
        return super().configure_train(server_round, arrays, config, grid)
