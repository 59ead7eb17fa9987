"""Server-side optimisers over the clients' mean update (the FedOpt family and FedAvgM).

:class:`ServerOptimizer` keeps the current global adapter from ``configure_train``,
lets FedAvg compute the (data-size-weighted or robust) mean of the replies, and hands
``(global, mean - global)`` to :meth:`ServerOptimizer.step`, which each algorithm
implements with a pure function from :mod:`strategies.aggregation`.

Client contract: FedAvg's (see :mod:`strategies.fedavg`); nothing extra travels.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from strategies.aggregation import (
    SECOND_MOMENT_FORMS,
    Arrays,
    delta,
    initial_first_moment,
    initial_second_moment,
)
from strategies.fedavg import ARRAYS_KEY, FedAvgLoRA
from strategies.records import from_record, to_record


def check_range(name: str, value: float, low: float, high: float, example: float) -> None:
    """Raise a ValueError naming ``strategy.<name>`` unless ``low < value < high``."""
    if not low < value < high:
        bounds = f"in ({low}, {high})" if high != float("inf") else f"> {low}"
        raise ValueError(f"strategy.{name}={value} must be {bounds}; e.g. strategy.{name}={example}")


FIRST_MOMENT_FORMS = ("zero", "delta")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``strategy.<name>`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"strategy.{name}={value!r} must be one of {', '.join(choices)}; e.g. strategy.{name}={choices[0]}"
        )


def check_first_moment(form: str) -> None:
    """Raise a ValueError naming ``strategy.first_moment`` unless it is one of :data:`FIRST_MOMENT_FORMS`."""
    check_choice("first_moment", form, FIRST_MOMENT_FORMS)


@dataclass(frozen=True)
class FedOptParams:
    """Hyperparameters of FedAdagrad, FedYogi and FedAdam (OpenFedLLM's defaults).

    Attributes
    ----------
    eta : float
        Server learning rate applied to the adaptive step.
    beta_1 : float
        First-moment (momentum) decay, in (0, 1). Unused by FedAdagrad.
    beta_2 : float
        Second-moment decay, in (0, 1). Unused by FedAdagrad.
    tau : float
        Adaptivity: added to ``sqrt(v)``; ``v`` starts at ``tau**2``. Must be > 0.
    first_moment : str
        Start of the first moment: ``"zero"`` (Reddi et al., Flower) or ``"delta"`` (OpenFedLLM: the
        first round's delta, which that round then counts ``1 / (1 - beta_1)`` times). Unused by FedAdagrad.
    second_moment : str
        What the second moment accumulates: ``"delta"``, the squared pseudo-gradient (Reddi et al. Alg. 2,
        Flower), or ``"momentum"``, the squared first moment (OpenFedLLM). Unused by FedAdagrad, whose
        ``v += delta**2`` has no first moment.
    """

    eta: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    first_moment: str = "zero"
    second_moment: str = "delta"

    def __post_init__(self) -> None:
        check_range("eta", self.eta, 0.0, float("inf"), 1e-3)
        check_range("beta_1", self.beta_1, 0.0, 1.0, 0.9)
        check_range("beta_2", self.beta_2, 0.0, 1.0, 0.99)
        check_range("tau", self.tau, 0.0, float("inf"), 1e-3)
        check_first_moment(self.first_moment)
        check_choice("second_moment", self.second_moment, SECOND_MOMENT_FORMS)


class ServerOptimizer(FedAvgLoRA):
    """Base of the strategies that post-process FedAvg's mean with server-side state."""

    params: Any

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.global_arrays: Arrays | None = None
        self.state: dict[str, Arrays | None] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None or self.global_arrays is None:
            return mean, metrics
        current = self.global_arrays
        return to_record(self.step(current, delta(from_record(mean), current))), metrics

    def step_from_mean(
        self, global_: Arrays, mean: dict[str, Arrays], count: float, per_partition: dict[int, dict[str, Arrays]]
    ) -> Arrays:
        """The server optimizer's step on a mean delta computed elsewhere (DP-FedAvg's noised mean)."""
        return self.step(global_, mean[ARRAYS_KEY])

    def step(self, global_: Arrays, d: Arrays) -> Arrays:
        """The new global adapter from the current one and the clients' mean delta."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Arrays | None]:
        """Optimizer state (moments), for saving and resuming a run."""
        return {k: None if v is None else {n: a.copy() for n, a in v.items()} for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Arrays | None]) -> None:
        self.state = {k: None if v is None else {n: a.copy() for n, a in v.items()} for k, v in state.items()}


class AdaptiveMomentOptimizer(ServerOptimizer):
    """FedAdam and FedYogi: first and second moments; subclasses set :attr:`update` only."""

    update: Any  # (global, delta, m, v, eta, beta_1, beta_2, tau, second_moment) -> (new global, m, v)

    def __init__(
        self,
        *,
        eta: float,
        beta_1: float,
        beta_2: float,
        tau: float,
        first_moment: str = "zero",
        second_moment: str = "delta",
        **kwargs: Any,
    ) -> None:
        self.params = FedOptParams(
            eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, first_moment=first_moment, second_moment=second_moment
        )
        super().__init__(**kwargs)

    def step(self, global_: Arrays, d: Arrays) -> Arrays:
        p = self.params
        v = self.state.get("v") or initial_second_moment(global_, p.tau)
        m = self.state.get("m") or initial_first_moment(global_, p.first_moment)
        new, self.state["m"], self.state["v"] = type(self).update(
            global_, d, m, v, p.eta, p.beta_1, p.beta_2, p.tau, p.second_moment
        )
        return new
